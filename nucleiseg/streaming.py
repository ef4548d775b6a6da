"""A whole slide through the model in chunks: bounded memory, every nucleus found once, resumable.

Definitions
-----------
view pixels
    The slide at the model's resolution (:class:`nucleiseg.wsi.ScaledView`); all chunk geometry is in view
    pixels ``(row, col)``. Outputs are converted to level-0 slide pixels and micrometres.
inference tiles
    The tiling of :mod:`nucleiseg.infer` laid over the *whole view*: along an axis of ``L`` view pixels, tiles
    of ``tile`` pixels every ``stride = tile - overlap``, each keeping its central range (``axis_tiles``).
chunk
    A run of ``k = ceil(chunk / stride)`` consecutive inference tiles along each axis (about ``chunk`` pixels).
    Its *core* is the union of its tiles' kept ranges: the cores of all chunks partition the view. Its *margin*
    is ``e = ceil(margin_um / mpp / stride)`` more tiles on each side (fewer at the view's edges). The *read
    box* is the full extent of core and margin tiles: read as one image and given to the tiled predictor, whose
    tiles then fall exactly on the whole view's. The *exact box* is the union of the kept ranges of core and
    margin tiles: there the chunk's network output is the whole-view tiling's, pixel for pixel (only the outer
    overlap of the first and last tile differs, and is dropped).
ownership
    Post-processing (:func:`nucleiseg.postprocess.postprocess`, with every ``post`` setting) runs on the exact
    box; a nucleus belongs to the chunk whose core holds its centroid (the mean of its pixel centres, from exact
    integer sums), so each nucleus is reported by exactly one chunk. When the margin exceeds every nucleus (and
    the dilation radius), an owned nucleus lies wholly inside the exact box, with every neighbour it could
    touch, and is exactly what post-processing of the whole view gives: nothing cut, nothing counted twice,
    whatever the chunk size. An owned nucleus that reaches an inner edge of the exact box is larger than the
    margin: it is kept as found and counted as ``clipped`` (raise ``slide.margin_um``).
    Exact means the same network outputs, which holds as long as a tile's output does not depend on the other
    tiles in its batch; with ``batch_size`` 1 it never does, and with larger batches only floating-point
    kernel choices can differ (last-bit differences that change a pixel's class only at exact ties).
tissue
    The tissue mask of the thumbnail (:mod:`nucleiseg.tissue`, or the user's). Chunks whose core touches no
    tissue are never read; a nucleus whose centroid falls outside the mask is dropped, so the set of nuclei
    does not depend on which chunks happened to be processed.
stain
    A model trained on stain-normalised tiles gets the slide normalised with one estimate of the slide's stain
    (:class:`nucleiseg.stain.FixedSourceNormalizer`), measured on a mosaic of up to 16 tissue regions of
    256 x 256 view pixels, so that every chunk is normalised alike.
measurements
    :func:`nucleiseg.measure.nuclei_table` of the owned nuclei on the view's pixels (micrometre columns at the
    view's mpp), with ``_px`` columns and ``um_per_px`` converted to level-0 slide pixels. Ids follow the
    paper's encoding (``id % 3`` is the class), numbered per class in chunk order, then raster order of
    centroids within a chunk.
resume
    Each chunk's nuclei are committed atomically as one Parquet file (``<out>/.<name>.chunks/<key>.parquet``)
    in a work folder stamped with the run's *fingerprint* (slide file identity, model identity, every setting,
    the mpp, the mask). A rerun with the same fingerprint reuses the committed chunks; any other fingerprint
    empties the folder first. The final outputs are assembled from the committed chunks only, so an
    interrupted and resumed run ends with the same outputs as an uninterrupted one. The work folder is removed
    once the outputs are written.

Outputs per slide ``NAME`` (:func:`slide_output_paths`, each written atomically): ``NAME.geojson.gz`` (QuPath
detections in level-0 pixels, with class and measurements), ``NAME_nuclei.parquet`` (the measurement table),
``NAME_classmap.png`` (nuclei density coloured by majority class at ``map_mpp`` over a pale thumbnail),
``NAME_tissue.png`` (thumbnail with the tissue mask's outline), ``NAME_spatial.json`` / ``NAME_spatial.html`` (the
spatial statistics of the types, :mod:`nucleiseg.spatial_report`) and ``NAME_summary.json`` (model identity,
resolutions, chunks, nuclei per class, tissue area, timings; written last).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nucleiseg.tissue import TissueSettings
from nucleiseg.wsi import DEFAULT_MPP_TOLERANCE, ScaledView, SlideError, SlideReader, open_slide

if TYPE_CHECKING:
    import pandas as pd

    from nucleiseg.infer import InferSettings, PostSettings, Predictor

SUMMARY_FORMAT = 1
_STAIN_SAMPLE = 256  # view pixels per side of a stain sample region
_STAIN_REGIONS = 16
_CHUNK_META = b"nucleiseg.chunk"
_OWNED_ROWS = 256


@dataclass(frozen=True)
class SlideSettings:
    """Params section ``slide`` (definitions in the module docstring and :mod:`nucleiseg.tissue`)."""

    chunk: int = 5120
    margin_um: float = 30.0
    mpp_tolerance: float = DEFAULT_MPP_TOLERANCE
    map_mpp: float = 16.0
    tissue: TissueSettings = field(default_factory=TissueSettings)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SlideSettings:
        """From a params dump (``params.slide.model_dump()``)."""
        values = dict(values)
        tissue = TissueSettings(**dict(values.pop("tissue", {}) or {}))
        return cls(**values, tissue=tissue)


# ----------------------------------------------------------------------------------------------------------
# Chunks
# ----------------------------------------------------------------------------------------------------------

Box = tuple[int, int, int, int]  # (row0, row1, col0, col1), half-open, view pixels


@dataclass(frozen=True)
class Chunk:
    """One chunk (module docstring): grid position, and its core, exact and read boxes in view pixels."""

    row: int
    col: int
    core: Box
    exact: Box
    read: Box

    @property
    def key(self) -> str:
        return f"r{self.row:04d}_c{self.col:04d}"


def chunk_grid(shape: tuple[int, int], tile: int, overlap: int, chunk: int, margin_px: int) -> list[Chunk]:
    """Every chunk of a view of ``shape`` (rows, cols), in raster order (module docstring)."""
    from nucleiseg.infer import axis_tiles

    if chunk < 1 or margin_px < 0:
        raise ValueError(f"need chunk >= 1 and margin >= 0, got {chunk} and {margin_px}")
    stride = tile - overlap
    per_chunk = max(1, math.ceil(chunk / stride))
    # At least one margin tile: a chunk's last tile then never reflects past the chunk's start at the view's edge.
    margin_tiles = max(1, math.ceil(margin_px / stride))
    per_axis = []
    for length in shape:
        tiles = axis_tiles(length, tile, overlap)
        ranges = []
        for first in range(0, len(tiles), per_chunk):
            last = min(first + per_chunk, len(tiles)) - 1
            lo, hi = max(0, first - margin_tiles), min(len(tiles) - 1, last + margin_tiles)
            core = (tiles[first].keep_start, tiles[last].keep_stop)
            exact = (tiles[lo].keep_start, tiles[hi].keep_stop)
            read = (tiles[lo].start, min(length, tiles[hi].start + tile))
            ranges.append((core, exact, read))
        per_axis.append(ranges)
    return [
        Chunk(i, j, (*rc, *cc), (*re, *ce), (*rr, *cr))
        for i, (rc, re, rr) in enumerate(per_axis[0])
        for j, (cc, ce, cr) in enumerate(per_axis[1])
    ]


# ----------------------------------------------------------------------------------------------------------
# The plan of one slide
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SlidePlan:
    """Everything a chunk needs, small and picklable (so chunks can run in other processes)."""

    path: str
    name: str
    identity: str  # file_identity
    backend: str
    level_dimensions: list[tuple[int, int]]
    slide_mpp: tuple[float, float]  # (x, y) um per level-0 pixel
    mpp_source: str
    model_mpp: float
    mpp_tolerance: float
    view_level: int
    view_shape: tuple[int, int]
    view_scale: tuple[float, float]  # (y, x) level-0 pixels per view pixel
    view_mpp: tuple[float, float]
    resampled: bool
    infer: dict[str, Any]
    post: dict[str, Any]
    settings: dict[str, Any]
    margin_px: int
    mask: np.ndarray  # tissue mask at the thumbnail's resolution
    mask_source: str
    thumbnail_mpp: float
    chunks: list[Chunk]
    chunks_total: int
    stain: Any = None  # FixedSourceNormalizer | None
    stain_note: str = ""
    stain_matrix: Any = None  # the model's H and E vectors for the measurements (None: Ruifrok's)
    fingerprint: str = ""

    def chunk(self, key: str) -> Chunk:
        for chunk in self.chunks:
            if chunk.key == key:
                return chunk
        raise KeyError(f"{self.path}: no chunk {key}")

    def to_json(self) -> dict[str, Any]:
        """The plan without its mask (saved beside it as an image): :meth:`ChunkStore.save_plan`."""
        record = {k: v for k, v in self.__dict__.items() if k not in ("mask", "stain", "chunks", "stain_matrix")}
        record["chunks"] = [asdict(c) for c in self.chunks]
        record["stain_matrix"] = None if self.stain_matrix is None else np.asarray(self.stain_matrix).tolist()
        if self.stain is not None:
            record["stain"] = {"reference": self.stain.reference.to_dict(), "source": self.stain.source.to_dict()}
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any], mask: np.ndarray) -> SlidePlan:
        from nucleiseg.stain import FixedSourceNormalizer, StainNormalizer

        values = dict(record)
        values["chunks"] = [Chunk(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
                            for c in values["chunks"]]  # fmt: skip
        for key in ("slide_mpp", "view_shape", "view_scale", "view_mpp"):
            values[key] = tuple(values[key])
        values["level_dimensions"] = [tuple(d) for d in values["level_dimensions"]]
        stain = values.pop("stain", None)
        if stain is not None:
            stain = FixedSourceNormalizer(
                StainNormalizer.from_dict(stain["reference"]), StainNormalizer.from_dict(stain["source"])
            )
        matrix = values.pop("stain_matrix", None)
        return cls(**values, mask=mask, stain=stain, stain_matrix=None if matrix is None else np.asarray(matrix))

    def view(self, reader: SlideReader) -> ScaledView:
        return ScaledView(reader, self.slide_mpp, self.model_mpp, self.mpp_tolerance)

    def to_level0(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """View pixel positions (corner origin) to level-0 positions ``(x, y)``."""
        return cols * self.view_scale[1], rows * self.view_scale[0]

    def on_tissue(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Whether view positions (corner origin) fall on the tissue mask."""
        mh, mw = self.mask.shape
        width0, height0 = self.level_dimensions[0]
        x0, y0 = self.to_level0(rows, cols)
        my = np.clip(np.floor(y0 * mh / height0).astype(np.int64), 0, mh - 1)
        mx = np.clip(np.floor(x0 * mw / width0).astype(np.int64), 0, mw - 1)
        return self.mask[my, mx]

    def box_on_tissue(self, box: Box) -> bool:
        mh, mw = self.mask.shape
        width0, height0 = self.level_dimensions[0]
        sy, sx = self.view_scale
        r0 = max(0, math.floor(box[0] * sy * mh / height0))
        r1 = min(mh, math.ceil(box[1] * sy * mh / height0))
        c0 = max(0, math.floor(box[2] * sx * mw / width0))
        c1 = min(mw, math.ceil(box[3] * sx * mw / width0))
        return bool(self.mask[r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)].any())

    def describe(self) -> dict[str, Any]:
        """The plan as recorded in the summary (JSON-able)."""
        return {
            "slide": self.path,
            "backend": self.backend,
            "level0_size": list(self.level_dimensions[0]),
            "levels": len(self.level_dimensions),
            "slide_mpp": list(self.slide_mpp),
            "mpp_source": self.mpp_source,
            "model_mpp": self.model_mpp,
            "view": {
                "level": self.view_level,
                "size": [self.view_shape[1], self.view_shape[0]],
                "mpp": [self.view_mpp[1], self.view_mpp[0]],
                "level0_px_per_view_px": [self.view_scale[1], self.view_scale[0]],
                "resampled": self.resampled,
            },
            "infer": self.infer,
            "post": self.post,
            "settings": self.settings,
            "margin_px": self.margin_px,
            "tissue_mask": self.mask_source,
            "stain": self.stain_note,
        }


