"""HoVer-Net's CoNSeP protocol: against a plain port of HoVer-Net's own code, hand-computed cases, real tiles.

The plain reference below follows ``compute_stats.py`` and ``metrics/stats_utils.py`` of
github.com/vqdang/hover_net line by line: one full-image mask per nucleus, loops over nuclei, ``np.argmax`` and
``np.nonzero`` as there, the pairing by ``cdist`` + ``linear_sum_assignment``, and the pooled type statistics
built from index arrays with offsets per image, as ``run_nuclei_type_stat`` does, ``_f1_type`` included.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from typer.testing import CliRunner

from nucleiseg import metrics
from nucleiseg.cli import app
from nucleiseg.evaluation import headline
from nucleiseg.labels import read_label, write_label
from nucleiseg.params import load_params
from nucleiseg.report import REFERENCES, render

ROOT = Path(__file__).resolve().parent.parent
OTHER = 3  # type index of the ignore map's nuclei

# ----------------------------------------------------------------------------------------------------------
# The plain port of HoVer-Net's code
# ----------------------------------------------------------------------------------------------------------


def _ids(label):
    ids = np.unique(label)
    return [int(i) for i in ids[ids > 0]]


def plain_truth(gt, other):
    """Ground truth ids 1..N: labelled ids ascending, then the ignore map's ids ascending on gt background."""
    truth = np.zeros(gt.shape, np.int32)
    types = []
    for i in _ids(gt):
        types.append(i % 3)
        truth[gt == i] = len(types)
    if other is not None:
        for j in _ids(other):
            mask = (other == j) & (gt == 0)
            if mask.any():
                types.append(OTHER)
                truth[mask] = len(types)
    return truth, np.array(types, np.int32)


def plain_pred(pred):
    """``remap_label(pred, by_size=False)`` and the class of each id."""
    out = np.zeros(pred.shape, np.int32)
    types = []
    for i in _ids(pred):
        types.append(i % 3)
        out[pred == i] = len(types)
    return out, np.array(types, np.int32)


def get_dice_1(true, pred):
    true, pred = np.copy(true), np.copy(pred)
    true[true > 0] = 1
    pred[pred > 0] = 1
    return 2.0 * np.sum(true * pred) / np.sum(true + pred)


def _pairwise(true, pred):
    true_id_list, pred_id_list = list(np.unique(true)), list(np.unique(pred))
    true_masks = [None] + [np.array(true == t, np.uint8) for t in true_id_list[1:]]
    pred_masks = [None] + [np.array(pred == p, np.uint8) for p in pred_id_list[1:]]
    inter = np.zeros([len(true_id_list) - 1, len(pred_id_list) - 1], dtype=np.float64)
    union = np.zeros([len(true_id_list) - 1, len(pred_id_list) - 1], dtype=np.float64)
    for true_id in true_id_list[1:]:
        t_mask = true_masks[true_id]
        for pred_id in np.unique(pred[t_mask > 0]):
            if pred_id == 0:
                continue
            p_mask = pred_masks[pred_id]
            total = (t_mask + p_mask).sum()
            both = (t_mask * p_mask).sum()
            inter[true_id - 1, pred_id - 1] = both
            union[true_id - 1, pred_id - 1] = total - both
    return true_id_list, pred_id_list, true_masks, pred_masks, inter, union


def get_fast_aji(true, pred):
    true_id_list, pred_id_list, true_masks, pred_masks, inter, union = _pairwise(true, pred)
    iou = inter / (union + 1.0e-6)
    paired_pred = np.argmax(iou, axis=1)
    iou = np.max(iou, axis=1)
    paired_true = np.nonzero(iou > 0.0)[0]
    paired_pred = paired_pred[paired_true]
    overall_inter = (inter[paired_true, paired_pred]).sum()
    overall_union = (union[paired_true, paired_pred]).sum()
    paired_true, paired_pred = list(paired_true + 1), list(paired_pred + 1)
    for true_id in [i for i in true_id_list[1:] if i not in paired_true]:
        overall_union += true_masks[true_id].sum()
    for pred_id in [i for i in pred_id_list[1:] if i not in paired_pred]:
        overall_union += pred_masks[pred_id].sum()
    return overall_inter / overall_union


