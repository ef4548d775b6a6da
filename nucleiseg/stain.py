"""Stain normalisation of H&E tiles: Reinhard and Macenko, fitted on one reference tile.

Both methods map the colours of a tile onto those of a reference tile so that the network sees a
consistent stain appearance across slides, scanners and labs:

- **Reinhard** (Reinhard et al., 2001): match the per-channel mean and standard deviation of the tile,
  in CIE L*a*b*, to those of the reference.
- **Macenko** (Macenko et al., ISBI 2009): in optical density (OD = -log(I / Io)), estimate the tile's
  haematoxylin and eosin stain vectors from the extreme angles of its tissue pixels in the plane of the
  two main eigenvectors, unmix every pixel into H and E concentrations, rescale these so that their
  99th percentiles match the reference's, and re-mix them with the reference stain vectors.

The numerics follow torchstain's numpy backend (Io = 240, alpha = 1, beta = 0.15, stain vectors ordered
H first), reimplemented here rather than depended upon. ``none`` is the identity.

A fitted normaliser is a few numbers: :meth:`StainNormalizer.save` writes them as a small JSON file that
the pipeline versions, and :func:`load_normalizer` restores a normaliser that gives bit-identical output,
so inference normalises exactly as training did.

Tiles with little tissue: a pixel is *tissue* when its optical density is at least ``beta`` in every
channel (torchstain's criterion). When fewer than ``min_tissue`` (a fraction, default 1%) of a tile's
pixels are tissue, there is no stain to measure: :meth:`StainNormalizer.transform` returns the tile
unchanged and warns (``StainWarning``) instead of producing NaN or tinting the glass. The same happens if
a Macenko estimate comes out degenerate (non-finite, or a zero concentration percentile). Fitting on such
a reference raises :class:`StainError`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from nucleiseg.io import write_json_atomic

METHODS = ("none", "reinhard", "macenko")
FORMAT_VERSION = 1

# torchstain / Macenko defaults.
IO = 240.0  # transmitted light intensity
BETA = 0.15  # OD threshold for a tissue pixel
ALPHA = 1.0  # percentile of the extreme angles
MIN_TISSUE = 0.01  # fraction of tissue pixels below which a tile is left as it is
_MIN_TISSUE_PIXELS = 10  # absolute floor so the eigen-decomposition and percentiles are defined


class StainError(ValueError):
    """A normaliser cannot be fitted or loaded; the message says why (and names the file)."""


class StainWarning(UserWarning):
    """A tile was left unnormalised (too little tissue, or a degenerate stain estimate)."""


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image H x W x 3, got {rgb.dtype} {rgb.shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"empty image {rgb.shape}")
    return rgb


def optical_density(rgb: np.ndarray, io: float = IO) -> np.ndarray:
    """Optical density ``-log((I + 1) / Io)`` per pixel and channel, float32 of shape (N, 3)."""
    flat = rgb.reshape(-1, 3).astype(np.float32)
    return -np.log((flat + 1.0) / np.float32(io))


def tissue_fraction(rgb: np.ndarray, io: float = IO, beta: float = BETA) -> float:
    """Fraction of pixels whose optical density is at least ``beta`` in all three channels."""
    n_tissue, n_pixels = _tissue_count(_check_rgb(rgb), io, beta)
    return n_tissue / n_pixels


def _tissue_count(rgb: np.ndarray, io: float, beta: float) -> tuple[int, int]:
    od = optical_density(rgb, io)
    return int(np.all(od >= beta, axis=1).sum()), od.shape[0]


def _enough_tissue(n_tissue: int, n_pixels: int, min_tissue: float) -> bool:
    return n_tissue >= max(_MIN_TISSUE_PIXELS, min_tissue * n_pixels)


@dataclass
class StainNormalizer:
    """Base class: the identity (``method = "none"``). Subclasses hold the fitted reference statistics."""

    method: ClassVar[str] = "none"
    min_tissue: float = MIN_TISSUE

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        """Normalise an RGB uint8 tile; returns a new RGB uint8 array of the same shape."""
        return _check_rgb(rgb).copy()

    def _params(self) -> dict[str, Any]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        """The fitted normaliser as plain JSON-able values (``from_dict`` restores it exactly)."""
        return {"format": FORMAT_VERSION, "method": self.method, "min_tissue": self.min_tissue, **self._params()}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> StainNormalizer:
        """Rebuild a normaliser written by :meth:`to_dict`; raises :class:`StainError` on bad content."""
        if not isinstance(data, dict):
            raise StainError(f"expected a mapping, got {type(data).__name__}")
        method = data.get("method")
        if method not in METHODS:
            raise StainError(f"unknown stain method {method!r}; expected one of {', '.join(METHODS)}")
        if data.get("format", FORMAT_VERSION) != FORMAT_VERSION:
            raise StainError(f"unsupported stain normaliser format {data.get('format')!r}")
        try:
            min_tissue = float(data.get("min_tissue", MIN_TISSUE))
            if method == "none":
                return StainNormalizer(min_tissue=min_tissue)
            if method == "reinhard":
                return ReinhardNormalizer(
                    mean=_vector(data["mean"], 3, "mean"), std=_vector(data["std"], 3, "std"), min_tissue=min_tissue
                )
            stain_matrix = np.asarray(data["stain_matrix"], dtype=np.float64)
            if stain_matrix.shape != (3, 2) or not np.all(np.isfinite(stain_matrix)):
                raise StainError(f"stain_matrix must be 3 x 2 finite numbers, got {data['stain_matrix']!r}")
            return MacenkoNormalizer(
                stain_matrix=stain_matrix,
                max_concentration=_vector(data["max_concentration"], 2, "max_concentration"),
                io=float(data.get("io", IO)),
                alpha=float(data.get("alpha", ALPHA)),
                beta=float(data.get("beta", BETA)),
                min_tissue=min_tissue,
            )
        except KeyError as exc:
            raise StainError(f"{method} normaliser is missing the field {exc.args[0]!r}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the normaliser as a small JSON file, atomically."""
        write_json_atomic(path, self.to_dict())

    def _fallback(self, rgb: np.ndarray, why: str) -> np.ndarray:
        warnings.warn(f"{self.method} stain normalisation skipped: {why}; tile returned unchanged", StainWarning, 3)
        return rgb.copy()


