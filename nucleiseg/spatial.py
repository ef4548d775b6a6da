"""Spatial statistics of the nucleus types: how tumour, lymphocyte and stroma nuclei are arranged.

Every input is a point pattern: nucleus centroids ``xy`` in micrometres (``(N, 2)``, x right, y down) with
class codes ``0`` tumor, ``1`` lymphocyte, ``2`` stroma (:data:`nucleiseg.labels.CLASS_NAMES`), observed in a
:class:`Window`. All distances are in um, areas in mm^2 where a reader sees them. Neighbour searches use
KD-trees (:class:`scipy.spatial.cKDTree`); no all-pairs distance matrix is ever formed.

Definitions
-----------
window
    The region where nuclei could have been observed, of area ``|W|``: the image rectangle, or the tissue inside
    it when a tissue mask is given (a boolean raster covering the rectangle, any resolution).
counts, fractions, densities
    Per class ``n_i``, ``n_i / N``, and ``n_i / |W|`` in nuclei per mm^2 (of tissue when there is a mask).
nearest-neighbour distance ``i -> j``
    For each nucleus of class ``i``, the distance to the nearest *other* nucleus of class ``j``. Summaries:
    median, quartiles, mean; and the contact fraction: the fraction of class-``i`` nuclei with a class-``j``
    nucleus within ``contact_radius_um`` (e.g. tumour nuclei with a lymphocyte within 20 um). No edge
    correction: a nucleus near the window's edge may have its true nearest neighbour outside it.
cross-type Ripley's K and Besag's L
    ``K_ij(r) = |W|^2 / (n_i n_j) * sum_{a in i, b in j, a != b} 1(d_ab <= r) / g(x_b - x_a)`` with the
    translation edge correction ``g(h) = |W intersect (W + h)|`` (the window's set covariance: exact for a
    rectangle, from the mask's autocorrelation otherwise; Ohser & Stoyan 1981), and ``n_i (n_i - 1)`` instead
    of ``n_i^2`` for ``i = j``. ``L_ij(r) = sqrt(K_ij(r) / pi)``; ``L(r) - r`` is 0 in expectation under
    complete spatial randomness (CSR), above 0 for clustering / attraction, below for regularity / repulsion.
    K is invariant under independent random thinning, so above ``max_points`` nuclei of a class K is estimated on
    a random subsample of that size (unbiased; the envelopes are those of the subsample, so wider:
    conservative).
envelopes
    Pointwise minimum and maximum of ``L(r) - r`` over ``simulations`` patterns simulated under the null:
    ``csr`` (each class's nuclei, same counts, placed uniformly and independently in the window) or
    ``labels`` (random labelling: the positions kept, the class labels permuted). With 39 simulations a curve
    outside the band at a given ``r`` is a two-sided pointwise test at the 5% level; over many radii some
    pointwise excursions happen by chance, so the curve is also given a global test: the maximum absolute
    deviation (MAD) test of Diggle (2003), ``T = max_r |L(r) - Lbar(r)|`` with ``Lbar`` the simulations' mean,
    ``p = (1 + #{simulations with T_s >= T}) / (simulations + 1)``.
neighbourhood enrichment
    As squidpy's ``nhood_enrichment``: the neighbourhood graph joins every two nuclei closer than
    ``neighbourhood_radius_um`` (a radius graph, chosen over Delaunay or kNN because its scale is a distance a
    pathologist can read); ``C_ij`` counts the ordered pairs (a nucleus of class ``i``, a neighbour of class
    ``j``), so ``C`` is symmetric and each edge within a class counts twice. The class labels are permuted
    ``permutations`` times over the fixed positions; ``z_ij = (C_ij - mean) / std`` over the permutations.
    ``z > 0``: the two classes are neighbours more often than their abundance explains.
Morisita-Horn index
    On a square grid of side ``grid_um`` covering the window, with ``x_k``, ``y_k`` the counts of classes ``i``
    and ``j`` in cell ``k``: ``M_ij = 2 sum x_k y_k / ((sum x_k^2 / X^2 + sum y_k^2 / Y^2) X Y)``, ``X = sum x_k``,
    from 0 (never in the same cells) to 1 (identical distributions over the cells); the co-localisation index
    of Maley et al. (Breast Cancer Research, 2015) for immune and cancer cells.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from nucleiseg.labels import CLASS_NAMES

N_CLASSES = len(CLASS_NAMES)
NULLS = ("csr", "labels")
_MASK_SIDE = 1024  # a tissue mask is block-averaged to at most this many pixels a side for its set covariance


@dataclass(frozen=True)
class SpatialSettings:
    """The statistics' settings (params section ``spatial``, less ``mpp``; definitions in the module docstring)."""

    r_max_um: float = 50.0  # largest K / L radius (capped at a quarter of the window's shorter side)
    r_steps: int = 50  # radii r_max / r_steps, 2 r_max / r_steps, ..., r_max
    simulations: int = 39  # patterns simulated for the L envelopes
    envelope_null: Literal["csr", "labels"] = "csr"
    max_points: int = 20000  # per class, for K / L (independent thinning above)
    contact_radius_um: float = 20.0
    neighbourhood_radius_um: float = 20.0
    permutations: int = 199
    grid_um: float = 100.0  # Morisita-Horn cell side
    density_bandwidth_um: float = 25.0  # Gaussian smoothing of the density maps (report only)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("r_max_um", "contact_radius_um", "neighbourhood_radius_um", "grid_um", "density_bandwidth_um"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"spatial.{name} must be a positive number of um, got {value!r}")
        for name, low in (("r_steps", 1), ("simulations", 1), ("max_points", 2), ("permutations", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"spatial.{name} must be an integer >= {low}, got {value!r}")
        if self.envelope_null not in NULLS:
            raise ValueError(f"spatial.envelope_null must be one of {', '.join(NULLS)}, got {self.envelope_null!r}")


def settings_from(values: Any) -> SpatialSettings:
    """:class:`SpatialSettings` from a mapping such as ``params.spatial.model_dump()`` (``mpp`` and other keys the
    settings do not have are ignored: ``mpp`` is an argument of its own wherever it is used)."""
    values = dict(values or {})
    return SpatialSettings(**{k: v for k, v in values.items() if k in SpatialSettings.__dataclass_fields__})


# ----------------------------------------------------------------------------------------------------------
# The window
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """The observation window: the rectangle ``[x0, x0 + width] x [y0, y0 + height]`` (um), restricted to
    ``mask`` (a 2-D boolean raster over that rectangle, row 0 at ``y0``) when one is given."""

    width: float
    height: float
    x0: float = 0.0
    y0: float = 0.0
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)
    description: str = ""

    def __post_init__(self) -> None:
        if not (self.width > 0 and self.height > 0):
            raise ValueError(f"a window needs a positive width and height, got {self.width} x {self.height} um")
        if self.mask is not None:
            mask = np.asarray(self.mask)
            if mask.ndim != 2 or mask.size == 0:
                raise ValueError(f"a tissue mask must be a 2-D array, got shape {mask.shape}")
            if not mask.any():
                raise ValueError("the tissue mask is empty: no tissue to measure densities in")
            object.__setattr__(self, "mask", mask.astype(bool, copy=False))

    @classmethod
    def rectangle(cls, width: float, height: float, description: str = "") -> Window:
        return cls(float(width), float(height), description=description or f"{width:.0f} x {height:.0f} µm")

    @classmethod
    def bounding_box(cls, xy: np.ndarray) -> Window:
        """The smallest rectangle holding the points (pointpats' default when no window is known)."""
        low, high = xy.min(axis=0), xy.max(axis=0)
        size = np.maximum(high - low, 1e-9)
        return cls(
            float(size[0]),
            float(size[1]),
            float(low[0]),
            float(low[1]),
            description=f"bounding box of the nuclei, {size[0]:.0f} x {size[1]:.0f} µm",
        )

    @property
    def pixel_size(self) -> tuple[float, float]:
        """(height, width) of a mask pixel in um."""
        assert self.mask is not None
        return self.height / self.mask.shape[0], self.width / self.mask.shape[1]

    @property
    def area(self) -> float:
        """|W| in um^2."""
        if self.mask is None:
            return self.width * self.height
        ph, pw = self.pixel_size
        return float(np.count_nonzero(self.mask)) * ph * pw

    def contains(self, xy: np.ndarray) -> np.ndarray:
        """Whether each point lies in the window."""
        x, y = xy[:, 0] - self.x0, xy[:, 1] - self.y0
        inside = (x >= 0) & (x <= self.width) & (y >= 0) & (y <= self.height)
        if self.mask is None:
            return inside
        ph, pw = self.pixel_size
        rows = np.clip((y / ph).astype(np.intp), 0, self.mask.shape[0] - 1)
        cols = np.clip((x / pw).astype(np.intp), 0, self.mask.shape[1] - 1)
        return inside & self.mask[rows, cols]

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` points placed uniformly and independently in the window (CSR), ``(n, 2)`` um."""
        if self.mask is None:
            return rng.random((n, 2)) * (self.width, self.height) + (self.x0, self.y0)
        ph, pw = self.pixel_size
        cells = np.flatnonzero(self.mask)
        pick = cells[rng.integers(0, cells.size, n)]
        rows, cols = np.divmod(pick, self.mask.shape[1])
        jitter = rng.random((n, 2))
        return np.column_stack([(cols + jitter[:, 0]) * pw + self.x0, (rows + jitter[:, 1]) * ph + self.y0])

    def set_covariance(self) -> Any:
        """``g(dx, dy) = |W intersect (W + (dx, dy))|`` in um^2, as a vectorised function of displacement arrays."""
        if self.mask is None:
            width, height = self.width, self.height
            return lambda dx, dy: np.maximum(width - np.abs(dx), 0) * np.maximum(height - np.abs(dy), 0)
        from scipy.ndimage import map_coordinates
        from scipy.signal import fftconvolve

        coverage = _block_mean(self.mask.astype(np.float32), _MASK_SIDE)
        ph, pw = self.height / coverage.shape[0], self.width / coverage.shape[1]
        # Autocorrelation of the coverage = the set covariance in pixels; centre at (rows - 1, cols - 1).
        auto = fftconvolve(coverage, coverage[::-1, ::-1], mode="full") * (ph * pw)
        centre_r, centre_c = coverage.shape[0] - 1, coverage.shape[1] - 1

        def covariance(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
            coords = np.vstack([centre_r + np.asarray(dy) / ph, centre_c + np.asarray(dx) / pw])
            return np.maximum(map_coordinates(auto, coords, order=1, mode="constant", cval=0.0), 0.0)

        return covariance


def _block_mean(image: np.ndarray, max_side: int) -> np.ndarray:
    """Average ``image`` over square blocks so that neither side exceeds ``max_side`` (edge blocks padded with 0,
    i.e. outside the mask)."""
    factor = max(1, math.ceil(max(image.shape) / max_side))
    if factor == 1:
        return image
    rows, cols = -(-image.shape[0] // factor) * factor, -(-image.shape[1] // factor) * factor
    padded = np.zeros((rows, cols), np.float32)
    padded[: image.shape[0], : image.shape[1]] = image
    return padded.reshape(rows // factor, factor, cols // factor, factor).mean(axis=(1, 3))


# ----------------------------------------------------------------------------------------------------------
# Points
# ----------------------------------------------------------------------------------------------------------


def class_codes(classes: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Class codes 0-2 (int8) from class names (``tumor``, ...) or codes; raises ``ValueError`` on others."""
    values = np.asarray(classes)
    if values.dtype.kind in "iu":
        codes = values.astype(np.int64)
    else:
        lookup = {name: i for i, name in enumerate(CLASS_NAMES)}
        unknown = sorted({str(v) for v in values.tolist()} - set(lookup))
        if unknown:
            raise ValueError(f"unknown classes {unknown} (expected {', '.join(CLASS_NAMES)})")
        codes = np.array([lookup[str(v)] for v in values.tolist()], dtype=np.int64)
    if codes.size and (codes.min() < 0 or codes.max() >= N_CLASSES):
        raise ValueError(f"class codes must be 0-{N_CLASSES - 1}")
    return codes.astype(np.int8)


def _check_points(xy: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xy = np.asarray(xy, dtype=np.float64)
    codes = class_codes(codes)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) != len(codes):
        raise ValueError(f"expected (N, 2) positions and N classes, got {xy.shape} and {codes.shape}")
    if not np.all(np.isfinite(xy)):
        raise ValueError("positions must be finite")
    return xy, codes


# ----------------------------------------------------------------------------------------------------------
# Counts and nearest neighbours
# ----------------------------------------------------------------------------------------------------------


def class_counts(codes: np.ndarray, window: Window) -> dict[str, Any]:
    """Counts, fractions and densities (per mm^2 of the window) per class, and the window's area in mm^2."""
    codes = class_codes(codes)
    counts = np.bincount(codes, minlength=N_CLASSES)
    total = int(counts.sum())
    area_mm2 = window.area * 1e-6
    return {
        "nuclei": total,
        "area_mm2": area_mm2,
        "counts": {name: int(counts[i]) for i, name in enumerate(CLASS_NAMES)},
        "fractions": {name: (counts[i] / total if total else math.nan) for i, name in enumerate(CLASS_NAMES)},
        "density_per_mm2": {name: counts[i] / area_mm2 for i, name in enumerate(CLASS_NAMES)},
        "density_all_per_mm2": total / area_mm2,
    }


def nearest_neighbour_distances(xy: np.ndarray, codes: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """``{(i, j): distances}``: for each class-``i`` nucleus (in input order) the distance in um to the nearest
    other class-``j`` nucleus; empty arrays where a class is absent (or alone, for ``i == j``)."""
    from scipy.spatial import cKDTree

    xy, codes = _check_points(xy, codes)
    members = [np.flatnonzero(codes == c) for c in range(N_CLASSES)]
    trees = [cKDTree(xy[m]) if len(m) else None for m in members]
    out: dict[tuple[int, int], np.ndarray] = {}
    for i in range(N_CLASSES):
        for j in range(N_CLASSES):
            tree, sources = trees[j], xy[members[i]]
            if tree is None or not len(sources) or (i == j and len(members[i]) < 2):
                out[i, j] = np.empty(0)
            elif i == j:
                out[i, j] = tree.query(sources, k=2)[0][:, 1]  # the nearest is the nucleus itself
            else:
                out[i, j] = tree.query(sources, k=1)[0]
    return out


def nearest_neighbour_summary(
    distances: dict[tuple[int, int], np.ndarray], contact_radius_um: float
) -> dict[str, dict[str, dict[str, float]]]:
    """``{"from_class": {"to_class": {median, q1, q3, mean, n, fraction_within}}}`` (um; ``fraction_within`` is
    the contact fraction at ``contact_radius_um``)."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for (i, j), d in distances.items():
        if len(d):
            q1, median, q3 = np.percentile(d, [25, 50, 75])
            figures = {
                "n": len(d),
                "median_um": median,
                "q1_um": q1,
                "q3_um": q3,
                "mean_um": float(d.mean()),
                "fraction_within": float(np.mean(d <= contact_radius_um)),
            }
        else:
            figures = {
                "n": 0,
                "median_um": math.nan,
                "q1_um": math.nan,
                "q3_um": math.nan,
                "mean_um": math.nan,
                "fraction_within": math.nan,
            }
        summary.setdefault(CLASS_NAMES[i], {})[CLASS_NAMES[j]] = {k: float(v) for k, v in figures.items()}
    return summary


# ----------------------------------------------------------------------------------------------------------
# Ripley's K / Besag's L
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LFunction:
    """Cross-type L functions of all class pairs: arrays ``(3, 3, R)`` over ``radii`` (um), symmetric in the
    class pair; NaN where a class has too few nuclei. ``used``: nuclei per class the estimate used (after thinning)."""

    radii: np.ndarray
    k: np.ndarray
    l_minus_r: np.ndarray
    low: np.ndarray
    high: np.ndarray
    used: np.ndarray
    null: str
    simulations: int
    mad_p: np.ndarray  # (3, 3) p-value of the global MAD test

    def as_dict(self) -> dict[str, Any]:
        pairs = {}
        for i in range(N_CLASSES):
            for j in range(i, N_CLASSES):
                curve, lo, hi = self.l_minus_r[i, j], self.low[i, j], self.high[i, j]
                pairs[f"{CLASS_NAMES[i]}-{CLASS_NAMES[j]}"] = {
                    "l_minus_r_um": curve.tolist(),
                    "envelope_low_um": lo.tolist(),
                    "envelope_high_um": hi.tolist(),
                    "radii_above_envelope": int(np.sum(curve > hi)),
                    "radii_below_envelope": int(np.sum(curve < lo)),
                    "mad_test_p": float(self.mad_p[i, j]),
                }
        return {
            "radii_um": self.radii.tolist(),
            "null": self.null,
            "simulations": self.simulations,
            "nuclei_used": {CLASS_NAMES[c]: int(self.used[c]) for c in range(N_CLASSES)},
            "pairs": pairs,
        }


def _pair_sums(
    xy: np.ndarray, codes: np.ndarray, radii: np.ndarray, covariance: Any, edge_correction: bool
) -> np.ndarray:
    """``S[i, j, k] = sum over unordered pairs {a, b} with classes {i, j} and d_ab <= radii[k] of 1 / g(x_b - x_a)``
    (``1 / |W|`` per pair without edge correction), for ``i <= j`` (the rest zero)."""
    from scipy.spatial import cKDTree

    n_radii = len(radii)
    sums = np.zeros((N_CLASSES * N_CLASSES, n_radii))
    if len(xy) < 2:
        return sums.reshape(N_CLASSES, N_CLASSES, n_radii)
    pairs = cKDTree(xy).query_pairs(float(radii[-1]), output_type="ndarray")
    if len(pairs):
        delta = xy[pairs[:, 1]] - xy[pairs[:, 0]]
        distance = np.hypot(delta[:, 0], delta[:, 1])
        keep = distance <= radii[-1]
        pairs, delta, distance = pairs[keep], delta[keep], distance[keep]
        first = np.searchsorted(radii, distance, side="left")  # the smallest radius that counts the pair
        if edge_correction:
            overlap = covariance(delta[:, 0], delta[:, 1])
            # A pair farther apart than the window allows (possible only for points outside a mask) has no weight.
            weight = np.divide(1.0, overlap, out=np.zeros_like(overlap), where=overlap > 0)
        else:
            weight = np.ones(len(pairs))
        a, b = codes[pairs[:, 0]].astype(np.int64), codes[pairs[:, 1]].astype(np.int64)
        pair_class = np.minimum(a, b) * N_CLASSES + np.maximum(a, b)
        flat = np.bincount(pair_class * n_radii + first, weights=weight, minlength=N_CLASSES * N_CLASSES * n_radii)
        sums = np.cumsum(flat.reshape(N_CLASSES * N_CLASSES, n_radii), axis=1)
    return sums.reshape(N_CLASSES, N_CLASSES, n_radii)


def ripley_k(
    xy: np.ndarray, codes: np.ndarray, window: Window, radii: np.ndarray, *, edge_correction: bool = True
) -> np.ndarray:
    """Cross-type Ripley's K ``(3, 3, R)`` in um^2 at ``radii`` (module docstring), symmetric; NaN for a pair with
    too few nuclei. ``edge_correction=False`` weighs every pair by ``1 / |W|`` (pointpats' estimator)."""
    xy, codes = _check_points(xy, codes)
    radii = np.asarray(radii, dtype=np.float64)
    if radii.ndim != 1 or not len(radii) or np.any(np.diff(radii) <= 0) or radii[0] <= 0:
        raise ValueError("radii must be positive and increasing")
    area = window.area
    covariance = window.set_covariance()
    sums = _pair_sums(xy, codes, radii, covariance, edge_correction)
    if not edge_correction:
        sums = sums / area
    n = np.bincount(codes, minlength=N_CLASSES).astype(np.float64)
    k = np.full((N_CLASSES, N_CLASSES, len(radii)), np.nan)
    for i in range(N_CLASSES):
        for j in range(i, N_CLASSES):
            if i == j and n[i] >= 2:
                k[i, i] = area**2 / (n[i] * (n[i] - 1)) * 2 * sums[i, i]
            elif i != j and n[i] and n[j]:
                k[i, j] = k[j, i] = area**2 / (n[i] * n[j]) * sums[i, j]
    return k


def _thin(codes: np.ndarray, max_points: int, rng: np.random.Generator) -> np.ndarray:
    """Indices keeping at most ``max_points`` nuclei of each class, chosen uniformly at random (sorted)."""
    keep = []
    for c in range(N_CLASSES):
        members = np.flatnonzero(codes == c)
        keep.append(members if len(members) <= max_points else rng.choice(members, max_points, replace=False))
    return np.sort(np.concatenate(keep))


def radii_for(window: Window, r_max_um: float, r_steps: int) -> np.ndarray:
    """``r_steps`` radii up to ``min(r_max_um, a quarter of the window's shorter side)`` (beyond that the
    translation correction rests on too few pairs)."""
    r_max = min(r_max_um, 0.25 * min(window.width, window.height))
    return np.linspace(r_max / r_steps, r_max, r_steps)


def l_function(
    xy: np.ndarray,
    codes: np.ndarray,
    window: Window,
    radii: np.ndarray,
    *,
    simulations: int = 39,
    null: str = "csr",
    max_points: int = 20000,
    rng: np.random.Generator | None = None,
) -> LFunction:
    """``L(r) - r`` of every class pair with its simulation envelope (module docstring)."""
    if null not in NULLS:
        raise ValueError(f"null must be one of {', '.join(NULLS)}, got {null!r}")
    rng = rng or np.random.default_rng(0)
    xy, codes = _check_points(xy, codes)
    keep = _thin(codes, max_points, rng)
    xy, codes = xy[keep], codes[keep]
    radii = np.asarray(radii, dtype=np.float64)

    def l_minus_r(points: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = ripley_k(points, labels, window, radii)
        return k, np.sqrt(np.maximum(k, 0) / np.pi) - radii

    k, observed = l_minus_r(xy, codes)
    simulated = np.empty((simulations, *observed.shape))
    for s in range(simulations):
        if null == "csr":
            simulated[s] = l_minus_r(window.sample(len(xy), rng), codes)[1]
        else:
            simulated[s] = l_minus_r(xy, rng.permutation(codes))[1]
    centre = simulated.mean(axis=0)
    deviation = np.max(np.abs(observed - centre), axis=-1)  # (3, 3)
    simulated_deviation = np.max(np.abs(simulated - centre), axis=-1)  # (simulations, 3, 3)
    with np.errstate(invalid="ignore"):
        mad_p = (1 + np.sum(simulated_deviation >= deviation, axis=0)) / (simulations + 1)
    mad_p = np.where(np.isnan(deviation), np.nan, mad_p)
    return LFunction(
        radii,
        k,
        observed,
        simulated.min(axis=0),
        simulated.max(axis=0),
        np.bincount(codes, minlength=N_CLASSES),
        null,
        simulations,
        mad_p,
    )


# ----------------------------------------------------------------------------------------------------------
# Neighbourhood enrichment and co-localisation
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Enrichment:
    """Neighbourhood-enrichment counts ``C`` (ordered neighbour pairs by class), the permutation mean and std,
    and the z-scores, all ``(3, 3)``; NaN z where the permutations never vary."""

    counts: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    z: np.ndarray
    radius_um: float
    permutations: int
    edges: int

    def as_dict(self) -> dict[str, Any]:
        def matrix(a: np.ndarray) -> dict[str, dict[str, float]]:
            return {
                CLASS_NAMES[i]: {CLASS_NAMES[j]: float(a[i, j]) for j in range(N_CLASSES)} for i in range(N_CLASSES)
            }

        return {
            "graph": f"radius {self.radius_um:g} µm",
            "edges": self.edges,
            "permutations": self.permutations,
            "z": matrix(self.z),
            "counts": matrix(self.counts),
            "permutation_mean": matrix(self.mean),
        }


def neighbourhood_enrichment(
    xy: np.ndarray,
    codes: np.ndarray,
    radius_um: float,
    *,
    permutations: int = 199,
    rng: np.random.Generator | None = None,
) -> Enrichment:
    """squidpy-style neighbourhood enrichment on the radius graph (module docstring)."""
    from scipy.spatial import cKDTree

    rng = rng or np.random.default_rng(0)
    xy, codes = _check_points(xy, codes)
    edges = cKDTree(xy).query_pairs(float(radius_um), output_type="ndarray") if len(xy) > 1 else np.empty((0, 2))
    u, v = edges[:, 0].astype(np.intp), edges[:, 1].astype(np.intp)

    def count(labels: np.ndarray) -> np.ndarray:
        flat = np.bincount(labels[u].astype(np.int32) * N_CLASSES + labels[v], minlength=N_CLASSES * N_CLASSES)
        half = flat.reshape(N_CLASSES, N_CLASSES).astype(np.float64)
        return half + half.T  # each undirected edge is an ordered pair both ways

    observed = count(codes)
    null = np.empty((permutations, N_CLASSES, N_CLASSES))
    for p in range(permutations):
        null[p] = count(rng.permutation(codes))
    mean, std = null.mean(axis=0), null.std(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(std > 0, (observed - mean) / std, np.nan)
    return Enrichment(observed, mean, std, z, float(radius_um), permutations, len(edges))


def morisita_horn(xy: np.ndarray, codes: np.ndarray, window: Window, grid_um: float) -> np.ndarray:
    """Morisita-Horn index ``(3, 3)`` of every class pair on a ``grid_um`` grid over the window's rectangle
    (module docstring); NaN where a class is absent."""
    xy, codes = _check_points(xy, codes)
    n_cols = max(1, math.ceil(window.width / grid_um))
    n_rows = max(1, math.ceil(window.height / grid_um))
    cols = np.clip(((xy[:, 0] - window.x0) // grid_um).astype(np.int64), 0, n_cols - 1)
    rows = np.clip(((xy[:, 1] - window.y0) // grid_um).astype(np.int64), 0, n_rows - 1)
    cell = rows * n_cols + cols
    counts = np.zeros((N_CLASSES, n_rows * n_cols))
    for c in range(N_CLASSES):
        counts[c] = np.bincount(cell[codes == c], minlength=n_rows * n_cols)
    totals = counts.sum(axis=1)
    index = np.full((N_CLASSES, N_CLASSES), np.nan)
    for i in range(N_CLASSES):
        for j in range(N_CLASSES):
            if totals[i] and totals[j]:
                simpson_i = np.sum(counts[i] ** 2) / totals[i] ** 2
                simpson_j = np.sum(counts[j] ** 2) / totals[j] ** 2
                index[i, j] = 2 * np.sum(counts[i] * counts[j]) / ((simpson_i + simpson_j) * totals[i] * totals[j])
    return index


# ----------------------------------------------------------------------------------------------------------
# Everything at once
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SpatialResult:
    """All statistics of one image or slide: :meth:`figures` is the JSON of the report; the arrays are kept for
    the plots (``distances``: nearest-neighbour distances per class pair)."""

    counts: dict[str, Any]
    distances: dict[tuple[int, int], np.ndarray]
    nearest: dict[str, Any]
    l_function: LFunction
    enrichment: Enrichment
    morisita_horn: np.ndarray
    window: Window
    settings: SpatialSettings
    outside_window: int

    def figures(self) -> dict[str, Any]:
        mh = {
            CLASS_NAMES[i]: {CLASS_NAMES[j]: float(self.morisita_horn[i, j]) for j in range(N_CLASSES)}
            for i in range(N_CLASSES)
        }
        tumor, lymphocyte = CLASS_NAMES.index("tumor"), CLASS_NAMES.index("lymphocyte")
        return {
            "window": {
                "description": self.window.description,
                "area_mm2": self.window.area * 1e-6,
                "tissue_mask": self.window.mask is not None,
                "nuclei_outside": self.outside_window,
            },
            **self.counts,
            "nearest_neighbour": self.nearest,
            "tumor_with_lymphocyte_within": {
                "radius_um": self.settings.contact_radius_um,
                "fraction": self.nearest[CLASS_NAMES[tumor]][CLASS_NAMES[lymphocyte]]["fraction_within"],
            },
            "l_function": self.l_function.as_dict(),
            "neighbourhood_enrichment": self.enrichment.as_dict(),
            "morisita_horn": {"grid_um": self.settings.grid_um, "index": mh},
            "settings": asdict(self.settings),
        }


def spatial_statistics(
    xy: np.ndarray, codes: np.ndarray, window: Window, settings: SpatialSettings | None = None
) -> SpatialResult:
    """Every statistic of the module docstring for one point pattern, with ``settings`` (defaults when None)."""
    settings = settings or SpatialSettings()
    xy, codes = _check_points(xy, codes)
    rng = np.random.default_rng(settings.seed)
    distances = nearest_neighbour_distances(xy, codes)
    radii = radii_for(window, settings.r_max_um, settings.r_steps)
    return SpatialResult(
        counts=class_counts(codes, window),
        distances=distances,
        nearest=nearest_neighbour_summary(distances, settings.contact_radius_um),
        l_function=l_function(
            xy,
            codes,
            window,
            radii,
            simulations=settings.simulations,
            null=settings.envelope_null,
            max_points=settings.max_points,
            rng=rng,
        ),
        enrichment=neighbourhood_enrichment(
            xy, codes, settings.neighbourhood_radius_um, permutations=settings.permutations, rng=rng
        ),
        morisita_horn=morisita_horn(xy, codes, window, settings.grid_um),
        window=window,
        settings=settings,
        outside_window=int(np.count_nonzero(~window.contains(xy))),
    )


__all__ = [
    "NULLS",
    "Enrichment",
    "LFunction",
    "SpatialResult",
    "SpatialSettings",
    "Window",
    "class_codes",
    "class_counts",
    "l_function",
    "morisita_horn",
    "nearest_neighbour_distances",
    "nearest_neighbour_summary",
    "neighbourhood_enrichment",
    "radii_for",
    "ripley_k",
    "settings_from",
    "spatial_statistics",
]
