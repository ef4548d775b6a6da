"""Pixel weights of the loss (Qu et al., ISBI 2019, eq. 2), exact and fast enough to compute on the fly.

Definitions
-----------
boundary pixel
    A pixel of a nucleus (label id > 0) with at least one 4-neighbour, inside the image, that is not part of
    the same nucleus. The image edge is never a boundary (:func:`boundary_pixels`).
d1, d2
    For every pixel x, inside nuclei too: with ``D_k(x)`` the Euclidean distance from x to the nearest boundary
    pixel of nucleus k, d1 and d2 are the smallest and second-smallest ``D_k(x)`` over the nuclei (two
    different nuclei; they may be equal).
weight map
    ``w(x) = 1 + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))``, w0 = 10 and sigma = 5 by default. With fewer
    than two nuclei that have boundary pixels, w = 1 everywhere. A nucleus without boundary pixels has no
    distance and is left out; that only happens to a nucleus that fills the whole image, so such a label has a
    single nucleus and w = 1.

Cut-off
-------
Where ``|w0| * exp(-(d1 + d2)^2 / (2 sigma^2)) < 1e-4`` (:data:`TERM_CUTOFF`), i.e. where
``d1 + d2 >= R = sigma * sqrt(2 ln(|w0| / 1e-4))`` (R = 24.0 px for the defaults), the term is set to 0 and
w = 1 exactly. The result therefore differs from the definition by less than 1e-4 (plus float32 rounding).

Algorithm (exact for d1 + d2 < R)
---------------------------------
A brute force (every pixel against every boundary pixel, as in the reference MATLAB code) takes about an hour
on a 1000 x 1000 tile. Here every distance comes from OpenCV's exact Euclidean distance transform
(``DIST_MASK_PRECISE``, Felzenszwalb & Huttenlocher), one linear-time pass over the image per set of nuclei:

1. Two nuclei whose boundaries are at least R apart are never the nearest two of a pixel with d1 + d2 < R
   (``d1 + d2 >= |b1 - b2|`` by the triangle inequality). The other pairs ("close" pairs, found from a lower
   bound on their distance: the gap between the bounding octagons of their boundary pixels) get different
   colours by greedy graph colouring: 8-9 colours on the densest CoNSeP tile.
2. Give each colour a distinct w-subset of m sets (the fewest m with m-choose-w >= colours: 5 sets and w = 2
   for up to 10 colours) and put every nucleus in the sets of its colour. One distance transform per set
   gives, at every pixel, the distance to the nearest boundary pixel of that set's nuclei.
3. At a pixel whose nearest nucleus is n1, the w sets that hold n1 give d1; every other set holds no nucleus
   of n1's colour, so it gives at least d2, and exactly d2 if it holds n2. Hence d1 is the smallest of the m
   values and the (w + 1)-th smallest is d2 whenever n2's colour differs from n1's, that is, whenever
   d1 + d2 < R (ties included). Elsewhere it is at least d2, so d1 + d2 >= R stays true and the cut-off
   applies to the computed and the true value alike: the result is exact within the cut-off.

This costs m distance transforms (5 on the densest tile) instead of one per nucleus or per boundary pixel.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

TERM_CUTOFF = 1e-4
"""Terms ``w0 * exp(...)`` smaller than this in absolute value are set to 0 (see the module docstring)."""

_MAX_LUT_ID = 1 << 22  # ids up to this are compacted with a lookup table, larger ones with np.unique


def boundary_pixels(label: np.ndarray) -> np.ndarray:
    """Boolean mask of the boundary pixels of all nuclei of ``label``.

    A boundary pixel is a nucleus pixel (id > 0) with at least one 4-neighbour inside the image that holds a
    different id (background or another nucleus). Pixels on the image edge are not boundary pixels for that
    reason alone.
    """
    label = _check_label(label)
    mask = np.zeros(label.shape, dtype=bool)
    differs = label[:, 1:] != label[:, :-1]
    mask[:, 1:] |= differs
    mask[:, :-1] |= differs
    differs = label[1:, :] != label[:-1, :]
    mask[1:, :] |= differs
    mask[:-1, :] |= differs
    mask &= label > 0
    return mask


def cutoff_distance(w0: float = 10.0, sigma: float = 5.0, cutoff: float = TERM_CUTOFF) -> float:
    """The distance R beyond which ``|w0| * exp(-(d1 + d2)^2 / (2 sigma^2)) < cutoff`` (0 if never above it)."""
    if abs(w0) <= cutoff:
        return 0.0
    return float(sigma * math.sqrt(2.0 * math.log(abs(w0) / cutoff)))


def weight_map(label: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """The weight map of eq. 2 of Qu et al. for an instance label, as a ``float32`` array of its shape.

    ``label`` is a 2-D integer array: 0 background, one positive id per nucleus (ids need not be
    consecutive). The map is ``1 + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` with d1, d2 the distances to the
    boundaries of the nearest and second-nearest nucleus (see the module docstring for the exact
    definitions). Terms below 1e-4 (:data:`TERM_CUTOFF`), i.e. where ``d1 + d2 >= cutoff_distance(w0, sigma)``,
    are set to 0, so the map differs from the definition by less than 1e-4. Fewer than two nuclei: all ones.

    Raises ``ValueError`` for a label that is not 2-D, not integer or holds negative ids, and for a
    non-positive ``sigma`` or non-finite ``w0``.
    """
    label = _check_label(label)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma}")
    if not math.isfinite(w0):
        raise ValueError(f"w0 must be a finite number, got {w0}")
    radius = cutoff_distance(w0, sigma)
    distances = _two_nearest_distances(label, radius)
    if distances is None:
        return np.ones(label.shape, dtype=np.float32)
    total = _exact_distance(distances[0])
    total += _exact_distance(distances[1])
    far = total >= radius
    np.minimum(total, radius, out=total)  # unreached distances are ~1.8e19: keep the square finite
    total *= total
    total *= -1.0 / (2.0 * sigma * sigma)
    np.exp(total, out=total)
    total *= w0
    total[far] = 0.0
    total += 1.0
    return total.astype(np.float32)


def _exact_distance(distance: np.ndarray) -> np.ndarray:
    """float64 ``sqrt(round(d^2))`` of a float32 Euclidean distance transform.

    Distances between pixel centres are square roots of integers. OpenCV's float32 result can be off in the
    last bit, depending on which other pixels share the transform (so on the colouring) and, for float32
    arithmetic in numpy, on where the buffer lies in memory: two training runs with one seed differed.
    Rounding the square to the integer (exact below about 1400 px) removes both."""
    exact = distance.astype(np.float64)
    exact *= exact
    np.rint(exact, out=exact)
    return np.sqrt(exact, out=exact)


def _check_label(label: np.ndarray) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"a label must be a 2-D array, got shape {label.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"a label must hold integer ids, got dtype {label.dtype}")
    if label.size and np.issubdtype(label.dtype, np.signedinteger) and label.min() < 0:
        raise ValueError(f"a label must not hold negative ids (min {int(label.min())})")
    return label


def _two_nearest_distances(label: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray] | None:
    """float32 (d1, d2), exact wherever d1 + d2 < radius and with d1 + d2 >= radius elsewhere.

    None when no pixel can have d1 + d2 < radius (fewer than two nuclei, or no two nuclei closer than radius).
    """
    import cv2

    if radius <= 0 or label.size == 0:
        return None
    flat_index = np.flatnonzero(boundary_pixels(label))
    ids = label.ravel()[flat_index]
    nucleus, n_nuclei = _compact_ids(ids)  # nucleus index 0..n-1 of every boundary pixel
    if n_nuclei < 2:
        return None
    rows, cols = np.divmod(flat_index, label.shape[1])
    first, second = _close_pairs(rows, cols, nucleus, n_nuclei, radius)
    if first.size == 0:
        return None
    colour = _greedy_colouring(n_nuclei, first, second)
    n_colours = int(colour.max()) + 1
    n_sets, weight = _code_size(n_colours)
    # Colour c belongs to the sets of its code: the c-th `weight`-subset of range(n_sets).
    codes = np.zeros((n_colours, n_sets), dtype=bool)
    for c, subset in enumerate(itertools.islice(itertools.combinations(range(n_sets), weight), n_colours)):
        codes[c, list(subset)] = True
    member = codes[colour[nucleus]]  # boundary pixel x set

    source = np.empty(label.shape, dtype=np.uint8)
    smallest: list[np.ndarray] = []  # per pixel, the weight + 1 smallest set distances, in increasing order
    for i in range(n_sets):
        # distanceTransform measures the distance to the nearest zero pixel.
        source.fill(1)
        source.ravel()[flat_index[member[:, i]]] = 0
        _insert_sorted(smallest, cv2.distanceTransform(source, cv2.DIST_L2, cv2.DIST_MASK_PRECISE), weight + 1)
    return smallest[0], smallest[weight]


def _insert_sorted(smallest: list[np.ndarray], value: np.ndarray, keep: int) -> None:
    """Insert ``value`` into the pixelwise sorted list ``smallest`` (in place), keeping its ``keep`` smallest."""
    for i, current in enumerate(smallest):
        if i == keep - 1:  # the list is full: the larger of the two falls off
            np.minimum(current, value, out=current)
            return
        smallest[i] = np.minimum(current, value)
        np.maximum(current, value, out=value)  # carried on to the next position
    smallest.append(value)


def _compact_ids(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Map arbitrary positive ids to 0..n-1 (in increasing id order); return the mapped array and n."""
    if ids.size == 0:
        return ids.astype(np.intp), 0
    top = int(ids.max())
    if top < _MAX_LUT_ID:
        lut = np.zeros(top + 1, dtype=np.intp)
        lut[ids] = 1
        present = np.flatnonzero(lut)
        lut[present] = np.arange(present.size)
        return lut[ids], int(present.size)
    unique, inverse = np.unique(ids, return_inverse=True)
    return inverse.ravel(), int(unique.size)


def _close_pairs(
    rows: np.ndarray, cols: np.ndarray, nucleus: np.ndarray, n: int, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of nuclei whose boundary pixels may be closer than ``radius`` (a superset of those that are).

    The lower bound on the distance of two pixel sets is the largest gap between their extents along the
    axes (combined as a Euclidean gap) and along the two diagonals (divided by sqrt 2).
    """
    # A stable argsort of 16-bit keys is a radix sort: much faster than the default for wider ints.
    order = np.argsort(nucleus.astype(np.uint16) if n <= 1 << 16 else nucleus, kind="stable")
    starts = np.concatenate(([0], np.cumsum(np.bincount(nucleus, minlength=n))[:-1]))

    def extent(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values = values[order]
        return np.minimum.reduceat(values, starts), np.maximum.reduceat(values, starts)

    rows, cols = rows.astype(np.int32), cols.astype(np.int32)
    row_lo, row_hi = extent(rows)
    col_lo, col_hi = extent(cols)
    sum_lo, sum_hi = extent(rows + cols)
    diff_lo, diff_hi = extent(rows - cols)

    # Sweep along rows: the candidates of i are the nuclei that start (in row order) before i's last row +
    # radius; a cheap column test then drops most of these horizontal bands.
    by_row = np.argsort(row_lo, kind="stable").astype(np.int32)
    ends = np.searchsorted(row_lo[by_row], row_hi[by_row] + radius, side="left")
    counts = np.maximum(ends - np.arange(1, n + 1), 0)
    total = int(counts.sum())
    first = np.repeat(np.arange(n, dtype=np.int32), counts)
    second = np.arange(total, dtype=np.int32) - np.repeat((np.cumsum(counts) - counts).astype(np.int32), counts)
    second += first + 1
    first, second = by_row[first], by_row[second]
    reach = col_hi + math.ceil(radius)
    overlap = (col_lo[second] < reach[first]) & (col_lo[first] < reach[second])
    first, second = first[overlap], second[overlap]

    def gap(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        return np.maximum(np.maximum(lo[second] - hi[first], lo[first] - hi[second]), 0)

    row_gap, col_gap = gap(row_lo, row_hi), gap(col_lo, col_hi)
    close = row_gap * row_gap + col_gap * col_gap < radius * radius
    close &= gap(sum_lo, sum_hi) < radius * math.sqrt(2.0)
    close &= gap(diff_lo, diff_hi) < radius * math.sqrt(2.0)
    return first[close], second[close]


def _greedy_colouring(n: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Colour the graph (n vertices, edges first-second) greedily, most-connected vertices first."""
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for a, b in zip(first.tolist(), second.tolist(), strict=True):
        neighbours[a].append(b)
        neighbours[b].append(a)
    degree = np.bincount(np.concatenate((first, second)), minlength=n)
    colour = [-1] * n
    for vertex in np.argsort(-degree, kind="stable").tolist():
        taken = {colour[u] for u in neighbours[vertex]}
        c = 0
        while c in taken:
            c += 1
        colour[vertex] = c
    return np.asarray(colour, dtype=np.intp)


def _code_size(n_colours: int) -> tuple[int, int]:
    """Fewest sets m, then smallest weight w, such that m-choose-w >= n_colours (distinct w-subsets of m sets)."""
    n_sets = 2
    while True:
        for weight in range(1, n_sets // 2 + 1):
            if math.comb(n_sets, weight) >= n_colours:
                return n_sets, weight
        n_sets += 1
