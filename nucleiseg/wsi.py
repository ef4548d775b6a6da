"""Whole-slide images: one small reader interface over OpenSlide, tiffslide and in-memory arrays, and a view of a
slide resampled to the resolution a model was trained at.

Definitions
-----------
slide
    A pyramid of RGB images of one glass slide. Level 0 is the full scan; level ``k`` is a downsampled copy,
    ``level_dimensions[k] = (width, height)`` and ``level_downsamples[k]`` level-0 pixels per level-``k`` pixel
    (OpenSlide's conventions, which every reader here follows).
mpp
    Microns per pixel of level 0, ``(x, y)``: 0.25 is a 40x scan, 0.5 a 20x scan. It comes from the slide's
    metadata (OpenSlide's ``openslide.mpp-x``/``-y``, tiffslide's ``tiffslide.mpp-x``/``-y``: the vendor's
    field, or the TIFF resolution tags, or OME ``PhysicalSizeX``/``Y``) unless the caller gives it
    (``--mpp``); a slide whose mpp is neither known nor given is refused (:func:`resolve_mpp`).
pixel coordinates
    Level-0 pixel ``(x, y)`` is the square ``[x, x+1] x [y, y+1]`` (its centre at ``(x + 0.5, y + 0.5)``), as
    QuPath and :mod:`nucleiseg.export` count. Readers take OpenSlide's ``read_region((x, y), level, (w, h))``
    arguments: the top-left corner in level-0 pixels, the size in level-``level`` pixels.
view
    :class:`ScaledView`: the slide as seen at a target mpp (a model's), addressed in *view pixels* as a numpy
    image ``(rows, cols)``. View pixel ``(r, c)`` has its centre at level-0 position
    ``((c + 0.5) * scale_x, (r + 0.5) * scale_y)``, ``scale = target_mpp / slide_mpp`` (level-0 pixels per view
    pixel). When the slide's mpp is within ``tolerance`` of the target, or a pyramid level is, that level is
    read as it is (no resampling; ``scale`` is then that level's downsample). Otherwise the finest level that is
    at least as fine as the target (the coarsest level with ``downsample <= scale * (1 + tolerance)``) is
    resampled: Gaussian anti-aliasing (``sigma = (r - 1) / 2`` level pixels for a reduction by ``r``, as
    ``skimage.transform.resize``) then bilinear interpolation at the view pixels' centres, edge pixels
    replicated beyond the slide. Each view pixel depends only on its own position, so a region read in one
    piece or in several gives the same pixels (the streaming in :mod:`nucleiseg.streaming` relies on it).

Readers (:func:`open_slide`): files OpenSlide recognises (``OpenSlide.detect_format``: Aperio ``.svs``,
Hamamatsu ``.ndpi``/``.vms``, MIRAX ``.mrxs``, Leica ``.scn``, Philips and Ventana TIFF, DICOM, generic tiled
TIFF, ...) go to OpenSlide, through the ``openslide-bin`` wheel (no system library needed); OME-TIFF and other
TIFFs OpenSlide does not take go to tiffslide (tifffile + zarr). An :class:`ArraySlide` wraps an image already in
memory (a plain tile). Errors are :class:`SlideError` naming the file.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# Suffixes treated as slides when listing a folder; a .tif/.tiff is a slide only when it is tiled (is_slide).
SLIDE_SUFFIXES = (".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".tif", ".tiff")
_TIFF_SUFFIXES = (".tif", ".tiff")
DEFAULT_MPP_TOLERANCE = 0.02


class SlideError(ValueError):
    """A slide cannot be opened or read, or its resolution is unknown; the message names the file."""


class SlideReader(Protocol):
    """What the slide path needs from a slide, whatever its format (OpenSlide's conventions)."""

    path: Path
    backend: str  # "openslide:<vendor>", "tiffslide", "array"
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level, level 0 first
    level_downsamples: tuple[float, ...]
    mpp: tuple[float, float] | None  # (x, y) microns per level-0 pixel from the metadata, None when absent

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB ``uint8`` ``(h, w, 3)``: the region of ``level`` whose top-left corner is level-0 ``location``."""
        ...

    def close(self) -> None: ...


def _mpp_from(properties: Any, prefix: str) -> tuple[float, float] | None:
    try:
        mpp = (float(properties[f"{prefix}.mpp-x"]), float(properties[f"{prefix}.mpp-y"]))
    except (KeyError, TypeError, ValueError):
        return None
    return mpp if all(math.isfinite(v) and v > 0 for v in mpp) else None


def _check_region(reader: SlideReader, location: tuple[int, int], level: int, size: tuple[int, int]) -> None:
    if not 0 <= level < len(reader.level_dimensions):
        raise SlideError(f"{reader.path}: no level {level} (the slide has {len(reader.level_dimensions)})")
    if size[0] < 1 or size[1] < 1:
        raise SlideError(f"{reader.path}: empty region {size} requested")


class _OpenSlideReader:
    """OpenSlide (any format it detects). RGBA is composited onto the slide's background colour (white unless
    the slide says otherwise): OpenSlide returns transparent pixels outside the scanned area."""

    def __init__(self, path: Path) -> None:
        import openslide

        self.path = path
        try:
            self._slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideError(f"{path}: OpenSlide cannot open it ({exc})") from None
        props = self._slide.properties
        self.backend = f"openslide:{props.get('openslide.vendor', 'unknown')}"
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.mpp = _mpp_from(props, "openslide")
        colour = props.get("openslide.background-color", "FFFFFF")
        try:
            self._background = np.array([int(colour[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.float32)
        except ValueError:
            self._background = np.full(3, 255, dtype=np.float32)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        import openslide

        _check_region(self, location, level, size)
        try:
            rgba = np.asarray(self._slide.read_region(location, level, size))
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise SlideError(f"{self.path}: cannot read level {level} at {location} ({exc})") from None
        rgb = rgba[..., :3]
        alpha = rgba[..., 3]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        a = alpha[..., None].astype(np.float32) / 255.0
        return np.rint(rgb * a + self._background * (1.0 - a)).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


class _TiffSlideReader:
    """tiffslide: pyramidal TIFF and OME-TIFF through tifffile and zarr."""

    def __init__(self, path: Path) -> None:
        import tiffslide

        self.path = path
        try:
            self._slide = tiffslide.TiffSlide(path)
            self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        except Exception as exc:  # tifffile and zarr raise many types for foreign or corrupt files
            raise SlideError(f"{path}: tiffslide cannot open it ({type(exc).__name__}: {exc})") from None
        self.backend = "tiffslide"
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.mpp = _mpp_from(self._slide.properties, "tiffslide")
        self._lock = threading.Lock()  # one file handle: tifffile seeks and reads under it

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        _check_region(self, location, level, size)
        try:
            with self._lock:
                array = self._slide.read_region(location, level, size, as_array=True)
        except Exception as exc:  # decoding errors of truncated tiles come from imagecodecs, zarr, tifffile
            raise SlideError(
                f"{self.path}: cannot read level {level} at {location} ({type(exc).__name__}: {exc})"
            ) from None
        array = np.asarray(array)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.dtype != np.uint8 or array.shape[2] < 3:
            raise SlideError(f"{self.path}: unsupported pixels {array.dtype} x {array.shape[2]} (need 8-bit RGB)")
        return np.ascontiguousarray(array[..., :3])

    def close(self) -> None:
        self._slide.close()


class ArraySlide:
    """An RGB image in memory seen as a one-level slide (a plain tile, or a test's synthetic slide)."""

    def __init__(self, image: np.ndarray, mpp: float | tuple[float, float] | None, name: str = "array") -> None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise SlideError(f"{name}: expected an RGB uint8 image, got {image.dtype} {image.shape}")
        self.path = Path(name)
        self.backend = "array"
        self.image = image
        self.level_dimensions = ((image.shape[1], image.shape[0]),)
        self.level_downsamples = (1.0,)
        if mpp is None:
            self.mpp: tuple[float, float] | None = None
        elif isinstance(mpp, int | float):
            self.mpp = (float(mpp), float(mpp))
        else:
            self.mpp = _as_pair(mpp)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        _check_region(self, location, level, size)
        (x, y), (w, h) = location, size
        out = np.full((h, w, 3), 255, dtype=np.uint8)  # outside the image: glass, as OpenSlide's background
        height, width = self.image.shape[:2]
        y0, y1, x0, x1 = max(y, 0), min(y + h, height), max(x, 0), min(x + w, width)
        if y0 < y1 and x0 < x1:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self.image[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        pass


def _as_pair(mpp: Sequence[float]) -> tuple[float, float]:
    x, y = (float(v) for v in mpp)
    return x, y


def is_ome_tiff(path: Path) -> bool:
    return path.name.lower().endswith((".ome.tif", ".ome.tiff"))


def open_slide(path: str | os.PathLike[str]) -> SlideReader:
    """Open a slide with the reader its format needs (module docstring); :class:`SlideError` names the file
    and what each reader said when none can open it."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: slide file not found")
    import openslide

    attempts: list[str] = []
    readers: list[type] = [_TiffSlideReader, _OpenSlideReader] if is_ome_tiff(path) else [_OpenSlideReader]
    if not is_ome_tiff(path):
        try:
            detected = openslide.OpenSlide.detect_format(str(path))
        except (openslide.OpenSlideError, OSError):
            detected = None
        if detected is None:
            attempts.append("OpenSlide: format not recognised")
            readers = [_TiffSlideReader]
    for reader in readers:
        try:
            slide = reader(path)
        except SlideError as exc:
            attempts.append(str(exc).removeprefix(f"{path}: "))
            continue
        if not slide.level_dimensions or min(slide.level_dimensions[0]) < 1:
            slide.close()
            attempts.append(f"{slide.backend}: no image")
            continue
        return slide
    raise SlideError(f"{path}: not a readable slide ({'; '.join(attempts)})")


def is_slide(path: str | os.PathLike[str]) -> bool:
    """Whether a file is processed as a slide rather than a plain tile: a slide format by suffix, or a
    ``.tif``/``.tiff`` stored in tiles (every whole-slide TIFF is; a plain tile written by
    :func:`nucleiseg.io.write_image` is stored in strips). Unreadable TIFFs count as tiles (and fail there)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SLIDE_SUFFIXES:
        return False
    if suffix not in _TIFF_SUFFIXES:
        return True
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.pages[0].is_tiled)
    except Exception:  # a corrupt TIFF: let the tile path report it
        return False


def list_slides(folder: str | os.PathLike[str]) -> list[Path]:
    """The slides of a folder (:func:`is_slide`), sorted. MIRAX's ``.mrxs`` companion folders are not entered."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and is_slide(p))


def resolve_mpp(reader: SlideReader, override: float | None = None) -> tuple[tuple[float, float], str]:
    """The slide's ``(x, y)`` mpp and where it came from (``"--mpp"`` or ``"metadata"``).

    Raises :class:`SlideError` when the metadata has none and none is given, saying how to give it.
    """
    if override is not None:
        if not (math.isfinite(override) and override > 0):
            raise SlideError(f"{reader.path}: --mpp must be a positive number of microns per pixel, got {override}")
        return (float(override), float(override)), "--mpp"
    if reader.mpp is None:
        raise SlideError(
            f"{reader.path}: the resolution (microns per pixel) is not in the slide's metadata; give it with "
            "--mpp (e.g. --mpp 0.25 for a 40x scan, --mpp 0.5 for 20x)"
        )
    return reader.mpp, "metadata"


# ----------------------------------------------------------------------------------------------------------
# The slide at a model's resolution
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Axis:
    """Sampling of one axis of the view: view pixel ``v`` is read at level pixel ``(v + 0.5) * ratio - 0.5``."""

    ratio: float  # level pixels per view pixel (1.0 and ``identity``: no resampling)
    length: int  # level pixels along this axis
    identity: bool

    def sigma(self) -> float:
        return max(0.0, (self.ratio - 1.0) / 2.0)

    def positions(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Integer left neighbour and weight of the right one for view pixels ``[start, stop)``."""
        s = (np.arange(start, stop, dtype=np.float64) + 0.5) * self.ratio - 0.5
        left = np.floor(s)
        return left.astype(np.int64), (s - left).astype(np.float32)


class ScaledView:
    """A slide at ``target_mpp`` (see "view" in the module docstring), read as numpy regions.

    Attributes: ``shape`` (rows, cols) of the view; ``level`` read; ``scale`` ``(y, x)`` level-0 pixels per view
    pixel; ``mpp`` ``(y, x)`` microns per view pixel (the target, or the level's own when read as it is);
    ``resampled``: whether pixels are interpolated.
    """

    def __init__(
        self,
        reader: SlideReader,
        slide_mpp: tuple[float, float],
        target_mpp: float,
        tolerance: float = DEFAULT_MPP_TOLERANCE,
    ) -> None:
        if not (math.isfinite(target_mpp) and target_mpp > 0):
            raise SlideError(f"{reader.path}: the model's mpp must be positive, got {target_mpp}")
        self.reader = reader
        mpp_x, mpp_y = slide_mpp
        want_x, want_y = target_mpp / mpp_x, target_mpp / mpp_y  # level-0 pixels per view pixel
        width0, height0 = reader.level_dimensions[0]
        # Per-axis downsample of each level from its true size (OpenSlide's level_downsamples is their mean).
        downs = [(width0 / w, height0 / h) for w, h in reader.level_dimensions]
        # The coarsest level at least as fine as the target (level 0 when even it is coarser: upsampling).
        fine_enough = [
            k for k, (dx, dy) in enumerate(downs) if dx <= want_x * (1 + tolerance) and dy <= want_y * (1 + tolerance)
        ]
        level = max(fine_enough, key=lambda k: downs[k][0] * downs[k][1], default=0)
        dx, dy = downs[level]
        width, height = reader.level_dimensions[level]
        same = abs(want_x / dx - 1) <= tolerance and abs(want_y / dy - 1) <= tolerance
        self.level = level
        self.resampled = not same
        if same:
            self.shape = (height, width)
            self.scale = (dy, dx)
            self._x, self._y = _Axis(1.0, width, True), _Axis(1.0, height, True)
        else:
            self.shape = (max(1, round(height0 / want_y)), max(1, round(width0 / want_x)))
            self.scale = (want_y, want_x)
            self._x, self._y = _Axis(want_x / dx, width, False), _Axis(want_y / dy, height, False)
        self.mpp = (mpp_y * self.scale[0], mpp_x * self.scale[1])
        self._level_origin = reader.level_downsamples[level]

    def _read_level(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """Level pixels ``[y0, y0 + height) x [x0, x0 + width)``, inside the level."""
        d = self._level_origin
        return self.reader.read_region((round(x0 * d), round(y0 * d)), self.level, (width, height))

    def read(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        """View pixels ``[row, row + height) x [col, col + width)`` as RGB ``uint8``; the box must lie in the view."""
        rows, cols = self.shape
        if height < 1 or width < 1 or row < 0 or col < 0 or row + height > rows or col + width > cols:
            raise SlideError(f"{self.reader.path}: view box {(row, col, height, width)} outside the view {self.shape}")
        if not self.resampled:
            return self._read_level(col, row, width, height)
        import cv2

        ys, wy = self._y.positions(row, row + height)
        xs, wx = self._x.positions(col, col + width)
        sigma_y, sigma_x = self._y.sigma(), self._x.sigma()
        pad_y, pad_x = math.ceil(3 * sigma_y) + 1, math.ceil(3 * sigma_x) + 1
        top, bottom = max(0, int(ys[0]) - pad_y), min(self._y.length, int(ys[-1]) + 2 + pad_y)
        left, right = max(0, int(xs[0]) - pad_x), min(self._x.length, int(xs[-1]) + 2 + pad_x)
        src = self._read_level(left, top, right - left, bottom - top)
        if sigma_x > 0 or sigma_y > 0:
            # Fixed kernel sizes and replicated borders: a pixel's value depends only on its neighbours, which the
            # pad keeps inside the region everywhere except at the slide's own edges (replicated there too).
            ksize = (2 * math.ceil(3 * sigma_x) + 1, 2 * math.ceil(3 * sigma_y) + 1)
            src = cv2.GaussianBlur(src, ksize, sigmaX=max(sigma_x, 1e-3), sigmaY=max(sigma_y, 1e-3),
                                   borderType=cv2.BORDER_REPLICATE)  # fmt: skip
        y_lo = np.clip(ys - top, 0, bottom - top - 1)
        y_hi = np.clip(ys + 1 - top, 0, bottom - top - 1)
        x_lo = np.clip(xs - left, 0, right - left - 1)
        x_hi = np.clip(xs + 1 - left, 0, right - left - 1)
        out = np.empty((height, width, 3), dtype=np.uint8)
        step = max(1, (1 << 22) // max(1, src.shape[1] * 3))  # rows per block: ~16 MB of float32 temporaries
        for r0 in range(0, height, step):
            r1 = min(height, r0 + step)
            w = wy[r0:r1, None, None]
            # Separate multiplies and adds (no fused operations): the same arithmetic for a pixel in every read.
            rows_f = src[y_lo[r0:r1]].astype(np.float32) * (1 - w) + src[y_hi[r0:r1]].astype(np.float32) * w
            v = wx[None, :, None]
            block = rows_f[:, x_lo] * (1 - v) + rows_f[:, x_hi] * v
            out[r0:r1] = np.clip(np.rint(block), 0, 255).astype(np.uint8)
        return out

    def level0_box(self, row: int, col: int, height: int, width: int) -> tuple[float, float, float, float]:
        """The level-0 extent ``(x0, y0, x1, y1)`` of a view box."""
        sy, sx = self.scale
        return col * sx, row * sy, (col + width) * sx, (row + height) * sy


def rescale(image: np.ndarray, mpp: float, target_mpp: float, tolerance: float = DEFAULT_MPP_TOLERANCE) -> np.ndarray:
    """An RGB ``uint8`` image at ``mpp`` um per pixel seen at ``target_mpp`` (the :class:`ScaledView` of an
    :class:`ArraySlide`); the image itself when the two agree within ``tolerance``."""
    view = ScaledView(ArraySlide(image, mpp), (mpp, mpp), target_mpp, tolerance)
    return image if not view.resampled else view.read(0, 0, *view.shape)


def resize_label(label: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A label (any integer map) brought to ``shape`` by nearest neighbour: output pixel centres looked up in
    the input, so :func:`rescale` then ``resize_label`` puts a nucleus back where it was."""
    label = np.asarray(label)
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * label.shape[0] / shape[0]).astype(np.int64), label.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * label.shape[1] / shape[1]).astype(np.int64), label.shape[1] - 1)
    return label[rows[:, None], cols[None, :]]


def read_thumbnail(reader: SlideReader, slide_mpp: tuple[float, float], target_mpp: float) -> np.ndarray:
    """The whole slide at about ``target_mpp`` (coarser than the model's: tissue detection, maps), ``uint8``
    RGB of ``round(level-0 size * slide_mpp / target_mpp)`` pixels a side (at least 1).

    Reads the coarsest level that is at least as fine as the target, in strips of whole output rows averaged
    by an integer factor (so a slide without a pyramid is never held whole), then resizes (area) to the size.
    """
    import cv2

    width0, height0 = reader.level_dimensions[0]
    out_h = max(1, round(height0 * slide_mpp[1] / target_mpp))
    out_w = max(1, round(width0 * slide_mpp[0] / target_mpp))
    level = 0
    for k, (w, h) in enumerate(reader.level_dimensions):
        if w >= out_w and h >= out_h:
            level = k if w * h < reader.level_dimensions[level][0] * reader.level_dimensions[level][1] else level
    width, height = reader.level_dimensions[level]
    factor = max(1, min(width // out_w, height // out_h))
    d = reader.level_downsamples[level]
    strip_rows = factor * max(1, (1 << 24) // max(1, width * 3 * factor))  # ~16 MB of level pixels per read
    parts = []
    for y in range(0, height, strip_rows):
        rows = min(strip_rows, height - y)
        strip = reader.read_region((0, round(y * d)), level, (width, rows))
        usable_r, usable_c = (rows // factor) * factor, (width // factor) * factor
        if usable_r == 0:
            continue  # a last sliver shorter than the factor: dropped (the final resize covers the size)
        block = strip[:usable_r, :usable_c].reshape(usable_r // factor, factor, usable_c // factor, factor, 3)
        parts.append(block.mean(axis=(1, 3), dtype=np.float32).round().astype(np.uint8))
    reduced = np.concatenate(parts) if parts else reader.read_region((0, 0), level, (width, height))
    if reduced.shape[:2] == (out_h, out_w):
        return reduced
    interpolation = cv2.INTER_AREA if reduced.shape[0] >= out_h else cv2.INTER_LINEAR
    return cv2.resize(reduced, (out_w, out_h), interpolation=interpolation)


__all__ = [
    "DEFAULT_MPP_TOLERANCE",
    "SLIDE_SUFFIXES",
    "ArraySlide",
    "ScaledView",
    "SlideError",
    "SlideReader",
    "is_slide",
    "list_slides",
    "open_slide",
    "read_thumbnail",
    "rescale",
    "resize_label",
    "resolve_mpp",
]