def get_fast_pq(true, pred, match_iou=0.5):
    true_id_list, pred_id_list, _, _, inter, union = _pairwise(true, pred)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    iou[iou <= match_iou] = 0.0
    paired_true, paired_pred = np.nonzero(iou)
    paired_iou = iou[paired_true, paired_pred]
    paired_true, paired_pred = list(paired_true + 1), list(paired_pred + 1)
    tp = len(paired_true)
    fp = len([i for i in pred_id_list[1:] if i not in paired_pred])
    fn = len([i for i in true_id_list[1:] if i not in paired_true])
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = paired_iou.sum() / (tp + 1.0e-6)
    return [dq, sq, dq * sq]


def plain_centroids(label):
    """``inst_centroid``: (x, y) centre of mass of each id 1..N, read as float32."""
    out = []
    for k in _ids(label):
        rows, cols = np.nonzero(label == k)
        out.append([cols.mean(), rows.mean()])
    return np.array(out, dtype=np.float64).reshape(-1, 2).astype("float32")


def pair_coordinates(set_a, set_b, radius):
    pair_distance = cdist(set_a, set_b, metric="euclidean")
    indices_a, paired_indices_b = linear_sum_assignment(pair_distance)
    pair_cost = pair_distance[indices_a, paired_indices_b]
    paired_a = indices_a[pair_cost <= radius]
    paired_b = paired_indices_b[pair_cost <= radius]
    pairing = np.concatenate([paired_a[:, None], paired_b[:, None]], axis=-1)
    return pairing, np.delete(np.arange(set_a.shape[0]), paired_a), np.delete(np.arange(set_b.shape[0]), paired_b)


def plain_image(pred, gt, other=None):
    """One image: the instance figures and what the type statistics need (both sides non-empty)."""
    true, true_type = plain_truth(gt, other)
    pred, pred_type = plain_pred(pred)
    dq, sq, pq = get_fast_pq(true, pred)
    figures = {"dice": get_dice_1(true, pred), "aji": get_fast_aji(true, pred), "dq": dq, "sq": sq, "pq": pq}
    return figures, (plain_centroids(true), true_type, plain_centroids(pred), pred_type)


