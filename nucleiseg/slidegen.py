"""Synthetic whole-slide images: pyramidal, tiled TIFFs with their resolution, readable by OpenSlide and tifffile.

No slide can be downloaded where this project is tested, so the slide path is tested and benchmarked on slides
written here, from an image in memory (:func:`write_slide`: a synthetic or real tile, or a test's assembly) or
as a mosaic of source tiles of any size (:func:`write_mosaic_slide`: 60,000 pixels a side in bounded memory).

File layout
    BigTIFF; each pyramid level a top-level page, level 0 first and each next level ``factor`` (4) times
    smaller, down to the first level that fits in one tile (OpenSlide's generic tiled TIFF, which tiffslide
    reads as well), or with ``ome=True`` an OME-TIFF with the levels as SubIFDs of level 0 (OME-NGFF's
    predecessor; tiffslide reads it, OpenSlide does not). Tiles of 256 x 256 pixels, JPEG (as scanners write;
    lossy) or deflate (lossless: level 0 reads back exactly, which the exactness tests need).
Resolution
    ``mpp`` (microns per level-0 pixel) is written as the TIFF resolution tags, ``10^4 / mpp`` pixels per
    centimetre per level (scaled by the level's downsample), and in OME-TIFF as ``PhysicalSizeX``/``Y`` in um.
    ``mpp=None`` writes no resolution: the slide of unknown resolution that the slide path must refuse.
Downsampled levels
    ``write_slide``: area averaging of the whole image (``cv2.INTER_AREA``). ``write_mosaic_slide``: the mosaic of
    each block's own area-averaged copy, so any level of any size is made without holding a larger one.
Mosaic
    The slide is a grid of ``block``-pixel squares: *tissue* blocks inside a smooth random blob covering about
    ``tissue_fraction`` of the grid, each one of the source tiles under one of the 8 symmetries of the square
    (chosen at random, reproducibly from ``seed``), and *glass* blocks (near-white, faint noise) elsewhere.
    Nuclei are cut at block borders, as at the edge of any tile: the mosaic is for speed and memory, not for
    accuracy figures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

TILE = 256
FACTOR = 4
GLASS_RGB = (242, 241, 243)


def _level_shapes(height: int, width: int, factor: int, tile: int) -> list[tuple[int, int]]:
    shapes = [(height, width)]
    while max(shapes[-1]) > tile:
        h, w = shapes[-1]
        shapes.append((max(1, math.ceil(h / factor)), max(1, math.ceil(w / factor))))
    return shapes


def _tiles(
    shape: tuple[int, int], tile: int, region: Callable[[int, int, int, int], np.ndarray]
) -> Iterator[np.ndarray]:
    """Full ``tile x tile`` RGB tiles of a level in row-major order; edge tiles padded with glass."""
    height, width = shape
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            h, w = min(tile, height - y), min(tile, width - x)
            part = region(y, x, h, w)
            if (h, w) == (tile, tile):
                yield part
            else:
                full = np.empty((tile, tile, 3), dtype=np.uint8)
                full[:] = GLASS_RGB
                full[:h, :w] = part
                yield full


def _write_pyramid(
    path: Path,
    shapes: Sequence[tuple[int, int]],
    region: Callable[[int, int, int, int, int], np.ndarray],
    mpp: float | None,
    compression: str,
    ome: bool,
    tile: int,
) -> None:
    """Write the levels (``region(level, y, x, h, w)`` gives their pixels) atomically into ``path``."""
    import tifffile

    from nucleiseg.io import atomic_path

    if compression not in ("jpeg", "deflate"):
        raise ValueError(f"compression must be 'jpeg' or 'deflate', got {compression!r}")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of microns per pixel, got {mpp}")
    codec = {"compression": "jpeg", "compressionargs": {"level": 90}} if compression == "jpeg" else {
        "compression": "zlib", "compressionargs": {"level": 6}}  # fmt: skip
    height0, width0 = shapes[0]
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=ome) as tif:
        for level, shape in enumerate(shapes):
            downsample = (height0 / shape[0] + width0 / shape[1]) / 2
            options: dict = {"tile": (tile, tile), "photometric": "rgb", "dtype": np.uint8, **codec}
            if mpp is not None:
                per_cm = 1e4 / (mpp * downsample)
                options.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
            else:
                options.update(resolution=(1, 1), resolutionunit="NONE")
            if level == 0:
                if ome:
                    options["subifds"] = len(shapes) - 1
                    metadata: dict = {"axes": "YXS"}
                    if mpp is not None:
                        metadata.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp,
                                        PhysicalSizeYUnit="µm")  # fmt: skip
                    options["metadata"] = metadata
                else:
                    options["metadata"] = None
                    options["description"] = "nucleiseg synthetic slide" + ("" if mpp is None else f"; mpp={mpp}")
            else:
                options["subfiletype"] = 1  # a reduced-resolution copy of level 0
                options["metadata"] = None
            tiles = _tiles(shape, tile, lambda y, x, h, w, k=level: region(k, y, x, h, w))
            tif.write(tiles, shape=(*shape, 3), **options)


def write_slide(
    path: str | os.PathLike[str],
    image: np.ndarray,
    mpp: float | None,
    *,
    compression: str = "deflate",
    ome: bool = False,
    factor: int = FACTOR,
    tile: int = TILE,
) -> Path:
    """Write an RGB ``uint8`` image as a pyramidal tiled TIFF at ``mpp`` (see the module docstring); returns
    the path. Deflate by default, so level 0 reads back exactly."""
    import cv2

    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image, got {image.dtype} {image.shape}")
    shapes = _level_shapes(image.shape[0], image.shape[1], factor, tile)
    levels = [image]
    for h, w in shapes[1:]:
        levels.append(cv2.resize(levels[-1], (w, h), interpolation=cv2.INTER_AREA))
    path = Path(path)
    _write_pyramid(path, shapes, lambda k, y, x, h, w: levels[k][y : y + h, x : x + w], mpp, compression, ome, tile)
    return path


def _d4(image: np.ndarray, k: int) -> np.ndarray:
    """Symmetry ``k`` (0-7) of the square: ``k % 4`` quarter turns, then a horizontal flip when ``k >= 4``."""
    out = np.rot90(image, k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def tissue_blocks(rows: int, cols: int, tissue_fraction: float, seed: int) -> np.ndarray:
    """Boolean ``(rows, cols)`` grid: a smooth random blob covering about ``tissue_fraction`` of it (at least one
    block), like a section on a glass slide."""
    from scipy import ndimage

    if not 0 < tissue_fraction <= 1:
        raise ValueError(f"tissue_fraction must be in (0, 1], got {tissue_fraction}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    centre = ((rows - 1) / 2, (cols - 1) / 2)
    distance = np.hypot((yy - centre[0]) / rows, (xx - centre[1]) / cols)  # 0 at the centre, about 0.7 at corners
    noise = ndimage.gaussian_filter(rng.normal(size=(rows, cols)), sigma=max(1.0, min(rows, cols) / 6))
    field = -distance + 0.15 * noise / max(noise.std(), 1e-9)  # a disc with a wavy edge
    blocks = field >= np.quantile(field, 1 - tissue_fraction)
    blocks[round(centre[0]), round(centre[1])] = True
    return blocks


def write_mosaic_slide(
    path: str | os.PathLike[str],
    size: int | tuple[int, int],
    mpp: float | None,
    sources: Sequence[np.ndarray],
    *,
    block: int = 1024,
    tissue_fraction: float = 0.5,
    seed: int = 0,
    compression: str = "jpeg",
    factor: int = FACTOR,
    tile: int = TILE,
) -> Path:
    """Write a ``size`` (side, or ``(height, width)``) slide as a mosaic of ``sources`` (module docstring).

    ``sources``: RGB ``uint8`` images of at least ``block`` pixels a side (their top-left ``block`` square is
    used). ``block`` must be divisible by ``factor`` to the power of the last level's index, so that every
    level is a mosaic of whole downsampled blocks. Memory: the sources and their downsampled copies, never a
    level. Returns the path.
    """
    import cv2

    height, width = (size, size) if isinstance(size, int | np.integer) else (int(size[0]), int(size[1]))
    shapes = _level_shapes(height, width, factor, tile)
    if block % factor ** (len(shapes) - 1):
        divisor = factor ** (len(shapes) - 1)
        raise ValueError(f"block ({block}) must be divisible by {divisor} for the {len(shapes)} pyramid levels")
    if not sources:
        raise ValueError("need at least one source tile")
    rng = np.random.default_rng(seed)
    glass = np.clip(np.asarray(GLASS_RGB) + rng.normal(0, 1.5, (block, block, 3)), 0, 255).astype(np.uint8)
    squares = []
    for source in sources:
        source = np.asarray(source)
        if source.ndim != 3 or source.shape[2] != 3 or min(source.shape[:2]) < block or source.dtype != np.uint8:
            raise ValueError(f"sources must be RGB uint8 images of at least {block} px a side, got {source.shape}")
        squares.append(np.ascontiguousarray(source[:block, :block]))
    # Per block: -1 glass, else (source index * 8 + symmetry).
    rows, cols = math.ceil(height / block), math.ceil(width / block)
    tissue = tissue_blocks(rows, cols, tissue_fraction, seed)
    choice = np.where(tissue, rng.integers(0, len(squares) * 8, (rows, cols)), -1)
    # Every block content at every level: the area-averaged copy of the level-0 block.
    contents: dict[int, list[np.ndarray]] = {}
    for key in [-1, *range(len(squares) * 8)]:
        base = glass if key < 0 else _d4(squares[key // 8], key % 8)
        copies = [base]
        for k in range(1, len(shapes)):
            side = block // factor**k
            copies.append(cv2.resize(base, (side, side), interpolation=cv2.INTER_AREA))
        contents[key] = copies

    def region(level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        side = block // factor**level
        out = np.empty((h, w, 3), dtype=np.uint8)
        for by in range(y // side, (y + h - 1) // side + 1):
            for bx in range(x // side, (x + w - 1) // side + 1):
                y0, y1 = max(y, by * side), min(y + h, (by + 1) * side)
                x0, x1 = max(x, bx * side), min(x + w, (bx + 1) * side)
                src = contents[int(choice[by, bx])][level]
                out[y0 - y : y1 - y, x0 - x : x1 - x] = src[
                    y0 - by * side : y1 - by * side, x0 - bx * side : x1 - bx * side
                ]
        return out

    path = Path(path)
    _write_pyramid(path, shapes, region, mpp, compression, ome=False, tile=tile)
    return path


def synthetic_sources(n: int, size: int = 1024, seed: int = 0) -> list[np.ndarray]:
    """``n`` synthetic 40x H&E tiles of ``size`` pixels (:func:`nucleiseg.synth.synth_tile`), for mosaics."""
    from nucleiseg.synth import synth_tile

    return [synth_tile(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,))), size)[0] for i in range(n)]


__all__ = ["FACTOR", "GLASS_RGB", "TILE", "synthetic_sources", "tissue_blocks", "write_mosaic_slide", "write_slide"]
