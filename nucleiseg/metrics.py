"""Instance-level metrics of nuclei segmentation and classification: exact definitions, vectorised.

Inputs are two labels in the paper's encoding, a prediction ``pred`` and a ground truth ``gt`` (2-D integer
images, 0 background, every nucleus a unique positive id, class ``id % 3``: 0 tumor, 1 lymphocyte, 2 stroma),
and optionally an ``ignore`` map (the ``_other.png`` nuclei, any non-zero pixel is ignored). An id may cover
several disconnected pieces: a nucleus is the set of pixels with its id, no connected-component relabelling.

Definitions
-----------
Ignore map
    A predicted nucleus with at least half its area on ignore pixels (``2 |S ∩ I| >= |S|``) is dropped before
    anything is matched; it counts nowhere. Otherwise ignore pixels are plain background: a kept prediction
    keeps all its pixels, and ground-truth nuclei are not changed.
Notation
    ``G_i`` ground-truth nuclei, ``S_j`` predicted nuclei, ``|.|`` areas in pixels, ``|G_i ∩ S_j|`` overlaps.
    "Largest overlap" partners break ties by the smallest id (as ``argmax`` over sorted ids does).
Detection (the paper's F1)
    Predictions are visited in ascending id order; ``S_j`` is paired with the ground-truth nucleus ``G`` it
    overlaps most. It is a true positive when ``|S_j ∩ G| >= |G| / 2`` and ``G`` is not matched already,
    otherwise a false positive (also when it overlaps nothing). Unmatched ground-truth nuclei are false
    negatives. ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``, ``F1 = 2 TP / (2 TP + FP + FN)``.
Object-level Dice and Hausdorff (Sirinukunwattana et al., GlaS 2017)
    ``0.5 * [sum_i gamma_i D(G_i, S*(G_i)) + sum_j sigma_j D(G*(S_j), S_j)]`` with
    ``gamma_i = |G_i| / sum_k |G_k|``, ``sigma_j = |S_j| / sum_k |S_k|``; ``S*(G_i)`` is the prediction with the
    largest overlap with ``G_i`` and ``G*(S_j)`` likewise. For Dice, ``D = 2 |G ∩ S| / (|G| + |S|)``, and 0 for
    an object that overlaps nothing. For Hausdorff, ``D`` is the Hausdorff distance between all pixels of the
    two objects (Euclidean, in pixels, ``max(max_a min_b |a-b|, max_b min_a |a-b|)``), and an object that
    overlaps nothing is paired with the object of the other set at the smallest Hausdorff distance, searched
    over the whole image. When one side has no objects, Dice is 0 and Hausdorff undefined (NaN).
Per class
    The figures above (and AJI, PQ) on the two labels restricted to the ids of one class (``id % 3 == c``).
Classification
    Over the true-positive pairs of the all-class detection: the 3x3 confusion matrix (rows ground-truth class,
    columns predicted class), ``accuracy`` = trace / pairs, ``accuracy_<class>`` = the diagonal over its row
    (the share of that ground-truth class predicted right).
AJI (Kumar et al. 2017, as HoVer-Net's ``get_fast_aji``)
    Each ``G_i`` that overlaps a prediction takes the prediction ``S`` of highest IoU (ties: smallest id; a
    prediction may serve several); ``AJI = sum |G_i ∩ S| / (sum |G_i ∪ S| + areas of the ground truth that
    overlaps nothing + areas of the predictions chosen by none)``. (HoVer-Net divides by ``union + 1e-6``,
    which only changes which of two exactly equal IoUs wins.)
PQ, DQ, SQ (Kirillov et al. 2019)
    Pairs with ``IoU > 0.5`` (unique by construction). ``DQ = TP / (TP + FP/2 + FN/2)``,
    ``SQ = sum IoU / TP``, ``PQ = sum IoU / (TP + FP/2 + FN/2)`` (= DQ * SQ).
mPQ+ (CoNIC 2022)
    Per class, TP, FP, FN and the IoU sum of the class-restricted PQ are pooled over all images,
    ``PQ+_c = sum IoU / (TP + FP/2 + FN/2)``, and ``mPQ+`` is their mean over the classes.

A figure whose denominator is zero is undefined and returned as NaN: precision without predictions, recall
without ground truth, everything when both labels are empty, SQ without a true positive, an accuracy without
pairs, a class absent from both sides in ``pq_plus`` (and ``mpq_plus`` averages the defined classes). F1, Dice,
AJI, DQ and PQ are 0, not NaN, when exactly one side is empty.

Where this departs from the reference code (github.com/huiqu18/NucleiSegClas, ``utils.py``), it follows the
definitions above: a ground-truth nucleus is matched at most once in detection (the reference can count it
twice), per-class accuracy is normalised by ground-truth class (the reference divides by predicted class), the
nearest-object Hausdorff search is exact (the reference looks in a window of 50 px, doubled while empty),
Hausdorff is also given per class, and ids are used as they are (no connected-component relabelling).

Dataset summary (:func:`summarize`): the mean over images of each per-image figure, NaN values skipped and
counted in ``nan_skipped``; counts are summed; classification and mPQ+ are pooled over all images.

HoVer-Net's CoNSeP protocol (:func:`evaluate_image_hovernet`, :func:`summarize_hovernet`)
-----------------------------------------------------------------------------------------
Graham et al., HoVer-Net, Medical Image Analysis 58 (2019) 101563, as its code computes it
(github.com/vqdang/hover_net: ``compute_stats.py``, ``metrics/stats_utils.py``), so that figures published in
that protocol can be set beside ours. It scores the same labels differently from the paper's protocol above:

Ground truth
    The nuclei of the ignore map join the ground truth as a fourth type, ``other`` (CoNSeP's "miscellaneous";
    types ``0 tumor, 1 lymphocyte, 2 stroma, 3 other``, :data:`HOVERNET_TYPES`): for every figure below they are
    ordinary ground-truth nuclei, and no prediction is dropped. An integer ignore map gives one nucleus per id; a
    boolean one (no ids) one per 4-connected component. Where an ``other`` nucleus overlaps a labelled one, the
    labelled one keeps the pixels. Ground-truth nuclei are ordered labelled ids first, then ``other`` ids; the
    order only breaks exact ties.
Per image (then the mean over images, as ``run_nuclei_inst_stat``)
    ``dice`` (``get_dice_1``): the binary Dice of all nuclei against background, ``2 |T ∩ P| / (|T| + |P|)``
    over foreground pixels.
    ``aji`` (``get_fast_aji``): the AJI above, with each ground-truth nucleus taking the prediction of highest
    ``|G ∩ S| / (|G ∪ S| + 1e-6)`` exactly as HoVer-Net computes it (so between two exactly equal IoUs the larger
    union wins; then the smallest id); a prediction may serve several ground-truth nuclei.
    ``dq``, ``sq``, ``pq`` (``get_fast_pq``, ``match_iou = 0.5``): pairs with ``IoU > 0.5`` (unique by
    construction), ``DQ = TP / (TP + FP/2 + FN/2)``, ``SQ = sum IoU / (TP + 1e-6)``, ``PQ = DQ * SQ``. The
    ``1e-6`` is HoVer-Net's: it lowers SQ by a relative ``1e-6 / TP`` and makes SQ (and PQ) **0, not
    undefined, on an image without a match**, which then counts as 0 in the mean.
Pooled over the set (as ``run_nuclei_type_stat``, ``exhaustive=True``)
    Per image, nuclei are reduced to their centroids (mean pixel coordinates, rounded to float32 as
    ``compute_stats.py`` reads them) and paired by ``pair_coordinates``: the Hungarian assignment
    (``scipy.optimize.linear_sum_assignment``) of minimum total Euclidean distance over *all* ground-truth and
    predicted centroids, of which the pairs farther than 12 px (:data:`HOVERNET_RADIUS`) are then dropped. (This
    is not always the largest set of pairs within 12 px: the assignment may prefer a cheaper long pair.) Pairs,
    unpaired ground truth and unpaired predictions are pooled over all images:
    ``TP_d`` pairs, ``FP_d`` unpaired predictions, ``FN_d`` unpaired ground truth;
    ``f1_d = 2 TP_d / (2 TP_d + FP_d + FN_d)`` (also ``precision_d``, ``recall_d``, not published by HoVer-Net);
    ``type_accuracy`` = pairs of equal type / pairs (pairs with an ``other`` ground truth included);
    per type ``c`` (``_f1_type``, weights ``w = (2, 2, 1, 1)``), over the pairs whose ground truth *or*
    prediction is ``c`` only: ``TP_c`` both ``c``, ``FP_c`` predicted ``c`` but not, ``FN_c`` ``c`` but predicted
    otherwise, and ``TN_c`` "neither is ``c``", which is therefore always 0 as the code computes it; ``FP_dc``,
    ``FN_dc`` the unpaired predictions and ground truth of type ``c``;
    ``F_c = 2 (TP_c + TN_c) / (2 (TP_c + TN_c) + 2 FP_c + 2 FN_c + FP_dc + FN_dc)`` = ``f1_tumor``,
    ``f1_lymphocyte``, ``f1_stroma``, ``f1_other``. Our models predict three classes, never ``other``, so
    ``f1_other`` is 0 wherever the ground truth has ``other`` nuclei: it is reported, not hidden.
Edge cases (where HoVer-Net's code fails or relies on an artefact)
    An image with no nucleus on either side (ground truth and ``other`` included) has every per-image figure
    undefined (NaN; ``get_fast_pq`` raises ZeroDivisionError there); the mean skips it and counts it in
    ``nan_skipped``. Without predictions (ground truth present), or without ground truth (predictions
    present), Dice, AJI, DQ, SQ and PQ are 0 (``get_fast_aji`` raises on an empty prediction; 0 is its limit).
    An empty side adds no centroid to the pooled figures (``compute_stats.py`` inserts a dummy centroid at
    (0, 0) of type 0, a spurious FN_d or FP_d). A pooled figure whose denominator is 0 is NaN: ``f1_d`` with no
    nuclei anywhere, ``type_accuracy`` without pairs, ``F_c`` for a type in neither the ground truth nor the
    predictions (HoVer-Net reports only the types present in the ground truth).

Per image, only counts are kept for the pooled figures (``type_pairs``: a 4x4 matrix of pairs, rows the
ground-truth type, columns the predicted type; ``unpaired_true``, ``unpaired_pred``: per type), since every
pooled figure above is a function of their sums.

Implementation: every overlap comes from one ``np.bincount`` over the pixels where both labels are non-zero;
areas by ``bincount``, boxes by ``scipy.ndimage.find_objects``, the pixels of all nuclei grouped by one sort.
A Hausdorff distance is computed exactly on integer pixel coordinates: from the pixels of one object outside
the other to the boundary pixels of the other (the nearest pixel of a set to an outside point always has a
4-neighbour outside the set). Pairs are cached, so the class groups reuse the all-nuclei work. The search for
the nearest object of one that overlaps nothing visits candidates by increasing lower bound (differences of
the bounding boxes' sides; distances from extreme pixels of one object to the other object or its box) and
stops once the bound reaches the best distance found: exact, without computing every pair.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from nucleiseg.labels import CLASS_NAMES

GROUPS: tuple[str, ...] = ("all", *CLASS_NAMES)
"""The keys of the per-group figures in :func:`evaluate_image`: all nuclei, then each class."""

FIGURES: tuple[str, ...] = ("f1", "precision", "recall", "dice", "hausdorff", "aji", "pq", "dq", "sq")
"""Per-group figures, averaged over images in :func:`summarize`."""

COUNTS: tuple[str, ...] = ("n_pred", "n_gt", "tp", "fp", "fn", "pq_tp", "pq_fp", "pq_fn", "pq_iou_sum")
"""Per-group counts, summed over images in :func:`summarize` (``tp/fp/fn``: detection; ``pq_*``: IoU > 0.5)."""

_DENSE_PAIRS_MAX = 1 << 22  # above this many (pred, gt) index pairs, count overlaps sparsely
_DISTANCE_BLOCK = 1 << 22  # distance-matrix entries per block in the exact Hausdorff


# ----------------------------------------------------------------------------------------------------------
# Label preparation
# ----------------------------------------------------------------------------------------------------------


def _check_label(label: np.ndarray, name: str) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D label, got shape {label.shape}")
    if label.dtype == bool:
        return label.astype(np.uint8)
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"{name}: a label holds integer ids, got {label.dtype}")
    if label.size and np.issubdtype(label.dtype, np.signedinteger) and label.min() < 0:
        raise ValueError(f"{name}: a label must not hold negative ids")
    if label.dtype.kind == "u" and label.dtype.itemsize >= 8:  # bincount cannot take uint64
        label = label.astype(np.int64)
    return label


def _check_pair(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Checked labels, the prediction without its ignored nuclei, and how many were dropped."""
    pred, gt = _check_label(pred, "pred"), _check_label(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt differ in shape: {pred.shape} vs {gt.shape}")
    n_dropped = 0
    if ignore is not None:
        pred, n_dropped = _drop_ignored(pred, ignore, 0.5)
    return pred, gt, n_dropped


def _compact(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted positive ids of ``label`` and an int32 image of their 1-based ranks (0 background)."""
    flat = label.ravel()
    top = int(flat.max()) if flat.size else 0
    if top <= max(1 << 16, 4 * flat.size):
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present)
        lut = np.zeros(top + 1, np.int32)
        lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
        return ids.astype(np.int64), lut[label]
    ids, inverse = np.unique(flat, return_inverse=True)  # huge sparse ids: sort instead of a lookup table
    if ids[0] == 0:
        ids = ids[1:]
    else:
        inverse = inverse + 1
    return ids.astype(np.int64), inverse.reshape(label.shape).astype(np.int32)


def drop_ignored(pred: np.ndarray, ignore: np.ndarray, min_fraction: float = 0.5) -> np.ndarray:
    """``pred`` without the nuclei that have at least ``min_fraction`` of their area on ``ignore > 0`` pixels."""
    return _drop_ignored(_check_label(pred, "pred"), ignore, min_fraction)[0]


def _drop_ignored(pred: np.ndarray, ignore: np.ndarray, min_fraction: float) -> tuple[np.ndarray, int]:
    ignore = np.asarray(ignore)
    if ignore.shape != pred.shape:
        raise ValueError(f"ignore map and pred differ in shape: {ignore.shape} vs {pred.shape}")
    _, index = _compact(pred)
    area = np.bincount(index.ravel())
    on_ignore = np.bincount(index[ignore > 0], minlength=area.size)
    drop = on_ignore >= min_fraction * area
    drop[0] = False
    n_dropped = int(drop.sum())
    if n_dropped == 0:
        return pred, 0
    out = pred.copy()
    out[drop[index]] = 0
    return out, n_dropped


# ----------------------------------------------------------------------------------------------------------
# Objects and their overlaps
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Objects:
    """The nuclei of one label: sorted ids, rank image, areas, boxes and (lazily) pixel coordinates."""

    ids: np.ndarray  # (N,) int64
    index: np.ndarray  # H x W int32: k + 1 on the pixels of ids[k]
    area: np.ndarray  # (N,) int64
    bbox: np.ndarray  # (N, 4) int64: row start, row stop, col start, col stop
    _pixels: tuple[np.ndarray, ...] | None = None

    @classmethod
    def of(cls, label: np.ndarray) -> _Objects:
        ids, index = _compact(label)
        area = np.bincount(index.ravel(), minlength=ids.size + 1)[1:].astype(np.int64)
        boxes = ndi.find_objects(index, max_label=ids.size)
        bbox = np.array([(s[0].start, s[0].stop, s[1].start, s[1].stop) for s in boxes], np.int64).reshape(-1, 4)
        return cls(ids, index, area, bbox)

    def _grouped(self, mask: np.ndarray, dtype: type) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows and columns of the pixels of ``mask`` grouped by nucleus, and each nucleus's start offset."""
        flat = np.flatnonzero(mask)
        owner = self.index.ravel()[flat]
        flat = flat[np.argsort(owner, kind="stable")]
        start = np.zeros(self.ids.size + 1, np.int64)
        np.cumsum(np.bincount(owner, minlength=self.ids.size + 1)[1:], out=start[1:])
        rows, cols = np.divmod(flat, self.index.shape[1])
        return rows.astype(dtype), cols.astype(dtype), start

    @property
    def pixels(self) -> tuple[np.ndarray, ...]:
        """Rows, columns and per-nucleus start offsets of all pixels, grouped by nucleus in raster order; then
        the same for the boundary pixels (those with a 4-neighbour, inside the image, not of the nucleus)."""
        if self._pixels is None:
            lab = self.index
            edge = np.zeros(lab.shape, bool)
            step = lab[1:, :] != lab[:-1, :]
            edge[1:, :] |= step
            edge[:-1, :] |= step
            step = lab[:, 1:] != lab[:, :-1]
            edge[:, 1:] |= step
            edge[:, :-1] |= step
            # int32 arithmetic is several times faster; squared distances fit below 2**31 up to 32767 px
            dtype = np.int32 if max(lab.shape) <= 32767 else np.int64
            self._pixels = (*self._grouped(lab > 0, dtype), *self._grouped(edge & (lab > 0), dtype))
        return self._pixels

    def ends(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows and columns, (len(ks), 2), of the first and the last pixel in raster order of nuclei ``ks``."""
        rows, cols, start = self.pixels[:3]
        at = np.stack([start[ks], start[ks + 1] - 1], axis=1)
        return rows[at].astype(np.int64), cols[at].astype(np.int64)

    def coords(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rows and columns of all pixels of nucleus ``k``, then of its boundary pixels."""
        rows, cols, start, b_rows, b_cols, b_start = self.pixels
        s, e, bs, be = start[k], start[k + 1], b_start[k], b_start[k + 1]
        return rows[s:e], cols[s:e], b_rows[bs:be], b_cols[bs:be]


def _overlaps(pred: _Objects, gt: _Objects) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All overlapping (pred, gt) index pairs, sorted by pred then gt, with their overlap areas."""
    p, g = pred.index.ravel(), gt.index.ravel()
    both = (p > 0) & (g > 0)
    n_gt = gt.ids.size
    code = (p[both].astype(np.int64) - 1) * n_gt + (g[both] - 1)
    if pred.ids.size * n_gt <= _DENSE_PAIRS_MAX:
        counts = np.bincount(code, minlength=pred.ids.size * n_gt)
        code = np.flatnonzero(counts)
        inter = counts[code]
    else:
        code, inter = np.unique(code, return_counts=True)
    return code // n_gt, code % n_gt, inter.astype(np.int64)


def _directed_sq(src_r: np.ndarray, src_c: np.ndarray, dst_r: np.ndarray, dst_c: np.ndarray) -> int:
    """``max over sources of min over targets`` of squared Euclidean distance (0 without sources)."""
    if src_r.size == 0:
        return 0
    if dst_r.size == 0:
        raise ValueError("an object without boundary pixels cannot be a Hausdorff target")
    best = 0
    block = max(1, _DISTANCE_BLOCK // dst_r.size)
    for s in range(0, src_r.size, block):
        dr = src_r[s : s + block, None] - dst_r[None, :]
        dc = src_c[s : s + block, None] - dst_c[None, :]
        d2 = dr * dr
        d2 += dc * dc
        best = max(best, int(d2.min(axis=1).max()))
    return best


@dataclass
class _Context:
    """Both labels' objects, their overlaps and a cache of squared Hausdorff distances per (pred, gt) pair."""

    pred: _Objects
    gt: _Objects
    pair_pred: np.ndarray
    pair_gt: np.ndarray
    pair_inter: np.ndarray
    hausdorff_sq: dict[tuple[int, int], int] = field(default_factory=dict)

    @classmethod
    def of(cls, pred: np.ndarray, gt: np.ndarray) -> _Context:
        p, g = _Objects.of(pred), _Objects.of(gt)
        return cls(p, g, *_overlaps(p, g))

    def pair_hausdorff_sq(self, p: int, g: int) -> int:
        key = (p, g)
        found = self.hausdorff_sq.get(key)
        if found is None:
            pr, pc, pbr, pbc = self.pred.coords(p)
            gr, gc, gbr, gbc = self.gt.coords(g)
            outside = self.gt.index[pr, pc] != g + 1  # pixels of p outside g: inside ones are at distance 0
            d_pg = _directed_sq(pr[outside], pc[outside], gbr, gbc)
            outside = self.pred.index[gr, gc] != p + 1
            d_gp = _directed_sq(gr[outside], gc[outside], pbr, pbc)
            found = self.hausdorff_sq[key] = max(d_pg, d_gp)
        return found

    def group(self, cls: int | None) -> _Group:
        """The nuclei of class ``cls`` of both labels (all nuclei for ``None``) with their overlaps."""
        if cls is None:
            p_sel, g_sel = np.arange(self.pred.ids.size), np.arange(self.gt.ids.size)
            pp, gg, inter = self.pair_pred, self.pair_gt, self.pair_inter
        else:
            p_in, g_in = self.pred.ids % 3 == cls, self.gt.ids % 3 == cls
            p_sel, g_sel = np.flatnonzero(p_in), np.flatnonzero(g_in)
            keep = p_in[self.pair_pred] & g_in[self.pair_gt]
            p_local = np.cumsum(p_in) - 1
            g_local = np.cumsum(g_in) - 1
            pp, gg = p_local[self.pair_pred[keep]], g_local[self.pair_gt[keep]]
            inter = self.pair_inter[keep]
        return _Group(self, p_sel, g_sel, pp, gg, inter)


def _best(key_a: np.ndarray, key_b: np.ndarray, score: np.ndarray, n_a: int) -> np.ndarray:
    """For each of ``n_a`` objects, the index of its pair of highest ``score`` (ties: smallest ``key_b``), or -1."""
    best = np.full(n_a, -1, np.int64)
    if key_a.size:
        order = np.lexsort((key_b, -score, key_a))
        first = np.ones(order.size, bool)
        first[1:] = key_a[order[1:]] != key_a[order[:-1]]
        best[key_a[order[first]]] = order[first]
    return best


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


@dataclass
class _Group:
    """A selection of nuclei (all, or one class) from both labels, with local indices."""

    ctx: _Context
    p_sel: np.ndarray  # local pred index -> index in ctx.pred
    g_sel: np.ndarray
    pair_pred: np.ndarray  # local indices
    pair_gt: np.ndarray
    pair_inter: np.ndarray

    @property
    def n_pred(self) -> int:
        return int(self.p_sel.size)

    @property
    def n_gt(self) -> int:
        return int(self.g_sel.size)

    @property
    def pred_area(self) -> np.ndarray:
        return self.ctx.pred.area[self.p_sel]

    @property
    def gt_area(self) -> np.ndarray:
        return self.ctx.gt.area[self.g_sel]

    def detection(self) -> dict[str, Any]:
        best = _best(self.pair_pred, self.pair_gt, self.pair_inter, self.n_pred)
        has = best >= 0
        covered = np.zeros(self.n_pred, bool)
        covered[has] = 2 * self.pair_inter[best[has]] >= self.gt_area[self.pair_gt[best[has]]]
        candidates = np.flatnonzero(covered)
        # np.unique keeps the first occurrence: the smallest pred id among those covering the same nucleus.
        _, first = np.unique(self.pair_gt[best[candidates]], return_index=True)
        tp_pred = np.sort(candidates[first])
        tp_gt = self.pair_gt[best[tp_pred]]
        tp = int(tp_pred.size)
        fp, fn = self.n_pred - tp, self.n_gt - tp
        return {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "pairs": np.stack([self.ctx.pred.ids[self.p_sel[tp_pred]], self.ctx.gt.ids[self.g_sel[tp_gt]]], 1),
        }

    def _partners(self) -> tuple[np.ndarray, np.ndarray]:
        """Pair index of the largest overlap of each gt nucleus and of each predicted nucleus (-1: none)."""
        return (
            _best(self.pair_gt, self.pair_pred, self.pair_inter, self.n_gt),
            _best(self.pair_pred, self.pair_gt, self.pair_inter, self.n_pred),
        )

    def dice(self) -> float:
        if self.n_pred == 0 or self.n_gt == 0:
            return 0.0 if self.n_pred + self.n_gt else math.nan
        pa, ga = self.pred_area, self.gt_area
        pair_dice = 2.0 * self.pair_inter / (pa[self.pair_pred] + ga[self.pair_gt])
        terms = []
        for best, area in zip(self._partners(), (ga, pa), strict=True):
            d = np.zeros(best.size)
            d[best >= 0] = pair_dice[best[best >= 0]]
            terms.append(float(np.sum(area * d)) / float(area.sum()))
        return 0.5 * (terms[0] + terms[1])

    def _nearest_sq(self, k: int, of_gt: bool) -> int:
        """Exact smallest squared Hausdorff distance from local nucleus ``k`` to the other side's nuclei.

        Candidates are visited by increasing lower bound and the search stops when the bound reaches the
        best distance found. Bounds (each <= the Hausdorff distance): the largest difference of the two boxes'
        sides, the distance from the other nucleus's top and bottom pixels to this nucleus, and from this
        nucleus's top and bottom pixels to the other's box.
        """
        ctx = self.ctx
        me, other = (ctx.gt, ctx.pred) if of_gt else (ctx.pred, ctx.gt)
        me_k = int((self.g_sel if of_gt else self.p_sel)[k])
        cand = self.p_sel if of_gt else self.g_sel

        def exact(j: int) -> int:
            return ctx.pair_hausdorff_sq(j, me_k) if of_gt else ctx.pair_hausdorff_sq(me_k, j)

        side = np.abs(other.bbox[cand] - me.bbox[me_k]).max(axis=1)
        first = int(np.argmin(side))
        best = exact(int(cand[first]))
        cand, bound = cand[side * side < best], (side * side)[side * side < best]
        if cand.size == 0:
            return best
        _, _, b_rows, b_cols = me.coords(me_k)
        rows, cols = other.ends(cand)  # (n, 2) each
        dr = rows[:, :, None] - b_rows
        dc = cols[:, :, None] - b_cols
        to_me = (dr * dr + dc * dc).min(axis=2).max(axis=1)
        my_rows, my_cols = me.ends(np.array([me_k]))
        box = other.bbox[cand]
        gap_r = np.maximum(np.maximum(box[:, 0, None] - my_rows, my_rows - (box[:, 1, None] - 1)), 0)
        gap_c = np.maximum(np.maximum(box[:, 2, None] - my_cols, my_cols - (box[:, 3, None] - 1)), 0)
        to_box = (gap_r * gap_r + gap_c * gap_c).max(axis=1)
        bound = np.maximum(np.maximum(bound, to_me), to_box)
        for j in np.argsort(bound, kind="stable"):
            if bound[j] >= best:
                break
            best = min(best, exact(int(cand[j])))
        return best

    def hausdorff(self) -> float:
        if self.n_pred == 0 or self.n_gt == 0:
            return math.nan
        ctx = self.ctx
        gt_best, pred_best = self._partners()
        terms = []
        for best, area, of_gt in ((gt_best, self.gt_area, True), (pred_best, self.pred_area, False)):
            dist = np.empty(best.size)
            for k, b in enumerate(best.tolist()):
                if b < 0:
                    d2 = self._nearest_sq(k, of_gt)
                else:
                    d2 = ctx.pair_hausdorff_sq(int(self.p_sel[self.pair_pred[b]]), int(self.g_sel[self.pair_gt[b]]))
                dist[k] = math.sqrt(d2)
            terms.append(float(np.sum(area * dist)) / float(area.sum()))
        return 0.5 * (terms[0] + terms[1])

    def _union(self) -> np.ndarray:
        return self.pred_area[self.pair_pred] + self.gt_area[self.pair_gt] - self.pair_inter

    def aji(self, union_epsilon: float = 0.0) -> float:
        """AJI; ``union_epsilon`` is added to the unions when choosing partners (HoVer-Net's 1e-6)."""
        union = self._union()
        iou = self.pair_inter / (union + union_epsilon) if union_epsilon else self.pair_inter / np.maximum(union, 1)
        best = _best(self.pair_gt, self.pair_pred, iou, self.n_gt)
        chosen = best[best >= 0]
        used = np.zeros(self.n_pred, bool)
        used[self.pair_pred[chosen]] = True
        inter = int(self.pair_inter[chosen].sum())
        total = int(union[chosen].sum()) + int(self.gt_area[best < 0].sum()) + int(self.pred_area[~used].sum())
        return _ratio(inter, total)

    def panoptic_quality(self) -> dict[str, float | int]:
        union = self._union()
        match = 2 * self.pair_inter > union  # IoU > 0.5, exactly
        tp = int(match.sum())
        iou_sum = float(np.sum(self.pair_inter[match] / union[match]))
        fp, fn = self.n_pred - tp, self.n_gt - tp
        den = tp + 0.5 * (fp + fn)
        return {
            "pq": _ratio(iou_sum, den),
            "dq": _ratio(tp, den),
            "sq": _ratio(iou_sum, tp),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "iou_sum": iou_sum,
        }

    def figures(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """All per-group figures and counts (keys :data:`FIGURES` + :data:`COUNTS`), and the detection."""
        det = self.detection()
        pq = self.panoptic_quality()
        out: dict[str, Any] = {
            "f1": det["f1"],
            "precision": det["precision"],
            "recall": det["recall"],
            "dice": self.dice(),
            "hausdorff": self.hausdorff(),
            "aji": self.aji(),
            "pq": pq["pq"],
            "dq": pq["dq"],
            "sq": pq["sq"],
            "n_pred": self.n_pred,
            "n_gt": self.n_gt,
            "tp": det["tp"],
            "fp": det["fp"],
            "fn": det["fn"],
            "pq_tp": pq["tp"],
            "pq_fp": pq["fp"],
            "pq_fn": pq["fn"],
            "pq_iou_sum": pq["iou_sum"],
        }
        return out, det


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _group(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None) -> _Group:
    pred, gt, _ = _check_pair(pred, gt, ignore)
    return _Context.of(pred, gt).group(None)


def detection(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> dict[str, Any]:
    """The paper's detection: ``tp``, ``fp``, ``fn``, ``precision``, ``recall``, ``f1``, and ``pairs``,
    the true positives as a (TP, 2) array of (pred id, gt id) in ascending pred id."""
    return _group(pred, gt, ignore).detection()


def object_dice(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Object-level Dice (GlaS)."""
    return _group(pred, gt, ignore).dice()


def object_hausdorff(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Object-level Hausdorff distance in pixels (GlaS, exact nearest-object search); NaN if a side is empty."""
    return _group(pred, gt, ignore).hausdorff()


def aji(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017), as HoVer-Net's ``get_fast_aji``."""
    return _group(pred, gt, ignore).aji()


def panoptic_quality(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> dict[str, float | int]:
    """``pq``, ``dq``, ``sq`` and the counts ``tp``, ``fp``, ``fn``, ``iou_sum`` of the IoU > 0.5 matching."""
    return _group(pred, gt, ignore).panoptic_quality()


def confusion_figures(confusion: np.ndarray) -> dict[str, Any]:
    """Accuracy overall and per ground-truth class from a 3x3 confusion matrix (rows gt, columns pred)."""
    confusion = np.asarray(confusion, dtype=np.int64).reshape(3, 3)
    out: dict[str, Any] = {"accuracy": _ratio(np.trace(confusion), confusion.sum())}
    for c, name in enumerate(CLASS_NAMES):
        out[f"accuracy_{name}"] = _ratio(confusion[c, c], confusion[c].sum())
    out["confusion"] = confusion.tolist()
    out["n_pairs"] = int(confusion.sum())
    return out


def _confusion(pairs: np.ndarray) -> np.ndarray:
    return np.bincount(3 * (pairs[:, 1] % 3) + pairs[:, 0] % 3, minlength=9).reshape(3, 3)


def classification(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> dict[str, Any]:
    """Classification among the true positives of the all-class detection: ``accuracy``,
    ``accuracy_<class>`` (row-normalised), ``confusion`` (rows gt, columns pred) and ``n_pairs``."""
    return confusion_figures(_confusion(detection(pred, gt, ignore)["pairs"]))


def _pq_plus(per_class: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    return {
        name: _ratio(
            per_class[name]["pq_iou_sum"],
            per_class[name]["pq_tp"] + 0.5 * (per_class[name]["pq_fp"] + per_class[name]["pq_fn"]),
        )
        for name in CLASS_NAMES
    }


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def evaluate_image(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> dict[str, Any]:
    """Every figure of one image, as plain Python numbers (NaN where undefined).

    Keys: ``all``, ``tumor``, ``lymphocyte``, ``stroma`` (each :data:`FIGURES` + :data:`COUNTS`),
    ``classification`` (see :func:`classification`), ``pq_plus`` (per class), ``mpq_plus``, and ``n_ignored``
    (predicted nuclei dropped on the ignore map).
    """
    pred, gt, n_dropped = _check_pair(pred, gt, ignore)
    ctx = _Context.of(pred, gt)
    out: dict[str, Any] = {}
    for c, name in enumerate(GROUPS):
        figures, det = ctx.group(None if name == "all" else c - 1).figures()
        out[name] = figures
        if name == "all":
            out["classification"] = confusion_figures(_confusion(det["pairs"]))
    out["pq_plus"] = _pq_plus(out)
    out["mpq_plus"] = _nanmean(list(out["pq_plus"].values()))
    out["n_ignored"] = n_dropped
    return out


def summarize(per_image: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The dataset summary of :func:`evaluate_image` results: per-group figures averaged over images (NaN
    skipped, counted in ``nan_skipped``), counts summed, classification and mPQ+ pooled; plus ``n_images``."""
    images = list(per_image.values())
    out: dict[str, Any] = {}
    for name in GROUPS:
        group: dict[str, Any] = {}
        for fig in FIGURES:
            group[fig] = _nanmean([float(img[name][fig]) for img in images])
        for count in COUNTS:
            total = sum(img[name][count] for img in images)
            group[count] = float(total) if count == "pq_iou_sum" else int(total)
        group["nan_skipped"] = {fig: sum(math.isnan(float(img[name][fig])) for img in images) for fig in FIGURES}
        out[name] = group
    confusion = sum((np.asarray(img["classification"]["confusion"]) for img in images), np.zeros((3, 3), np.int64))
    out["classification"] = confusion_figures(confusion)
    out["pq_plus"] = _pq_plus(out)
    out["mpq_plus"] = _nanmean(list(out["pq_plus"].values()))
    out["n_ignored"] = int(sum(img["n_ignored"] for img in images))
    out["n_images"] = len(images)
    return out


# ----------------------------------------------------------------------------------------------------------
# HoVer-Net's CoNSeP protocol
# ----------------------------------------------------------------------------------------------------------

HOVERNET_TYPES: tuple[str, ...] = (*CLASS_NAMES, "other")
"""Nucleus types of HoVer-Net's protocol: the three classes, then the ignore map's nuclei (never predicted here)."""

HOVERNET_IMAGE_FIGURES: tuple[str, ...] = ("dice", "aji", "dq", "sq", "pq")
"""Per-image figures of :func:`evaluate_image_hovernet`, averaged over images by :func:`summarize_hovernet`."""

HOVERNET_IMAGE_COUNTS: tuple[str, ...] = ("n_pred", "n_true", "n_other", "pq_tp", "pq_fp", "pq_fn", "pq_iou_sum")
"""Per-image counts (``n_true`` includes the ``n_other`` nuclei of the ignore map), summed over images."""

HOVERNET_POOLED_FIGURES: tuple[str, ...] = (
    "f1_d",
    "precision_d",
    "recall_d",
    "type_accuracy",
    *(f"f1_{name}" for name in HOVERNET_TYPES),
)
"""Figures pooled over all images from the centroid pairing (:func:`hovernet_type_figures`)."""

HOVERNET_RADIUS = 12.0
"""Largest centroid distance of a detection pair, in pixels (``compute_stats.py``)."""

HOVERNET_TYPE_WEIGHTS: tuple[int, int, int, int] = (2, 2, 1, 1)
"""Weights of ``FP_c``, ``FN_c``, ``FP_dc``, ``FN_dc`` in HoVer-Net's per-type F1."""

_HOVERNET_EPSILON = 1e-6  # added by HoVer-Net to the AJI unions and to TP in SQ; kept so figures agree exactly


def _hovernet_truth(gt: np.ndarray, other: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int]:
    """The ground truth with the ignore map's nuclei as ids 1..N (labelled ids first), their types, and N_other."""
    gt_ids, truth = _compact(gt)
    types = (gt_ids % 3).astype(np.int64)
    if other is None:
        return truth, types, 0
    other = np.asarray(other)
    if other.shape != gt.shape:
        raise ValueError(f"ignore map and gt differ in shape: {other.shape} vs {gt.shape}")
    # A boolean map carries no ids: one nucleus per connected component.
    other = ndi.label(other)[0] if other.dtype == bool else _check_label(other, "ignore map")
    other_ids, other_index = _compact(np.where(truth == 0, other, 0))  # labelled nuclei keep shared pixels
    truth = np.where(other_index > 0, other_index + gt_ids.size, truth).astype(np.int32)
    types = np.concatenate([types, np.full(other_ids.size, HOVERNET_TYPES.index("other"), np.int64)])
    return truth, types, int(other_ids.size)


def _centroids(objects: _Objects) -> np.ndarray:
    """(N, 2) centroids (x = column, y = row) of the nuclei, float32 as HoVer-Net reads them."""
    index = objects.index.ravel()
    on = np.flatnonzero(index)
    owner = index[on]
    rows, cols = np.divmod(on, objects.index.shape[1])
    n = objects.ids.size + 1
    x = np.bincount(owner, weights=cols, minlength=n)[1:] / objects.area
    y = np.bincount(owner, weights=rows, minlength=n)[1:] / objects.area
    return np.stack([x, y], axis=1).astype(np.float32)


def pair_centroids(
    true_xy: np.ndarray, pred_xy: np.ndarray, radius: float = HOVERNET_RADIUS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HoVer-Net's ``pair_coordinates``: the minimum-total-distance assignment of all points, pairs within
    ``radius`` kept. Returns the (K, 2) pairs (true index, pred index), the unpaired true and predicted indices.

    The distance matrix is dense (``len(true_xy) x len(pred_xy)``), as HoVer-Net's: fine for tiles, not slides.
    """
    # Imported here: scipy.optimize is slow to import and only this protocol needs it.
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    true_xy, pred_xy = np.asarray(true_xy).reshape(-1, 2), np.asarray(pred_xy).reshape(-1, 2)
    if len(true_xy) == 0 or len(pred_xy) == 0:  # nothing to assign (HoVer-Net would add a dummy point)
        return np.zeros((0, 2), np.int64), np.arange(len(true_xy)), np.arange(len(pred_xy))
    distance = cdist(true_xy, pred_xy, metric="euclidean")
    rows, cols = linear_sum_assignment(distance)
    near = distance[rows, cols] <= radius
    pairs = np.stack([rows[near], cols[near]], axis=1).astype(np.int64)
    return pairs, np.delete(np.arange(len(true_xy)), rows[near]), np.delete(np.arange(len(pred_xy)), cols[near])


def hovernet_type_figures(
    type_pairs: np.ndarray, unpaired_true: np.ndarray, unpaired_pred: np.ndarray
) -> dict[str, Any]:
    """The pooled detection and type figures (:data:`HOVERNET_POOLED_FIGURES`) from the pairing counts.

    ``type_pairs`` is the 4x4 matrix of pairs (rows ground-truth type, columns predicted type, in the order of
    :data:`HOVERNET_TYPES`); ``unpaired_true`` and ``unpaired_pred`` count the unpaired nuclei per type. Also
    returns the counts ``tp_d``, ``fp_d``, ``fn_d`` and the three inputs as lists.
    """
    n_types = len(HOVERNET_TYPES)
    pairs = np.asarray(type_pairs, dtype=np.int64).reshape(n_types, n_types)
    missed = np.asarray(unpaired_true, dtype=np.int64).reshape(n_types)
    extra = np.asarray(unpaired_pred, dtype=np.int64).reshape(n_types)
    tp_d, fp_d, fn_d = int(pairs.sum()), int(extra.sum()), int(missed.sum())
    out: dict[str, Any] = {
        "f1_d": _ratio(2 * tp_d, 2 * tp_d + fp_d + fn_d),
        "precision_d": _ratio(tp_d, tp_d + fp_d),
        "recall_d": _ratio(tp_d, tp_d + fn_d),
        "type_accuracy": _ratio(np.trace(pairs), tp_d),
    }
    w = HOVERNET_TYPE_WEIGHTS
    for c, name in enumerate(HOVERNET_TYPES):
        # Of the pairs kept for type c (truth or prediction c), none is "neither c": TN_c is 0 (module docstring).
        tp_c, tn_c = int(pairs[c, c]), 0
        fp_c, fn_c = int(pairs[:, c].sum()) - tp_c, int(pairs[c, :].sum()) - tp_c
        correct = 2 * (tp_c + tn_c)
        out[f"f1_{name}"] = _ratio(correct, correct + w[0] * fp_c + w[1] * fn_c + w[2] * extra[c] + w[3] * missed[c])
    out.update(tp_d=tp_d, fp_d=fp_d, fn_d=fn_d)
    out.update(type_pairs=pairs.tolist(), unpaired_true=missed.tolist(), unpaired_pred=extra.tolist())
    return out


def evaluate_image_hovernet(pred: np.ndarray, gt: np.ndarray, other: np.ndarray | None = None) -> dict[str, Any]:
    """One image in HoVer-Net's protocol (module docstring), as plain Python numbers (NaN where undefined).

    ``other`` is the ignore map: its nuclei join the ground truth as type ``other``. Keys:
    :data:`HOVERNET_IMAGE_FIGURES`, :data:`HOVERNET_IMAGE_COUNTS`, the centroid pairing's ``tp_d``, ``fp_d``,
    ``fn_d``, and per type ``type_pairs`` (4x4, rows truth), ``unpaired_true``, ``unpaired_pred``.
    """
    pred, gt = _check_label(pred, "pred"), _check_label(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt differ in shape: {pred.shape} vs {gt.shape}")
    truth, true_types, n_other = _hovernet_truth(gt, other)
    ctx = _Context.of(pred, truth)
    group = ctx.group(None)
    n_pred, n_true = group.n_pred, group.n_gt

    pred_fg, true_fg = ctx.pred.index > 0, ctx.gt.index > 0
    dice = _ratio(2 * int(np.count_nonzero(pred_fg & true_fg)), int(pred_fg.sum()) + int(true_fg.sum()))
    matched = group.panoptic_quality()
    tp, fp, fn = matched["tp"], matched["fp"], matched["fn"]
    dq = _ratio(tp, tp + 0.5 * fp + 0.5 * fn)
    sq = math.nan if n_pred + n_true == 0 else float(matched["iou_sum"]) / (tp + _HOVERNET_EPSILON)

    pred_types = (ctx.pred.ids % 3).astype(np.int64)
    pairs, missed, extra = pair_centroids(_centroids(ctx.gt), _centroids(ctx.pred))
    n_types = len(HOVERNET_TYPES)
    type_pairs = np.bincount(
        n_types * true_types[pairs[:, 0]] + pred_types[pairs[:, 1]], minlength=n_types * n_types
    ).reshape(n_types, n_types)
    return {
        "dice": dice,
        "aji": group.aji(union_epsilon=_HOVERNET_EPSILON),
        "dq": dq,
        "sq": sq,
        "pq": dq * sq,
        "n_pred": n_pred,
        "n_true": n_true,
        "n_other": n_other,
        "pq_tp": tp,
        "pq_fp": fp,
        "pq_fn": fn,
        "pq_iou_sum": float(matched["iou_sum"]),
        "tp_d": int(pairs.shape[0]),
        "fp_d": int(extra.size),
        "fn_d": int(missed.size),
        "type_pairs": type_pairs.tolist(),
        "unpaired_true": np.bincount(true_types[missed], minlength=n_types).tolist(),
        "unpaired_pred": np.bincount(pred_types[extra], minlength=n_types).tolist(),
    }


def summarize_hovernet(per_image: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The set's figures in HoVer-Net's protocol from :func:`evaluate_image_hovernet` results.

    ``mean``: :data:`HOVERNET_IMAGE_FIGURES` averaged over images (NaN skipped and counted in ``nan_skipped``)
    and :data:`HOVERNET_IMAGE_COUNTS` summed; ``pooled``: :func:`hovernet_type_figures` of the summed pairing
    counts; ``n_images``.
    """
    images = list(per_image.values())
    mean: dict[str, Any] = {fig: _nanmean([float(img[fig]) for img in images]) for fig in HOVERNET_IMAGE_FIGURES}
    for count in HOVERNET_IMAGE_COUNTS:
        total = sum(img[count] for img in images)
        mean[count] = float(total) if count == "pq_iou_sum" else int(total)
    mean["nan_skipped"] = {fig: sum(math.isnan(float(img[fig])) for img in images) for fig in HOVERNET_IMAGE_FIGURES}
    n_types = len(HOVERNET_TYPES)
    pooled = hovernet_type_figures(
        sum((np.asarray(img["type_pairs"]) for img in images), np.zeros((n_types, n_types), np.int64)),
        sum((np.asarray(img["unpaired_true"]) for img in images), np.zeros(n_types, np.int64)),
        sum((np.asarray(img["unpaired_pred"]) for img in images), np.zeros(n_types, np.int64)),
    )
    return {"mean": mean, "pooled": pooled, "n_images": len(images)}