def slide_name(path: str | os.PathLike[str]) -> str:
    """Output name of a slide: its file name without the suffix (``.ome.tif`` counts as one suffix)."""
    name = Path(path).name
    lower = name.lower()
    for suffix in (".ome.tiff", ".ome.tif"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def file_identity(path: str | os.PathLike[str]) -> str:
    """A quick content identity of a slide file: resolved path, size, and the SHA-256 of its first and last MiB
    (where TIFF-based formats keep their headers and directories); modification times play no part, so a
    copy with kept times but other content is told apart without hashing gigabytes."""
    p = Path(path).resolve()
    size = p.stat().st_size
    digest = hashlib.sha256()
    with open(p, "rb") as fh:
        digest.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(size - (1 << 20))
        digest.update(fh.read(1 << 20))
    return f"{p}:{size}:sha256-ends:{digest.hexdigest()[:16]}"


def _stain_sample(view: ScaledView, plan: SlidePlan) -> np.ndarray | None:
    """A mosaic of up to 16 tissue regions of the view (evenly spread over the mask's tissue pixels)."""
    ys, xs = np.nonzero(plan.mask)
    if ys.size == 0:
        return None
    picks = np.unique(np.linspace(0, ys.size - 1, min(_STAIN_REGIONS, ys.size)).round().astype(np.int64))
    rows, cols = view.shape
    side_r, side_c = min(_STAIN_SAMPLE, rows), min(_STAIN_SAMPLE, cols)
    width0, height0 = plan.level_dimensions[0]
    mh, mw = plan.mask.shape
    regions = []
    for k in picks:
        # The mask pixel's centre in view pixels, the region centred on it and kept inside the view.
        cy = (ys[k] + 0.5) * height0 / mh / plan.view_scale[0]
        cx = (xs[k] + 0.5) * width0 / mw / plan.view_scale[1]
        r0 = int(min(max(0, cy - side_r / 2), rows - side_r))
        c0 = int(min(max(0, cx - side_c / 2), cols - side_c))
        regions.append(view.read(r0, c0, side_r, side_c))
    return np.concatenate(regions, axis=1)


def plan_slide(
    path: str | os.PathLike[str],
    *,
    model_mpp: float,
    infer: InferSettings,
    post: PostSettings,
    settings: SlideSettings = SlideSettings(),
    mpp: float | None = None,
    mask_path: str | os.PathLike[str] | None = None,
    stain: Any = None,
    model_identity: str = "",
    name: str | None = None,
) -> tuple[SlidePlan, np.ndarray]:
    """Open the slide, resolve its resolution, find its tissue and lay out its chunks.

    ``stain``: the model's fitted normaliser (``Predictor.stain``), measured on the slide here. Returns the plan
    and the thumbnail (at ``settings.tissue.mpp``). Raises :class:`nucleiseg.wsi.SlideError` for an unreadable
    slide or an unknown resolution, ``ValueError`` for a bad mask, naming the file.
    """
    from nucleiseg.stain import StainError, fixed_source
    from nucleiseg.tissue import detect_tissue, read_mask
    from nucleiseg.wsi import read_thumbnail, resolve_mpp

    path = Path(path)
    reader = open_slide(path)
    try:
        slide_mpp, mpp_source = resolve_mpp(reader, mpp)
        view = ScaledView(reader, slide_mpp, model_mpp, settings.mpp_tolerance)
        thumbnail = read_thumbnail(reader, slide_mpp, settings.tissue.mpp)
        if mask_path is not None:
            mask, mask_source = read_mask(mask_path, thumbnail.shape[:2]), str(mask_path)
        else:
            mask, mask_source = detect_tissue(thumbnail, settings.tissue.mpp, settings.tissue), "detected"
        view_mpp = (view.mpp[0] + view.mpp[1]) / 2
        margin_px = math.ceil(settings.margin_um / view_mpp)
        grid = chunk_grid(view.shape, infer.tile, infer.overlap, settings.chunk, margin_px)
        plan = SlidePlan(
            path=str(path),
            name=name or slide_name(path),
            identity=file_identity(path),
            backend=reader.backend,
            level_dimensions=[tuple(d) for d in reader.level_dimensions],
            slide_mpp=slide_mpp,
            mpp_source=mpp_source,
            model_mpp=model_mpp,
            mpp_tolerance=settings.mpp_tolerance,
            view_level=view.level,
            view_shape=view.shape,
            view_scale=view.scale,
            view_mpp=view.mpp,
            resampled=view.resampled,
            infer=dict(infer.__dict__),
            post=dict(post.__dict__),
            settings=asdict(settings),
            margin_px=margin_px,
            mask=mask,
            mask_source=mask_source,
            thumbnail_mpp=settings.tissue.mpp,
            chunks=[],
            chunks_total=len(grid),
        )
        plan.chunks = [c for c in grid if plan.box_on_tissue(c.core)]
        if stain is not None and getattr(stain, "method", "none") != "none":
            from nucleiseg.measure import stain_matrix_of

            plan.stain_matrix = stain_matrix_of(stain)
            sample = _stain_sample(view, plan)
            if sample is None:
                plan.stain_note = f"{stain.method}: no tissue, not measured"
            else:
                try:
                    plan.stain = fixed_source(stain, sample)
                    regions = sample.shape[1] // sample.shape[0]
                    plan.stain_note = f"{stain.method}, the slide's stain measured once on {regions} tissue regions"
                except StainError as exc:
                    plan.stain_note = f"{stain.method} skipped: {exc}"
        else:
            plan.stain_note = "none"
    finally:
        reader.close()
    plan.fingerprint = _fingerprint(plan, model_identity)
    return plan, thumbnail


def _fingerprint(plan: SlidePlan, model_identity: str) -> str:
    record = {
        "identity": plan.identity,
        "model": model_identity,
        "slide_mpp": plan.slide_mpp,
        "model_mpp": plan.model_mpp,
        "infer": plan.infer,
        "post": plan.post,
        "settings": plan.settings,
        "mask": hashlib.sha256(np.packbits(plan.mask).tobytes() + str(plan.mask.shape).encode()).hexdigest(),
        "stain": plan.to_json().get("stain"),  # the reference and the slide's measured source, or None
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# One chunk
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ChunkResult:
    """The nuclei a chunk owns (``table``: measurement columns plus ``polygon``, the flat ``[x0, y0, x1, y1,
    ...]`` ring in level-0 pixels; ``id`` still the chunk's own) and what it took."""

    key: str
    table: pd.DataFrame
    stats: dict[str, Any]


def _network(
    predictor: Predictor,
    image: np.ndarray,
    infer: Mapping[str, Any],
    exact: tuple[int, int, int, int],
    maps: slice = slice(None),
) -> tuple[np.ndarray, np.ndarray]:
    """Argmax classes (uint8) and float16 softmax ``maps`` (all 5, or the three nucleus maps for the class
    probability: 6 bytes a pixel instead of 10) of the exact box (read-box coordinates)."""
    from nucleiseg.infer import _argmax_channels, iter_tile_probabilities

    r0, r1, c0, c1 = exact
    classes = np.empty((r1 - r0, c1 - c0), dtype=np.uint8)
    probs: np.ndarray | None = None
    for rows, cols, p in iter_tile_probabilities(
        predictor.model, image, predictor.mean, predictor.std, infer["tile"], infer["overlap"],
        infer["batch_size"], infer["tta"], predictor.device,
    ):  # fmt: skip
        y0, y1 = max(rows.start, r0), min(rows.stop, r1)
        x0, x1 = max(cols.start, c0), min(cols.stop, c1)
        if y0 >= y1 or x0 >= x1:
            continue  # an outer overlap outside the exact box
        part = p[:, y0 - rows.start : y1 - rows.start, x0 - cols.start : x1 - cols.start]
        kept = part[maps]
        if probs is None:
            probs = np.empty((kept.shape[0], r1 - r0, c1 - c0), dtype=np.float16)
        # predict_classes' own argmax (first maximum on ties); the float16 cast as predict_probabilities'.
        classes[y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] = _argmax_channels(part[None])[0].cpu().numpy()
        probs[:, y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] = kept.cpu().numpy()
    assert probs is not None  # an exact box holds at least one tile's kept range
    return classes, probs


def _owned(label: np.ndarray, plan: SlidePlan, chunk: Chunk) -> tuple[np.ndarray, int]:
    """Ids of ``label`` (exact-box coordinates) the chunk owns (centroid in its core and on tissue), and how
    many of them reach an inner edge of the exact box (clipped)."""
    top = int(label.max()) if label.size else 0
    if top == 0:
        return np.zeros(0, dtype=np.int64), 0
    r0, _, c0, _ = chunk.exact
    n = np.zeros(top + 1, dtype=np.int64)
    sum_r = np.zeros(top + 1, dtype=np.float64)  # integer sums below 2^53: exact in float64
    sum_c = np.zeros(top + 1, dtype=np.float64)
    cols = np.arange(c0, c0 + label.shape[1], dtype=np.float64)
    for y in range(0, label.shape[0], _OWNED_ROWS):  # row blocks: no full-size temporaries
        block = label[y : y + _OWNED_ROWS]
        counts = np.bincount(block.ravel(), minlength=top + 1)
        n += counts
        rows = np.arange(r0 + y, r0 + y + block.shape[0], dtype=np.float64)
        sum_r += np.bincount(block.ravel(), weights=np.repeat(rows, block.shape[1]), minlength=top + 1)
        sum_c += np.bincount(block.ravel(), weights=np.tile(cols, block.shape[0]), minlength=top + 1)
    present = np.flatnonzero(n)
    present = present[present > 0]
    cy = sum_r[present] / n[present] + 0.5  # pixel centres, corner origin
    cx = sum_c[present] / n[present] + 0.5
    core = chunk.core
    inside = (cy >= core[0]) & (cy < core[1]) & (cx >= core[2]) & (cx < core[3])
    keep = present[inside & plan.on_tissue(cy, cx)]
    # Clipped: touches an edge of the exact box that is not the view's own edge.
    rows_v, cols_v = plan.view_shape
    edges = [
        label[0] if chunk.exact[0] > 0 else None,
        label[-1] if chunk.exact[1] < rows_v else None,
        label[:, 0] if chunk.exact[2] > 0 else None,
        label[:, -1] if chunk.exact[3] < cols_v else None,
    ]
    touching = np.unique(np.concatenate([e for e in edges if e is not None] or [np.zeros(0, label.dtype)]))
    clipped = int(np.isin(keep, touching).sum())
    return keep, clipped


def segment_chunk(
    plan: SlidePlan, chunk: Chunk, predictor: Predictor, reader: SlideReader | None = None
) -> ChunkResult:
    """Read, predict, post-process and measure one chunk; return the nuclei it owns (module docstring).

    ``reader``: an open slide to read from (each process or thread may pass its own); None opens the plan's.
    """
    from nucleiseg.export import nucleus_polygons
    from nucleiseg.measure import nuclei_table
    from nucleiseg.postprocess import needs_probabilities, postprocess

    timings: dict[str, float] = {}
    started = time.perf_counter()
    own_reader = reader is None
    reader = open_slide(plan.path) if reader is None else reader
    try:
        view = plan.view(reader)
        r0, r1, c0, c1 = chunk.read
        image = view.read(r0, c0, r1 - r0, c1 - c0)
    finally:
        if own_reader:
            reader.close()
    prepared = image if plan.stain is None else plan.stain.transform(image)
    timings["read"] = time.perf_counter() - started

    t = time.perf_counter()
    e0, e1, f0, f1 = chunk.exact
    exact_local = (e0 - r0, e1 - r0, f0 - c0, f1 - c0)
    method, classify = plan.post.get("method", "paper"), plan.post.get("classify", "vote")
    all_maps = needs_probabilities(method, classify)
    classes, probs = _network(predictor, prepared, plan.infer, exact_local, slice(None) if all_maps else slice(1, 4))
    del prepared
    timings["network"] = time.perf_counter() - t

    t = time.perf_counter()
    label = postprocess(probs if all_maps else classes, **plan.post)
    del classes
    keep, clipped = _owned(label, plan, chunk)
    owned = np.zeros(int(label.max()) + 1, dtype=bool)
    owned[keep] = True
    label[~owned[label]] = 0
    timings["post"] = time.perf_counter() - t

    t = time.perf_counter()
    view_mpp = (plan.view_mpp[0] + plan.view_mpp[1]) / 2
    image_exact = image[exact_local[0] : exact_local[1], exact_local[2] : exact_local[3]]
    table = nuclei_table(label, image_exact, mpp=view_mpp, probs=probs, stain_matrix=plan.stain_matrix,
                         image_name=plan.name, offset=(e0, f0))  # fmt: skip
    del probs
    rings = nucleus_polygons(label) if len(table) else {}
    sy, sx = plan.view_scale
    polygons = []
    for nucleus_id in table["id"].tolist():
        ring = rings[int(nucleus_id)].astype(np.float64)
        ring[:, 0] = (ring[:, 0] + f0) * sx
        ring[:, 1] = (ring[:, 1] + e0) * sy
        polygons.append(ring.ravel().tolist())
    table["polygon"] = polygons
    # Level-0 pixels for the _px columns (the um columns are the same at any resolution).
    table["centroid_x_px"] *= sx
    table["centroid_y_px"] *= sy
    table["um_per_px"] = (plan.slide_mpp[0] + plan.slide_mpp[1]) / 2
    table = table.sort_values(["centroid_y_px", "centroid_x_px"], kind="stable", ignore_index=True)
    timings["measure"] = time.perf_counter() - t
    stats = {
        "key": chunk.key,
        "nuclei": len(table),
        "clipped": clipped,
        "pixels": (chunk.core[1] - chunk.core[0]) * (chunk.core[3] - chunk.core[2]),
        "seconds": {k: round(v, 3) for k, v in timings.items()},
    }
    return ChunkResult(chunk.key, table, stats)


# ----------------------------------------------------------------------------------------------------------
# Committed chunks
# ----------------------------------------------------------------------------------------------------------


def work_dir(out_dir: str | os.PathLike[str], name: str) -> Path:
    return Path(out_dir) / f".{name}.chunks"


class ChunkStore:
    """The committed chunks of one slide run (see "resume" in the module docstring)."""

    STAMP = "fingerprint"

    def __init__(self, folder: str | os.PathLike[str], fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def open(self) -> ChunkStore:
        """Create the folder, or empty it when it holds another run's chunks; returns self."""
        from nucleiseg.io import write_text_atomic

        self.folder.mkdir(parents=True, exist_ok=True)
        stamp = self.folder / self.STAMP
        before = stamp.read_text().strip() if stamp.is_file() else None
        if before != self.fingerprint:
            for part in self.folder.glob("*.parquet"):
                part.unlink()
            write_text_atomic(stamp, self.fingerprint + "\n")
        return self

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.parquet"

    def save_plan(self, plan: SlidePlan) -> None:
        """Write the plan (``plan.json``, ``mask.png``) for chunk tasks in other processes."""
        from nucleiseg.io import write_image, write_json_atomic

        write_image(self.folder / "mask.png", plan.mask.astype(np.uint8) * 255)
        write_json_atomic(self.folder / "plan.json", plan.to_json())

    def load_plan(self) -> SlidePlan:
        from nucleiseg.io import read_raw

        record = json.loads((self.folder / "plan.json").read_text(encoding="utf-8"))
        if record.get("fingerprint") != self.fingerprint:
            raise RuntimeError(f"{self.folder}: the saved plan belongs to another run")
        return SlidePlan.from_json(record, read_raw(self.folder / "mask.png") > 0)

    def done(self, key: str) -> bool:
        return self.path(key).is_file()

    def commit(self, result: ChunkResult) -> None:
        """Write a chunk's nuclei and stats as one Parquet file, atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from nucleiseg.io import atomic_path

        table = pa.Table.from_pandas(result.table, preserve_index=False)
        meta = dict(table.schema.metadata or {})
        meta[_CHUNK_META] = json.dumps(result.stats).encode()
        with atomic_path(self.path(result.key)) as tmp:
            pq.write_table(table.replace_schema_metadata(meta), tmp)

    def load(self, key: str) -> tuple[pd.DataFrame, dict[str, Any]]:
        import pyarrow.parquet as pq

        table = pq.read_table(self.path(key))
        stats = json.loads((table.schema.metadata or {}).get(_CHUNK_META, b"{}"))
        return table.to_pandas(), stats

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Outputs of a slide
# ----------------------------------------------------------------------------------------------------------


def slide_output_paths(out_dir: str | os.PathLike[str], name: str) -> dict[str, Path]:
    """Where :func:`finish_slide` writes the outputs of slide ``name`` (the summary last)."""
    from nucleiseg.spatial_report import report_paths

    out = Path(out_dir)
    spatial = report_paths(out, name)
    return {
        "geojson": out / f"{name}.geojson.gz",
        "nuclei": out / f"{name}_nuclei.parquet",
        "classmap": out / f"{name}_classmap.png",
        "tissue": out / f"{name}_tissue.png",
        "spatial_json": spatial["json"],
        "spatial_html": spatial["html"],
        "summary": out / f"{name}_summary.json",
    }


def previous_summary(out_dir: str | os.PathLike[str], name: str, fingerprint: str) -> dict[str, Any] | None:
    """The summary of slide ``name`` in ``out_dir`` when a finished run with this ``fingerprint`` (same slide,
    model and settings) wrote it and every output it lists still exists; else None."""
    try:
        summary = json.loads(slide_output_paths(out_dir, name)["summary"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("fingerprint") != fingerprint:
        return None
    if not all(Path(p).is_file() for p in (summary.get("outputs") or {}).values()):
        return None
    return summary


def _parts(plan: SlidePlan, store: ChunkStore) -> Iterator[tuple[pd.DataFrame, dict[str, Any]]]:
    for chunk in plan.chunks:
        if not store.done(chunk.key):
            raise RuntimeError(f"{plan.path}: chunk {chunk.key} has no committed result")
        yield store.load(chunk.key)


def _class_map(plan: SlidePlan, thumbnail: np.ndarray, xs: np.ndarray, ys: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Nuclei density coloured by majority class at ``map_mpp``, over a pale grey thumbnail."""
    import cv2

    from nucleiseg.palette import CLASS_COLORS

    width0, height0 = plan.level_dimensions[0]
    map_mpp = float(plan.settings["map_mpp"])
    h = max(1, round(height0 * plan.slide_mpp[1] / map_mpp))
    w = max(1, round(width0 * plan.slide_mpp[0] / map_mpp))
    grey = cv2.cvtColor(cv2.resize(thumbnail, (w, h), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
    out = np.repeat((grey.astype(np.float32) * 0.35 + 160)[..., None], 3, axis=2)
    if xs.size:
        counts = np.zeros((3, h, w), dtype=np.float32)
        my = np.clip((ys * h / height0).astype(np.int64), 0, h - 1)
        mx = np.clip((xs * w / width0).astype(np.int64), 0, w - 1)
        np.add.at(counts, (cls, my, mx), 1.0)
        total = counts.sum(axis=0)
        alpha = np.clip(total / max(float(np.percentile(total[total > 0], 95)), 1.0), 0, 1)[..., None] * 0.9
        colour = np.asarray(CLASS_COLORS, dtype=np.float32)[counts.argmax(axis=0)]
        out = out * (1 - alpha) + colour * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _arrow_schema(table: pd.DataFrame) -> Any:
    """The Parquet schema of a measurement table: text columns as strings, the rest as their numpy types."""
    import pyarrow as pa
    from pandas.api.types import is_numeric_dtype

    return pa.schema(
        [
            pa.field(c, pa.from_numpy_dtype(table[c].dtype) if is_numeric_dtype(table[c]) else pa.string())
            for c in table.columns
        ]
    )


def finish_slide(
    plan: SlidePlan,
    store: ChunkStore,
    out_dir: str | os.PathLike[str],
    thumbnail: np.ndarray,
    *,
    model: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
    reused: int = 0,
    spatial: Any = None,
) -> dict[str, Any]:
    """Assemble the committed chunks into the slide's outputs (module docstring), write them atomically (the
    summary last), remove the work folder, and return the summary.

    ``spatial``: :class:`nucleiseg.spatial.SpatialSettings` of the spatial report
    (:func:`nucleiseg.spatial_report.write_spatial_report`, on the whole table; None: its defaults; False: no
    report)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nucleiseg.export import detection_feature
    from nucleiseg.io import atomic_path, write_image, write_json_atomic
    from nucleiseg.labels import CLASS_NAMES
    from nucleiseg.measure import nuclei_table
    from nucleiseg.tissue import outline

    started = time.perf_counter()
    paths = slide_output_paths(out_dir, plan.name)
    next_index = [1, 0, 0]  # per class, the next k of id 3k + c (tumor starts at 3: 0 is background)
    per_class = [0, 0, 0]
    clipped = 0
    chunk_seconds: dict[str, float] = {}
    xs, ys, cls = [], [], []
    empty = nuclei_table(np.zeros((1, 1), np.int32), np.zeros((1, 1, 3), np.uint8), mpp=1.0)
    schema = _arrow_schema(empty)
    with (
        atomic_path(paths["nuclei"]) as parquet_tmp,
        atomic_path(paths["geojson"]) as geojson_tmp,
        gzip.open(geojson_tmp, "wt", encoding="utf-8", compresslevel=6) as geojson,
    ):
        writer: pq.ParquetWriter | None = None
        geojson.write('{"type":"FeatureCollection","features":[')
        first = True
        for part, stats in _parts(plan, store):
            clipped += int(stats.get("clipped", 0))
            for k, v in (stats.get("seconds") or {}).items():
                chunk_seconds[k] = chunk_seconds.get(k, 0.0) + float(v)
            if not len(part):
                continue
            classes = part["id"].to_numpy() % 3
            ids = np.empty(len(part), dtype=np.int64)
            for c in range(3):
                members = np.flatnonzero(classes == c)
                ids[members] = 3 * (next_index[c] + np.arange(members.size)) + c
                next_index[c] += members.size
                per_class[c] += members.size
            part = part.assign(id=ids)
            xs.append(part["centroid_x_px"].to_numpy())
            ys.append(part["centroid_y_px"].to_numpy())
            cls.append(classes)
            polygons = part.pop("polygon")
            numeric = [c for c in part.columns if c not in ("image", "class", "id")]
            values = part[numeric].to_numpy(dtype=np.float64)
            for nucleus_id, flat, row in zip(ids.tolist(), polygons, values.tolist(), strict=True):
                ring = np.asarray(flat, dtype=np.float64).reshape(-1, 2)
                coords = (
                    ring.astype(np.int64).tolist() if np.all(ring == np.round(ring)) else np.round(ring, 2).tolist()
                )
                measurements = {c: v for c, v in zip(numeric, row, strict=True) if math.isfinite(v)}
                feature = detection_feature(coords, nucleus_id, measurements, plan.name)
                geojson.write(("" if first else ",") + json.dumps(feature, separators=(",", ":")))
                first = False
            table = pa.Table.from_pandas(part[list(empty.columns)], schema=schema, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(parquet_tmp, schema)
            writer.write_table(table)
        geojson.write("]}\n")
        if writer is None:
            pq.write_table(pa.Table.from_pandas(empty, schema=schema, preserve_index=False), parquet_tmp)
        else:
            writer.close()
    all_x = np.concatenate(xs) if xs else np.zeros(0)
    all_y = np.concatenate(ys) if ys else np.zeros(0)
    all_c = np.concatenate(cls) if cls else np.zeros(0, dtype=np.int64)
    write_image(paths["classmap"], _class_map(plan, thumbnail, all_x, all_y, all_c))
    write_image(paths["tissue"], outline(thumbnail, plan.mask))
    import pandas as pd

    from nucleiseg.spatial_report import write_spatial_report

    width0, height0 = plan.level_dimensions[0]
    spatial_note = "not asked for"
    if spatial is not False:
        try:
            write_spatial_report(
                pd.read_parquet(paths["nuclei"]), out_dir, mpp=(plan.slide_mpp[0] + plan.slide_mpp[1]) / 2,
                tissue_mask=plan.mask, thumbnail=thumbnail, image_shape=(height0, width0), settings=spatial,
                name=plan.name,
            )  # fmt: skip
            spatial_note = "written"
        except Exception as exc:  # the statistics come after the segmentation: never lose a slide's nuclei to them
            spatial_note = f"failed: {type(exc).__name__}: {exc}"
    if spatial_note != "written":
        del paths["spatial_json"], paths["spatial_html"]
    tissue_mm2 = float(plan.mask.sum()) * (plan.thumbnail_mpp / 1000.0) ** 2
    nuclei = int(sum(per_class))
    summary = {
        "format": SUMMARY_FORMAT,
        "name": plan.name,
        "fingerprint": plan.fingerprint,
        "model": dict(model or {}),
        **plan.describe(),
        "chunks": {
            "total": plan.chunks_total,
            "on_tissue": len(plan.chunks),
            "computed": len(plan.chunks) - reused,
            "reused": reused,
        },
        "tissue_mm2": round(tissue_mm2, 4),
        "nuclei": nuclei,
        "per_class": {name: int(n) for name, n in zip(CLASS_NAMES, per_class, strict=True)},
        "nuclei_per_mm2": round(nuclei / tissue_mm2, 2) if tissue_mm2 > 0 else None,
        "clipped": clipped,
        "spatial_report": spatial_note,
        "seconds": {
            **{k: round(v, 3) for k, v in (timings or {}).items()},
            "chunks_total_by_step": {k: round(v, 3) for k, v in chunk_seconds.items()},
            "finish": round(time.perf_counter() - started, 3),
        },
        "outputs": {k: str(v) for k, v in paths.items()},
    }
    write_json_atomic(paths["summary"], summary)
    store.remove()
    return summary


# ----------------------------------------------------------------------------------------------------------
# One slide, start to end, in this process
# ----------------------------------------------------------------------------------------------------------


def segment_slide(
    path: str | os.PathLike[str],
    predictor: Predictor,
    out_dir: str | os.PathLike[str],
    *,
    infer: InferSettings | None = None,
    post: PostSettings | None = None,
    settings: SlideSettings = SlideSettings(),
    mpp: float | None = None,
    mask_path: str | os.PathLike[str] | None = None,
    model: Mapping[str, Any] | None = None,
    spatial: Any = None,
    on_plan: Callable[[SlidePlan, int], None] | None = None,
    on_chunk: Callable[[ChunkResult | None], None] | None = None,
) -> dict[str, Any]:
    """Segment one slide into ``out_dir`` with ``predictor``: plan, every chunk not yet committed (one after
    the other; the network uses all the threads torch has), then the outputs. Returns the summary.

    ``model``: the model's identity for the summary and the resume fingerprint (``{"identity": ...}``).
    ``spatial``: settings of the spatial report (:func:`finish_slide`). A slide already finished in ``out_dir`` with
    the same slide, model and settings (:func:`previous_summary`) is not computed again: its summary is returned,
    with ``reused_outputs: True``.
    ``on_plan(plan, reused)`` is called once the chunks are known, ``on_chunk(result)`` after each computed chunk
    (``None`` for each reused one): progress reporting. Settings default to the predictor's.
    """
    infer = infer or predictor.infer
    post = post or predictor.post
    started = time.perf_counter()
    plan, thumbnail = plan_slide(
        path, model_mpp=predictor.mpp, infer=infer, post=post, settings=settings, mpp=mpp, mask_path=mask_path,
        stain=predictor.stain, model_identity=str((model or {}).get("identity", predictor.source)),
    )  # fmt: skip
    planned = time.perf_counter()
    previous = previous_summary(out_dir, plan.name, plan.fingerprint)
    if previous is not None:
        if on_plan is not None:
            on_plan(plan, len(plan.chunks))
        return {**previous, "reused_outputs": True}
    store = ChunkStore(work_dir(out_dir, plan.name), plan.fingerprint).open()
    todo = [c for c in plan.chunks if not store.done(c.key)]
    reused = len(plan.chunks) - len(todo)
    if on_plan is not None:
        on_plan(plan, reused)
    if on_chunk is not None:
        for _ in range(reused):
            on_chunk(None)
    if todo:
        reader = open_slide(plan.path)
        try:
            for chunk in todo:
                result = segment_chunk(plan, chunk, predictor, reader)
                store.commit(result)
                if on_chunk is not None:
                    on_chunk(result)
        finally:
            reader.close()
    computed = time.perf_counter()
    timings = {"plan": planned - started, "chunks": computed - planned}
    return finish_slide(plan, store, out_dir, thumbnail, model=model, timings=timings, reused=reused, spatial=spatial)


__all__ = [
    "Chunk",
    "ChunkResult",
    "ChunkStore",
    "SlideError",
    "SlidePlan",
    "SlideSettings",
    "chunk_grid",
    "file_identity",
    "finish_slide",
    "plan_slide",
    "previous_summary",
    "segment_chunk",
    "segment_slide",
    "slide_name",
    "slide_output_paths",
    "work_dir",
]