def plain_type_stat(images):
    """``run_nuclei_type_stat`` (exhaustive) over the images' (true centroid, true type, pred centroid, pred
    type); returns f1_d, acc_type and F per type 0..3, with NaN where HoVer-Net divides 0 by 0."""
    paired_all, unpaired_true_all, unpaired_pred_all, true_type_all, pred_type_all = [], [], [], [], []
    true_offset = pred_offset = 0
    for true_centroid, true_type, pred_centroid, pred_type in images:
        paired, unpaired_true, unpaired_pred = pair_coordinates(true_centroid, pred_centroid, 12)
        paired[:, 0] += true_offset
        paired[:, 1] += pred_offset
        paired_all.append(paired)
        unpaired_true_all.append(unpaired_true + true_offset)
        unpaired_pred_all.append(unpaired_pred + pred_offset)
        true_type_all.append(true_type)
        pred_type_all.append(pred_type)
        true_offset += true_type.shape[0]
        pred_offset += pred_type.shape[0]
    paired_all = np.concatenate(paired_all, axis=0)
    true_type_all, pred_type_all = np.concatenate(true_type_all), np.concatenate(pred_type_all)
    paired_true_type = true_type_all[paired_all[:, 0]]
    paired_pred_type = pred_type_all[paired_all[:, 1]]
    unpaired_true_type = true_type_all[np.concatenate(unpaired_true_all)]
    unpaired_pred_type = pred_type_all[np.concatenate(unpaired_pred_all)]

    def ratio(num, den):
        return float(num) / float(den) if den else math.nan

    def _f1_type(paired_true, paired_pred, unpaired_true, unpaired_pred, type_id, w):
        type_samples = (paired_true == type_id) | (paired_pred == type_id)
        paired_true = paired_true[type_samples]
        paired_pred = paired_pred[type_samples]
        tp_dt = ((paired_true == type_id) & (paired_pred == type_id)).sum()
        tn_dt = ((paired_true != type_id) & (paired_pred != type_id)).sum()
        fp_dt = ((paired_true != type_id) & (paired_pred == type_id)).sum()
        fn_dt = ((paired_true == type_id) & (paired_pred != type_id)).sum()
        fp_d = (unpaired_pred == type_id).sum()
        fn_d = (unpaired_true == type_id).sum()
        return ratio(
            2 * (tp_dt + tn_dt),
            2 * (tp_dt + tn_dt) + w[0] * fp_dt + w[1] * fn_dt + w[2] * fp_d + w[3] * fn_d,
        )

    tp_d, fp_d, fn_d = paired_pred_type.shape[0], unpaired_pred_type.shape[0], unpaired_true_type.shape[0]
    tp_tn_dt = (paired_pred_type == paired_true_type).sum()
    fp_fn_dt = (paired_pred_type != paired_true_type).sum()
    out = {"f1_d": ratio(2 * tp_d, 2 * tp_d + fp_d + fn_d), "type_accuracy": ratio(tp_tn_dt, tp_tn_dt + fp_fn_dt)}
    for type_id, name in enumerate(metrics.HOVERNET_TYPES):
        args = (paired_true_type, paired_pred_type, unpaired_true_type, unpaired_pred_type)
        out[f"f1_{name}"] = _f1_type(*args, type_id, [2, 2, 1, 1])
    return out


def assert_close(fast, slow, keys=None):
    for key in keys or slow:
        if math.isnan(slow[key]):
            assert math.isnan(fast[key]), key
        else:
            assert fast[key] == pytest.approx(slow[key], rel=1e-12, abs=1e-12), key


# ----------------------------------------------------------------------------------------------------------
# Random labels: touching nuclei, ignore-map nuclei (some on labelled nuclei), a perturbed prediction
# ----------------------------------------------------------------------------------------------------------


def touching_nuclei(rng, shape=(72, 72), n=24):
    """Irregular disks pressed on each other (each pixel goes to the nearest relative centre); random classes."""
    centers = rng.uniform(0, shape, (n, 2))
    radii = rng.uniform(2.5, 8.0, n)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    rel = np.hypot(yy[None] - centers[:, 0, None, None], xx[None] - centers[:, 1, None, None]) / radii[:, None, None]
    rel += rng.uniform(0, 0.25, rel.shape)
    ids = 3 * rng.choice(np.arange(1, 20000), n, replace=False) + rng.integers(0, 3, n)
    return np.where(rel.min(0) < 1, ids[rel.argmin(0)], 0).astype(np.int32)


def other_nuclei(rng, shape, n):
    """An instance map of ``n`` small disks (ids 1..n), anywhere: some overlap labelled nuclei."""
    other = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for k in range(n):
        r, c, radius = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(2, 5)
        other[(yy - r) ** 2 + (xx - c) ** 2 <= radius**2] = k + 1
    return other