def _vector(values: Any, n: int, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (n,) or not np.all(np.isfinite(array)):
        raise StainError(f"{name} must be {n} finite numbers, got {values!r}")
    return array


# --- Reinhard ---------------------------------------------------------------------------------------


def _rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    import cv2

    # float32 input gives true CIE L*a*b* (L in 0..100), not OpenCV's 8-bit rescaled version.
    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def _lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    import cv2

    rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = _rgb_to_lab(rgb).reshape(-1, 3).astype(np.float64)
    return lab.mean(axis=0), lab.std(axis=0)


@dataclass
class ReinhardNormalizer(StainNormalizer):
    """Match mean and std per L*a*b* channel to the reference's (``mean``, ``std``)."""

    method: ClassVar[str] = "reinhard"
    mean: np.ndarray = field(default_factory=lambda: np.zeros(3))
    std: np.ndarray = field(default_factory=lambda: np.ones(3))

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        rgb = _check_rgb(rgb)
        n_tissue, n_pixels = _tissue_count(rgb, IO, BETA)
        if not _enough_tissue(n_tissue, n_pixels, self.min_tissue):
            return self._fallback(rgb, f"only {n_tissue / n_pixels:.2%} of the pixels are tissue")
        lab = _rgb_to_lab(rgb).astype(np.float64)
        flat = lab.reshape(-1, 3)
        mean, std = flat.mean(axis=0), flat.std(axis=0)
        # A flat channel has nothing to rescale: only shift it.
        scale = np.where(std > 1e-6, self.std / np.maximum(std, 1e-6), 1.0)
        out = (lab - mean) * scale + self.mean
        return _lab_to_rgb(out)

    def _params(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}


# --- Macenko ----------------------------------------------------------------------------------------


def _stain_matrix(od_tissue: np.ndarray, alpha: float) -> np.ndarray:
    """H and E unit OD vectors (columns, H first) from the tissue pixels' extreme angles."""
    plane = _plane(np.cov(od_tissue.T.astype(np.float64)))
    min_phi, max_phi = np.percentile(_angles(od_tissue, plane), [alpha, 100 - alpha])
    return _stain_vectors(plane, min_phi, max_phi)


def _plane(covariance: np.ndarray) -> np.ndarray:
    """The plane of the two main eigenvectors of the tissue OD covariance (3 x 2, largest eigenvalues)."""
    return np.linalg.eigh(covariance)[1][:, 1:3]


def _angles(od_tissue: np.ndarray, plane: np.ndarray) -> np.ndarray:
    """The angle of every tissue pixel's OD in ``plane``."""
    projected = od_tissue @ plane
    return np.arctan2(projected[:, 1], projected[:, 0])


def _stain_vectors(plane: np.ndarray, min_phi: float, max_phi: float) -> np.ndarray:
    """The H and E vectors at the extreme angles (columns, H first)."""
    v_min = plane @ np.array([np.cos(min_phi), np.sin(min_phi)])
    v_max = plane @ np.array([np.cos(max_phi), np.sin(max_phi)])
    # Eigenvectors have an arbitrary sign; stain OD vectors are positive.
    v_min = v_min if v_min.sum() >= 0 else -v_min
    v_max = v_max if v_max.sum() >= 0 else -v_max
    # Haematoxylin absorbs more red than eosin does: the vector with the larger red OD is H.
    return np.stack([v_min, v_max], axis=1) if v_min[0] > v_max[0] else np.stack([v_max, v_min], axis=1)


def _concentrations(od: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """Least-squares H and E concentrations, shape (2, N)."""
    return np.linalg.pinv(stain_matrix) @ od.T.astype(np.float64)


def _macenko_estimate(
    rgb: np.ndarray, io: float, alpha: float, beta: float, min_tissue: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """(stain matrix, concentrations, 99th percentiles) of a tile, or the reason it cannot be estimated."""
    od = optical_density(rgb, io)
    tissue = np.all(od >= beta, axis=1)
    n_tissue = int(tissue.sum())
    if not _enough_tissue(n_tissue, od.shape[0], min_tissue):
        return f"only {n_tissue / od.shape[0]:.2%} of the pixels are tissue (need {min_tissue:.2%})"
    with np.errstate(all="ignore"):
        stain_matrix = _stain_matrix(od[tissue], alpha)
        if not np.all(np.isfinite(stain_matrix)):
            return "the stain vectors could not be estimated"
        concentrations = _concentrations(od, stain_matrix)
        max_c = np.percentile(concentrations, 99, axis=1)
    if not (np.all(np.isfinite(max_c)) and np.all(max_c > 1e-6)):
        return f"degenerate stain concentrations (99th percentiles {max_c.tolist()})"
    return stain_matrix, concentrations, max_c


@dataclass
class MacenkoNormalizer(StainNormalizer):
    """Re-mix each tile's H and E concentrations with the reference stain vectors and scale."""

    method: ClassVar[str] = "macenko"
    # torchstain's defaults, used until fitted.
    stain_matrix: np.ndarray = field(
        default_factory=lambda: np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
    )
    max_concentration: np.ndarray = field(default_factory=lambda: np.array([1.9705, 1.0308]))
    io: float = IO
    alpha: float = ALPHA
    beta: float = BETA

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        rgb = _check_rgb(rgb)
        estimate = _macenko_estimate(rgb, self.io, self.alpha, self.beta, self.min_tissue)
        if isinstance(estimate, str):
            return self._fallback(rgb, estimate)
        _, concentrations, max_c = estimate
        concentrations *= (self.max_concentration / max_c)[:, None]
        out = self.io * np.exp(-(self.stain_matrix @ concentrations))
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
        return out.T.reshape(rgb.shape)

    def _params(self) -> dict[str, Any]:
        return {
            "stain_matrix": self.stain_matrix.tolist(),
            "max_concentration": self.max_concentration.tolist(),
            "io": self.io,
            "alpha": self.alpha,
            "beta": self.beta,
        }


# --- fitting and files ------------------------------------------------------------------------------


def fit_normalizer(reference_rgb: np.ndarray, method: str, min_tissue: float = MIN_TISSUE) -> StainNormalizer:
    """Fit a ``none | reinhard | macenko`` normaliser on a reference RGB uint8 tile.

    Raises :class:`StainError` for an unknown method or a reference with less than ``min_tissue`` tissue.
    """
    if method not in METHODS:
        raise StainError(f"unknown stain method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "none":
        return StainNormalizer(min_tissue=min_tissue)
    rgb = _check_rgb(reference_rgb)
    if method == "reinhard":
        n_tissue, n_pixels = _tissue_count(rgb, IO, BETA)
        if not _enough_tissue(n_tissue, n_pixels, min_tissue):
            raise StainError(
                f"cannot fit a reinhard normaliser: the reference tile has {n_tissue / n_pixels:.2%} tissue "
                f"(need at least {min_tissue:.2%}); choose a reference with tissue"
            )
        mean, std = _lab_stats(rgb)
        return ReinhardNormalizer(mean=mean, std=std, min_tissue=min_tissue)
    estimate = _macenko_estimate(rgb, IO, ALPHA, BETA, min_tissue)
    if isinstance(estimate, str):
        raise StainError(f"cannot fit a macenko normaliser on the reference tile: {estimate}; choose another")
    stain_matrix, _, max_c = estimate
    return MacenkoNormalizer(stain_matrix=stain_matrix, max_concentration=max_c, min_tissue=min_tissue)


def load_normalizer(path: str | os.PathLike[str]) -> StainNormalizer:
    """Read a normaliser saved by :meth:`StainNormalizer.save`; errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StainError(f"{path}: stain normaliser file not found") from None
    except (OSError, ValueError) as exc:
        raise StainError(f"{path}: not a readable stain normaliser JSON ({exc})") from None
    try:
        return StainNormalizer.from_dict(data)
    except StainError as exc:
        raise StainError(f"{path}: {exc}") from None


# --- one slide, many regions ------------------------------------------------------------------------


_FIXED_ROWS = 512  # rows transformed at a time: bounds the float32 temporaries on large regions


@dataclass
class FixedSourceNormalizer:
    """A normaliser whose *source* statistics were measured once, on a sample of a slide's tissue, and are then
    applied unchanged to every region of that slide.

    :meth:`StainNormalizer.transform` measures the source on the image it is given, which suits a tile but not a
    slide cut into chunks: each chunk would get its own estimate, and the result would depend on where the cuts
    fall. Here each pixel is mapped by the same function everywhere: Macenko, unmix with the sample's stain
    vectors, scale the concentrations by ``reference.max_concentration / source.max_concentration`` and re-mix
    with the reference's vectors; Reinhard, ``(lab - source.mean) * reference.std / source.std +
    reference.mean`` (a flat source channel only shifted), as the tile methods do with their own estimate.
    """

    reference: StainNormalizer
    source: StainNormalizer  # the reference's method fitted on the sample

    @property
    def method(self) -> str:
        return self.reference.method

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        rgb = _check_rgb(rgb)
        out = np.empty_like(rgb)
        for y0 in range(0, rgb.shape[0], _FIXED_ROWS):
            out[y0 : y0 + _FIXED_ROWS] = self._rows(rgb[y0 : y0 + _FIXED_ROWS])
        return out

    def _rows(self, rgb: np.ndarray) -> np.ndarray:
        ref, src = self.reference, self.source
        # float32 throughout (12 bytes per pixel of temporaries): within one intensity level of the float64 tile
        # methods, which matters less than the memory of a large region.
        if isinstance(ref, MacenkoNormalizer) and isinstance(src, MacenkoNormalizer):
            unmix = np.linalg.pinv(src.stain_matrix) * (ref.max_concentration / src.max_concentration)[:, None]
            concentrations = unmix.astype(np.float32) @ optical_density(rgb, ref.io).T
            mixed = np.float32(ref.io) * np.exp(-(ref.stain_matrix.astype(np.float32) @ concentrations))
            return np.clip(np.rint(mixed), 0, 255).astype(np.uint8).T.reshape(rgb.shape)
        if isinstance(ref, ReinhardNormalizer) and isinstance(src, ReinhardNormalizer):
            scale = np.where(src.std > 1e-6, ref.std / np.maximum(src.std, 1e-6), 1.0).astype(np.float32)
            return _lab_to_rgb((_rgb_to_lab(rgb) - src.mean.astype(np.float32)) * scale + ref.mean.astype(np.float32))
        return rgb.copy()


def fixed_source(reference: StainNormalizer, sample_rgb: np.ndarray) -> FixedSourceNormalizer:
    """Measure a slide's stain once, on ``sample_rgb`` (RGB uint8, e.g. a mosaic of tissue regions), for
    ``reference``'s method. Raises :class:`StainError` when the sample has too little tissue to measure."""
    if reference.method == "none":
        return FixedSourceNormalizer(reference, reference)
    try:
        source = fit_normalizer(sample_rgb, reference.method, reference.min_tissue)
    except StainError as exc:
        raise StainError(f"cannot measure the slide's stain: {exc}") from None
    return FixedSourceNormalizer(reference, source)


# --- one large image, in bounded memory ---------------------------------------------------------------


STREAM_BLOCK_PIXELS = 1 << 20  # pixels per block of rows when measuring a large image's stain


def _row_blocks(rgb: np.ndarray, block_pixels: int) -> Iterator[np.ndarray]:
    rows = max(1, block_pixels // rgb.shape[1])
    for y0 in range(0, rgb.shape[0], rows):
        yield rgb[y0 : y0 + rows]


def _lerp(a: float, b: float, t: float) -> float:
    """numpy.percentile's linear interpolation between neighbouring order statistics."""
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


def streamed_percentiles(
    blocks: Callable[[], Iterator[np.ndarray]], q: Sequence[float], low: np.ndarray, high: np.ndarray
) -> np.ndarray:
    """``numpy.percentile(values, q, axis=1)`` of ``(k, N)`` values that arrive in blocks ``(k, n_i)`` and never
    exist all at once: ``blocks()`` must give the same blocks each time it is called, and every value of row ``i``
    must lie in ``[low[i], high[i]]``. Two passes: a histogram of each row finds the bins that hold the order
    statistics the percentiles interpolate between; the second pass keeps only those bins' values. Exact, not
    approximated by the bins. Returns ``(len(q), k)``."""
    bins = 1 << 16
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    scale = bins / np.maximum(high - low, 1e-12)

    def bin_of(values: np.ndarray) -> np.ndarray:
        return np.clip(((values - low[:, None]) * scale[:, None]).astype(np.int64), 0, bins - 1)

    counts = np.zeros((len(low), bins), np.int64)
    for values in blocks():
        for i, row in enumerate(bin_of(values)):
            counts[i] += np.bincount(row, minlength=bins)
    ends = np.cumsum(counts, axis=1)  # ends[i, b]: the number of values of row i in bins 0..b
    needed = []  # per row: {rank: bin}
    for i in range(len(low)):
        n = int(ends[i, -1])
        ranks = {r for p in q for r in (int(p / 100 * (n - 1)), min(int(p / 100 * (n - 1)) + 1, n - 1))}
        needed.append({r: int(np.searchsorted(ends[i], r, side="right")) for r in ranks})
    kept: list[dict[int, list[np.ndarray]]] = [{b: [] for b in set(rows.values())} for rows in needed]
    for values in blocks():
        for i, (row, where) in enumerate(zip(values, bin_of(values), strict=True)):
            for b, parts in kept[i].items():
                parts.append(row[where == b])
    out = np.empty((len(q), len(low)))
    for i in range(len(low)):
        in_bin = {b: np.sort(np.concatenate(parts)) for b, parts in kept[i].items()}
        stat = {r: in_bin[b][r - (ends[i, b] - counts[i, b])] for r, b in needed[i].items()}
        n = int(ends[i, -1])
        for j, p in enumerate(q):
            pos = p / 100 * (n - 1)
            k0 = int(pos)
            out[j, i] = _lerp(stat[k0], stat[min(k0 + 1, n - 1)], pos - k0)
    return out


def _streamed_macenko(
    rgb: np.ndarray, io: float, alpha: float, beta: float, min_tissue: float, block_pixels: int
) -> MacenkoNormalizer | str:
    """:func:`_macenko_estimate` of a whole image from blocks of rows (5 passes, exact percentiles)."""

    def od_blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for block in _row_blocks(rgb, block_pixels):
            od = optical_density(block, io)
            yield od, np.all(od >= beta, axis=1)

    n_pixels = rgb.shape[0] * rgb.shape[1]
    n_tissue, total, outer = 0, np.zeros(3), np.zeros((3, 3))
    for od, tissue in od_blocks():
        values = od[tissue].astype(np.float64)
        n_tissue += len(values)
        total += values.sum(axis=0)
        outer += values.T @ values
    if not _enough_tissue(n_tissue, n_pixels, min_tissue):
        return f"only {n_tissue / n_pixels:.2%} of the pixels are tissue (need {min_tissue:.2%})"
    with np.errstate(all="ignore"):
        mean = total / n_tissue
        plane = _plane((outer - n_tissue * np.outer(mean, mean)) / (n_tissue - 1))  # numpy.cov's estimate

        def angles() -> Iterator[np.ndarray]:
            for od, tissue in od_blocks():
                yield _angles(od[tissue], plane)[None]

        (min_phi,), (max_phi,) = streamed_percentiles(angles, [alpha, 100 - alpha], [-np.pi], [np.pi])
        stain_matrix = _stain_vectors(plane, min_phi, max_phi)
        if not np.all(np.isfinite(stain_matrix)):
            return "the stain vectors could not be estimated"
        unmix = np.linalg.pinv(stain_matrix)
        # Every OD lies in [-log(256 / io), log(io)]: so does each concentration's range, through unmix.
        od_low, od_high = -np.log(256.0 / io), np.log(io)
        low = np.minimum(unmix * od_low, unmix * od_high).sum(axis=1)
        high = np.maximum(unmix * od_low, unmix * od_high).sum(axis=1)

        def concentrations() -> Iterator[np.ndarray]:
            for od, _ in od_blocks():
                yield _concentrations(od, stain_matrix)

        (max_c,) = streamed_percentiles(concentrations, [99], low, high)
    if not (np.all(np.isfinite(max_c)) and np.all(max_c > 1e-6)):
        return f"degenerate stain concentrations (99th percentiles {max_c.tolist()})"
    return MacenkoNormalizer(stain_matrix=stain_matrix, max_concentration=max_c, io=io, alpha=alpha, beta=beta)


def _streamed_reinhard(rgb: np.ndarray, min_tissue: float, block_pixels: int) -> ReinhardNormalizer | str:
    """The L*a*b* mean and standard deviation of a whole image from blocks of rows (one pass)."""
    n_pixels = rgb.shape[0] * rgb.shape[1]
    n_tissue, total, squares = 0, np.zeros(3), np.zeros(3)
    for block in _row_blocks(rgb, block_pixels):
        n_tissue += _tissue_count(block, IO, BETA)[0]
        lab = _rgb_to_lab(block).reshape(-1, 3).astype(np.float64)
        total += lab.sum(axis=0)
        squares += (lab * lab).sum(axis=0)
    if not _enough_tissue(n_tissue, n_pixels, min_tissue):
        return f"only {n_tissue / n_pixels:.2%} of the pixels are tissue"
    mean = total / n_pixels
    return ReinhardNormalizer(mean=mean, std=np.sqrt(np.maximum(squares / n_pixels - mean * mean, 0.0)))


def image_normalizer(
    reference: StainNormalizer, rgb: np.ndarray, block_pixels: int = STREAM_BLOCK_PIXELS
) -> FixedSourceNormalizer | None:
    """``reference``'s tile method for one large image, to apply region by region in bounded memory.

    The image's own stain (what :meth:`StainNormalizer.transform` measures on the whole image: Macenko's stain
    vectors and 99th concentration percentiles, Reinhard's L*a*b* statistics) is measured from blocks of
    ``block_pixels`` pixels, never holding more than a block's float arrays, and returned as a
    :class:`FixedSourceNormalizer` whose ``transform`` maps any region (a strip of tiles) pixel by pixel in
    float32. Applied to every region, it gives ``reference.transform(rgb)`` within one intensity level. Returns
    None (with a :class:`StainWarning`) where ``transform`` would leave the image unchanged: method ``none``,
    too little tissue, a degenerate estimate.
    """
    rgb = _check_rgb(rgb)
    if isinstance(reference, MacenkoNormalizer):
        source: StainNormalizer | str = _streamed_macenko(
            rgb, reference.io, reference.alpha, reference.beta, reference.min_tissue, block_pixels
        )
    elif isinstance(reference, ReinhardNormalizer):
        source = _streamed_reinhard(rgb, reference.min_tissue, block_pixels)
    else:
        return None
    if isinstance(source, str):
        warnings.warn(
            f"{reference.method} stain normalisation skipped: {source}; image left unchanged", StainWarning, 2
        )
        return None
    return FixedSourceNormalizer(reference, source)