def perturbed(rng, truth):
    """A prediction from a ground truth (``other`` nuclei included): shifted, grown, some missed, reclassed,
    split, plus false positives."""
    pred = np.roll(truth, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
    if rng.random() < 0.5:
        pred = ndi.grey_dilation(pred, size=3)
    out = np.zeros_like(pred)
    next_id = 60100  # above every truth id, below the 16-bit limit of label files
    for i in _ids(pred):
        mask = pred == i
        u = rng.random()
        if u < 0.1:
            continue
        next_id += 1
        new = next_id if u > 0.7 else i  # a fresh id: a new, random class
        if 0.1 <= u < 0.2:  # split along a row
            cut = np.median(np.nonzero(mask)[0])
            next_id += 1
            out[mask & (np.arange(mask.shape[0])[:, None] > cut)] = next_id
            mask &= np.arange(mask.shape[0])[:, None] <= cut
        out[mask] = new
    for _ in range(rng.integers(1, 4)):
        r, c = rng.integers(0, out.shape[0] - 5, 2)
        next_id += 1
        out[r : r + rng.integers(2, 6), c : c + rng.integers(2, 6)] = next_id
    return out


def random_case(seed):
    rng = np.random.default_rng(seed)
    gt = touching_nuclei(rng)
    other = other_nuclei(rng, gt.shape, int(rng.integers(1, 5))) if seed % 3 else None
    truth = gt if other is None else np.where(gt > 0, gt, np.where(other > 0, other + 60000, 0))
    return gt, other, perturbed(rng, truth)


# ----------------------------------------------------------------------------------------------------------
# Against the plain port
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_random_images_match_hovernet_code(seed):
    gt, other, pred = random_case(seed)
    fast = metrics.evaluate_image_hovernet(pred, gt, other)
    slow, _ = plain_image(pred, gt, other)
    assert_close(fast, slow)
    assert 0 < fast["pq"] < 1 and 0 < fast["aji"] < 1  # a real mix of hits and misses
    assert fast["n_other"] == (0 if other is None else len(plain_truth(gt, other)[1]) - len(_ids(gt)))


def test_pooled_figures_match_hovernet_code():
    """The pooled figures of several images equal run_nuclei_type_stat's, per-image means np.mean's."""
    cases = [random_case(seed) for seed in range(20, 28)]
    fast_images = {
        f"img{k}": metrics.evaluate_image_hovernet(pred, gt, other) for k, (gt, other, pred) in enumerate(cases)
    }
    plain = [plain_image(pred, gt, other) for gt, other, pred in cases]
    summary = metrics.summarize_hovernet(fast_images)
    pooled = summary["pooled"]
    assert_close(pooled, plain_type_stat([p[1] for p in plain]))
    for fig in metrics.HOVERNET_IMAGE_FIGURES:
        assert summary["mean"][fig] == pytest.approx(np.mean([p[0][fig] for p in plain]), rel=1e-12)
    assert summary["n_images"] == len(cases) and summary["mean"]["nan_skipped"]["pq"] == 0
    assert pooled["tp_d"] + pooled["fn_d"] == summary["mean"]["n_true"]
    assert pooled["tp_d"] + pooled["fp_d"] == summary["mean"]["n_pred"]
    assert 0 < pooled["f1_d"] < 1 and 0 < pooled["type_accuracy"] < 1
    assert pooled["f1_other"] == 0.0  # never predicted, present in the truth


# ----------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ----------------------------------------------------------------------------------------------------------


def squares(shape, placed):
    """A label with 3x3 squares centred on (x, y) -> id."""
    label = np.zeros(shape, np.int32)
    for (x, y), nucleus_id in placed.items():
        label[y - 1 : y + 2, x - 1 : x + 2] = nucleus_id
    return label


def test_pairing_minimises_the_total_distance_then_drops_far_pairs():
    """a1-b1 (1 px) + a2-b2 (17 px) costs less than a1-b2 (12 px) + a2-b1 (11 px): HoVer-Net keeps one pair,
    though two pairs within 12 px exist."""
    a1, a2, b1, b2 = (20, 20), (32, 20), (21, 20), (20, 32)
    pairs, missed, extra = metrics.pair_centroids(np.array([a1, a2]), np.array([b1, b2]))
    assert pairs.tolist() == [[0, 0]] and missed.tolist() == [1] and extra.tolist() == [1]
    out = metrics.evaluate_image_hovernet(squares((48, 48), {b1: 3, b2: 6}), squares((48, 48), {a1: 3, a2: 6}))
    assert (out["tp_d"], out["fp_d"], out["fn_d"]) == (1, 1, 1)
    # exactly 12 px is a pair, just beyond is not
    assert metrics.pair_centroids(np.array([[0.0, 0.0]]), np.array([[12.0, 0.0]]))[0].shape == (1, 2)
    assert metrics.pair_centroids(np.array([[0.0, 0.0]]), np.array([[12.01, 0.0]]))[0].shape == (0, 2)


def test_type_figures_by_hand():
    """Pairs (truth, prediction): tumor-tumor twice, tumor-lymphocyte, lymphocyte-lymphocyte; an unpaired other
    nucleus (FN) and an unpaired stroma prediction (FP)."""
    shape = (60, 200)
    gt = squares(shape, {(10, 10): 3, (50, 10): 6, (90, 10): 9, (130, 10): 1})
    other = squares(shape, {(170, 10): 1})
    pred = squares(shape, {(10, 11): 3, (51, 10): 6, (90, 9): 4, (130, 10): 7, (100, 45): 2})
    out = metrics.evaluate_image_hovernet(pred, gt, other)
    assert out["type_pairs"] == [[2, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert out["unpaired_true"] == [0, 0, 0, 1] and out["unpaired_pred"] == [0, 0, 1, 0]
    pooled = metrics.summarize_hovernet({"a": out})["pooled"]
    assert pooled["f1_d"] == pytest.approx(8 / 10)  # 2 TP / (2 TP + FP + FN), 4 pairs
    assert pooled["type_accuracy"] == pytest.approx(3 / 4)
    assert pooled["f1_tumor"] == pytest.approx(4 / (4 + 2 * 1))  # TP 2, FN_c 1 (called lymphocyte)
    assert pooled["f1_lymphocyte"] == pytest.approx(2 / (2 + 2 * 1))  # TP 1, FP_c 1
    assert pooled["f1_stroma"] == 0.0 and pooled["f1_other"] == 0.0  # FP_d 1; FN_d 1
    assert (pooled["precision_d"], pooled["recall_d"]) == (pytest.approx(4 / 5), pytest.approx(4 / 5))


def test_instance_figures_by_hand():
    # One 4x4 nucleus, predicted one column to the right: intersection 12, union 20.
    gt, pred = np.zeros((10, 10), np.int32), np.zeros((10, 10), np.int32)
    gt[2:6, 2:6], pred[2:6, 3:7] = 3, 5
    out = metrics.evaluate_image_hovernet(pred, gt)
    assert out["dice"] == pytest.approx(24 / 32) and out["aji"] == pytest.approx(12 / 20)
    assert out["dq"] == 1.0 and out["sq"] == pytest.approx(0.6 / (1 + 1e-6), rel=1e-15) and out["pq"] == out["sq"]

    # Two nuclei under one prediction: AJI reuses it; IoU exactly 0.5 is no PQ match, and SQ is then 0.
    gt, pred = np.zeros((10, 10), np.int32), np.zeros((10, 10), np.int32)
    gt[0:4, 0:4], gt[0:4, 4:8], pred[0:4, 0:8] = 3, 6, 9
    out = metrics.evaluate_image_hovernet(pred, gt)
    assert out["aji"] == pytest.approx(32 / 64) and (out["pq_tp"], out["pq_fp"], out["pq_fn"]) == (0, 1, 2)
    assert out["dq"] == 0.0 and out["sq"] == 0.0 and out["pq"] == 0.0

    # Two predictions of exactly equal IoU (4/16 and 8/32) with one nucleus: HoVer-Net's 1e-6 picks the larger
    # union (id 2), the paper's AJI the smaller id.
    gt, pred = np.zeros((10, 10), np.int32), np.zeros((10, 10), np.int32)
    gt[0:4, 0:4] = 3
    pred[0:2, 0:2], pred[2:8, 0:4] = 1, 2
    assert metrics.evaluate_image_hovernet(pred, gt)["aji"] == pytest.approx(8 / (32 + 4))
    assert metrics.aji(pred, gt) == pytest.approx(4 / (16 + 24))
    assert get_fast_aji(plain_truth(gt, None)[0], plain_pred(pred)[0]) == pytest.approx(8 / 36)


def test_ignore_map_nuclei_join_the_truth_as_other():
    gt = np.zeros((20, 40), np.int32)
    gt[2:8, 2:8] = 3
    other = np.zeros_like(gt)
    other[2:8, 20:26] = 1  # an other nucleus
    other[2:8, 26:30] = 3  # touching it
    other[5:10, 5:10] = 2  # overlaps the labelled nucleus: that one keeps its pixels
    out = metrics.evaluate_image_hovernet(gt, gt, other)
    assert (out["n_true"], out["n_other"], out["n_pred"]) == (4, 3, 1)
    assert out["unpaired_true"] == [0, 0, 0, 3] and out["type_pairs"][0][0] == 1
    assert out["dice"] == pytest.approx(2 * 36 / (36 + 36 + 36 + 24 + 25 - 9))
    # A boolean ignore map has no ids: one nucleus per connected component (the two touching ones: one).
    assert metrics.evaluate_image_hovernet(gt, gt, other > 0)["n_other"] == 2
    with pytest.raises(ValueError, match="ignore map and gt differ in shape"):
        metrics.evaluate_image_hovernet(gt, gt, other[:5])


def test_empty_images_are_handled_explicitly():
    empty = np.zeros((16, 16), np.int32)
    nucleus = empty.copy()
    nucleus[4:9, 4:9] = 4
    both_empty = metrics.evaluate_image_hovernet(empty, empty)
    assert all(math.isnan(both_empty[f]) for f in metrics.HOVERNET_IMAGE_FIGURES)
    assert (both_empty["tp_d"], both_empty["fp_d"], both_empty["fn_d"]) == (0, 0, 0)
    no_pred = metrics.evaluate_image_hovernet(empty, nucleus)
    no_truth = metrics.evaluate_image_hovernet(nucleus, empty)
    for out in (no_pred, no_truth):
        assert [out[f] for f in metrics.HOVERNET_IMAGE_FIGURES] == [0.0] * 5
    assert no_pred["unpaired_true"] == [0, 1, 0, 0] and no_truth["unpaired_pred"] == [0, 1, 0, 0]
    summary = metrics.summarize_hovernet({"a": both_empty, "b": no_pred, "c": no_truth})
    assert summary["mean"]["pq"] == 0.0 and summary["mean"]["nan_skipped"]["pq"] == 1
    pooled = summary["pooled"]
    assert pooled["f1_d"] == 0.0 and math.isnan(pooled["type_accuracy"])  # no pairs
    assert pooled["f1_lymphocyte"] == 0.0 and math.isnan(pooled["f1_tumor"])  # tumor: in neither side
    nothing = metrics.summarize_hovernet({"a": both_empty})["pooled"]
    assert math.isnan(nothing["f1_d"]) and math.isnan(nothing["precision_d"])


# ----------------------------------------------------------------------------------------------------------
# Real CoNSeP tiles
# ----------------------------------------------------------------------------------------------------------


def _crop_with_other(consep_dir, name, size=160):
    """The ``size`` window around an other nucleus that holds the most labelled nuclei."""
    gt, other = read_label(consep_dir / f"{name}_label.png"), read_label(consep_dir / f"{name}_other.png")
    windows = []
    for r, c in ndi.center_of_mass(other > 0, other, _ids(other)):
        r0 = int(np.clip(r - size // 2, 0, gt.shape[0] - size))
        c0 = int(np.clip(c - size // 2, 0, gt.shape[1] - size))
        window = np.s_[r0 : r0 + size, c0 : c0 + size]
        windows.append((len(_ids(gt[window])), window))
    window = max(windows, key=lambda w: w[0])[1]
    return gt[window], other[window]


@pytest.mark.parametrize("name", ["train_1", "train_3"])
def test_real_tiles_match_hovernet_code(consep_dir, name):
    gt, other = _crop_with_other(consep_dir, name)
    rng = np.random.default_rng(7)
    truth = np.where(gt > 0, gt, np.where(other > 0, other + 60000, 0))
    pred = perturbed(rng, truth)
    fast = metrics.evaluate_image_hovernet(pred, gt, other)
    slow, stats = plain_image(pred, gt, other)
    assert fast["n_other"] > 0 and fast["n_true"] > 20
    assert_close(fast, slow)
    assert_close(metrics.summarize_hovernet({name: fast})["pooled"], plain_type_stat([stats]))


def test_real_tile_ground_truth_as_prediction(consep_dir):
    """The labelled nuclei predicted perfectly: only the other nuclei are missed."""
    gt, other = read_label(consep_dir / "train_1_label.png"), read_label(consep_dir / "train_1_other.png")
    out = metrics.evaluate_image_hovernet(gt, gt, other)
    n, n_other = len(_ids(gt)), len(_ids(other))
    assert (out["n_true"], out["n_other"], out["n_pred"]) == (n + n_other, n_other, n)
    assert (out["tp_d"], out["fp_d"], out["fn_d"], out["pq_tp"]) == (n, 0, n_other, n)
    assert out["dice"] == pytest.approx(2 * np.sum(gt > 0) / (2 * np.sum(gt > 0) + np.sum(other > 0)))
    assert out["aji"] == pytest.approx(np.sum(gt > 0) / np.sum((gt > 0) | (other > 0)))
    pooled = metrics.summarize_hovernet({"train_1": out})["pooled"]
    assert pooled["type_accuracy"] == 1.0 and pooled["f1_other"] == 0.0
    assert pooled["f1_tumor"] == pooled["f1_lymphocyte"] == pooled["f1_stroma"] == 1.0


# ----------------------------------------------------------------------------------------------------------
# CLI, headline, report
# ----------------------------------------------------------------------------------------------------------


def _write_case(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    cases = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):  # c has no ignore map (they are optional)
        gt, other, pred = random_case(seed)
        write_label(gt_dir / f"{name}_label.png", gt)
        if other is not None:
            write_label(gt_dir / f"{name}_other.png", other)
        write_label(pred_dir / f"{name}_label.png", pred)
        cases[name] = (gt, other, pred)
    return pred_dir, gt_dir, cases


def test_cli_evaluate_writes_the_hovernet_section(tmp_path):
    pred_dir, gt_dir, cases = _write_case(tmp_path)
    runner = CliRunner()
    out = tmp_path / "both.json"
    result = runner.invoke(app, ["evaluate", str(pred_dir), str(gt_dir), "--out", str(out)])  # default: both
    assert result.exit_code == 0, result.output
    assert "HoVer-Net protocol: Dice" in result.output and "mPQ+" in result.output
    report = json.loads(out.read_text())
    assert report["protocol"] == "both" and {"images", "summary", "hovernet"} <= set(report)
    section = report["hovernet"]
    assert set(section) == {"images", "mean", "pooled", "n_images"} and section["n_images"] == 3
    expected = {name: metrics.evaluate_image_hovernet(pred, gt, other) for name, (gt, other, pred) in cases.items()}
    for name, (gt, other, pred) in cases.items():
        assert section["images"][name] == expected[name]  # finite figures: JSON keeps them exactly
        assert report["images"][name]["all"]["f1"] == metrics.evaluate_image(pred, gt, other)["all"]["f1"]
    summary = metrics.summarize_hovernet(expected)
    assert section["pooled"] == summary["pooled"] and section["mean"] == summary["mean"]

    result = runner.invoke(app, ["evaluate", str(pred_dir), str(gt_dir), "--out", str(out), "--protocol", "hovernet"])
    assert result.exit_code == 0, result.output
    only = json.loads(out.read_text())
    assert set(only) == {"protocol", "hovernet"} and only["hovernet"]["pooled"] == section["pooled"]
    result = runner.invoke(app, ["evaluate", str(pred_dir), str(gt_dir), "--out", str(out), "--protocol", "paper"])
    assert result.exit_code == 0 and "hovernet" not in json.loads(out.read_text())
    result = runner.invoke(app, ["evaluate", str(pred_dir), str(gt_dir), "--out", str(out), "--protocol", "kumar"])
    assert result.exit_code != 0 and "kumar" in result.output


def test_headline_and_report_in_hovernet_protocol(tmp_path, monkeypatch):
    pred_dir, gt_dir, _ = _write_case(tmp_path)
    out = tmp_path / "reports" / "metrics.json"
    result = CliRunner().invoke(app, ["evaluate", str(pred_dir), str(gt_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    evaluation = json.loads(out.read_text())
    figures = headline(evaluation)
    assert figures["all"]["f1"] == evaluation["summary"]["all"]["f1"]  # the paper's keys are kept
    assert set(figures["hovernet"]) == {*metrics.HOVERNET_IMAGE_FIGURES, *metrics.HOVERNET_POOLED_FIGURES}
    assert figures["hovernet"]["pq"] == evaluation["hovernet"]["mean"]["pq"]
    assert figures["hovernet"]["f1_d"] == evaluation["hovernet"]["pooled"]["f1_d"]

    settings = load_params(ROOT / "params.yaml").flat()
    text = render(evaluation, settings, tmp_path / "r.md", compare=["hovernet-consep"])
    reference = REFERENCES["hovernet-consep"]
    assert "## Table 1" in text and "## HoVer-Net's protocol" in text
    assert (
        "| HoVer-Net (Graham et al., 2019) | 0.853 | 0.571 | 0.702 | 0.778 | 0.547 | 0.748 | 0.635 | 0.631 | 0.566 |"
        in text
    )
    assert "| CellViT++ (SAM-H, 2025) |  |  |  |  | 0.548 | 0.772 | 0.683 |  |  |" in text  # not published: empty
    assert f"| {figures['hovernet']['pq']:.3f} | {figures['hovernet']['f1_d']:.3f} |" in text
    assert reference.caveat not in text and "centroids lie within 12 px" not in text  # same protocol: no caveat
    assert "F other is 0 by construction" in text and "| Other |" in text

    paper_only = render(evaluation, settings, tmp_path / "r.md", compare=["hovernet-consep"], protocol="paper")
    assert "## HoVer-Net's protocol" not in paper_only and reference.caveat in paper_only
    hovernet_only = render(evaluation, settings, tmp_path / "r.md", protocol="hovernet")
    assert "## Table 1" not in hovernet_only and "## Per image, HoVer-Net's protocol" in hovernet_only

    # The report command takes the protocol from params, --protocol overrides it; a protocol the file lacks
    # is named in the notes.
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", "params.yaml")
    result = CliRunner().invoke(app, ["report", "--out", "r.md", "--protocol", "hovernet"])
    assert result.exit_code == 0, result.output
    assert "## Table 1" not in Path("r.md").read_text()
    del evaluation["hovernet"]
    out.write_text(json.dumps(evaluation))
    result = CliRunner().invoke(app, ["report", "--out", "r.md", "--compare", "hovernet-consep"])
    assert result.exit_code == 0, result.output
    text = Path("r.md").read_text()
    assert "no HoVer-Net-protocol figures" in text and reference.caveat in text
    result = CliRunner().invoke(app, ["report", "--out", "r.md", "--set", "eval.protocol=hovernet"])
    assert result.exit_code == 1 and "no figures of protocol 'hovernet'" in result.output
