"""Metrics: every figure against a direct, slow implementation of the definitions in nucleiseg.metrics.

The slow implementation below loops over objects with full-image masks (``np.where``), finds partners by
``argmax`` over sorted ids, and computes Hausdorff distances by brute force (``cdist`` between all pixels),
searching every object of the other side when an object overlaps nothing.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial.distance import cdist
from typer.testing import CliRunner

from nucleiseg import metrics
from nucleiseg.labels import CLASS_NAMES, read_label, write_label

# ----------------------------------------------------------------------------------------------------------
# The slow reference
# ----------------------------------------------------------------------------------------------------------


def _ids(label):
    ids = np.unique(label)
    return [int(i) for i in ids[ids > 0]]


def slow_drop(pred, ignore):
    out = pred.copy()
    for i in _ids(pred):
        mask = np.where(pred == i, 1, 0)
        if 2 * np.sum(mask * (ignore > 0)) >= np.sum(mask):
            out[pred == i] = 0
    return out


def slow_hausdorff(a, b):
    pa, pb = np.argwhere(a), np.argwhere(b)
    d = cdist(pa, pb)
    return max(d.min(axis=1).max(), d.min(axis=0).max())


def slow_group(pred, gt):
    """All per-group figures and counts of one (restricted) pair of labels, plus detection pairs."""
    pids, gids = _ids(pred), _ids(gt)
    pm = {i: np.where(pred == i, 1, 0) for i in pids}
    gm = {j: np.where(gt == j, 1, 0) for j in gids}
    parea = {i: int(pm[i].sum()) for i in pids}
    garea = {j: int(gm[j].sum()) for j in gids}
    inter = {(i, j): int(np.sum(pm[i] * gm[j])) for i in pids for j in gids}
    nan = math.nan

    # detection
    matched, pairs = set(), []
    for i in pids:
        ov = [inter[i, j] for j in gids]
        if not ov or max(ov) == 0:
            continue
        j = gids[int(np.argmax(ov))]
        if inter[i, j] / garea[j] >= 0.5 and j not in matched:
            matched.add(j)
            pairs.append((i, j))
    tp = len(pairs)
    fp, fn = len(pids) - tp, len(gids) - tp
    precision = tp / (tp + fp) if tp + fp else nan
    recall = tp / (tp + fn) if tp + fn else nan
    f1 = 2 * precision * recall / (precision + recall) if tp else (0.0 if pids or gids else nan)

    # object-level Dice and Hausdorff
    if not pids or not gids:
        dice = 0.0 if pids or gids else nan
        haus = nan
    else:
        dice_g = haus_g = dice_s = haus_s = 0.0
        total_g, total_s = sum(garea.values()), sum(parea.values())
        for j in gids:
            ov = [inter[i, j] for i in pids]
            if max(ov) > 0:
                i = pids[int(np.argmax(ov))]
                d = 2 * inter[i, j] / (parea[i] + garea[j])
                h = slow_hausdorff(gm[j], pm[i])
            else:
                d = 0.0
                h = min(slow_hausdorff(gm[j], pm[i]) for i in pids)
            dice_g += garea[j] / total_g * d
            haus_g += garea[j] / total_g * h
        for i in pids:
            ov = [inter[i, j] for j in gids]
            if max(ov) > 0:
                j = gids[int(np.argmax(ov))]
                d = 2 * inter[i, j] / (parea[i] + garea[j])
                h = slow_hausdorff(pm[i], gm[j])
            else:
                d = 0.0
                h = min(slow_hausdorff(pm[i], gm[j]) for j in gids)
            dice_s += parea[i] / total_s * d
            haus_s += parea[i] / total_s * h
        dice = (dice_g + dice_s) / 2
        haus = (haus_g + haus_s) / 2

    # AJI, as get_fast_aji
    union = {(i, j): parea[i] + garea[j] - inter[i, j] for i in pids for j in gids}
    a_inter = a_union = 0
    used = set()
    for j in gids:
        ious = [inter[i, j] / union[i, j] for i in pids]
        if ious and max(ious) > 0:
            i = pids[int(np.argmax(ious))]
            a_inter += inter[i, j]
            a_union += union[i, j]
            used.add(i)
        else:
            a_union += garea[j]
    a_union += sum(parea[i] for i in pids if i not in used)
    aji = a_inter / a_union if a_union else nan

    # PQ
    ious = [inter[i, j] / union[i, j] for i in pids for j in gids if inter[i, j] / union[i, j] > 0.5]
    pq_tp = len(ious)
    pq_fp, pq_fn = len(pids) - pq_tp, len(gids) - pq_tp
    den = pq_tp + 0.5 * pq_fp + 0.5 * pq_fn
    dq = pq_tp / den if den else nan
    sq = sum(ious) / pq_tp if pq_tp else nan
    pq = dq * sq if pq_tp else (0.0 if den else nan)

    figures = {
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "dice": dice,
        "hausdorff": haus,
        "aji": aji,
        "pq": pq,
        "dq": dq,
        "sq": sq,
        "n_pred": len(pids),
        "n_gt": len(gids),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "pq_tp": pq_tp,
        "pq_fp": pq_fp,
        "pq_fn": pq_fn,
        "pq_iou_sum": float(sum(ious)),
    }
    return figures, pairs


def slow_classification(pairs):
    conf = np.zeros((3, 3), int)
    for i, j in pairs:
        conf[j % 3, i % 3] += 1
    n = conf.sum()
    out = {"accuracy": np.trace(conf) / n if n else math.nan}
    for c, name in enumerate(CLASS_NAMES):
        out[f"accuracy_{name}"] = conf[c, c] / conf[c].sum() if conf[c].sum() else math.nan
    out["confusion"] = conf.tolist()
    out["n_pairs"] = int(n)
    return out


def slow_pq_plus(per_class):
    out = {}
    for name in CLASS_NAMES:
        g = per_class[name]
        den = g["pq_tp"] + 0.5 * g["pq_fp"] + 0.5 * g["pq_fn"]
        out[name] = g["pq_iou_sum"] / den if den else math.nan
    return out


def slow_evaluate(pred, gt, ignore=None):
    kept = pred if ignore is None else slow_drop(pred, ignore)
    out = {}
    out["all"], pairs = slow_group(kept, gt)
    for c, name in enumerate(CLASS_NAMES):
        out[name], _ = slow_group(np.where(kept % 3 == c, kept, 0), np.where(gt % 3 == c, gt, 0))
    out["classification"] = slow_classification(pairs)
    out["pq_plus"] = slow_pq_plus(out)
    defined = [v for v in out["pq_plus"].values() if not math.isnan(v)]
    out["mpq_plus"] = float(np.mean(defined)) if defined else math.nan
    out["n_ignored"] = len(_ids(pred)) - len(_ids(kept))
    return out


def assert_same(fast, slow, where="result"):
    """Every key of ``slow`` equals ``fast``: integers exactly, floats to 1e-12 (NaN equal to NaN)."""
    if isinstance(slow, dict):
        for key, value in slow.items():
            assert key in fast, f"{where}.{key} missing"
            assert_same(fast[key], value, f"{where}.{key}")
    elif isinstance(slow, list):
        assert np.array_equal(np.asarray(fast), np.asarray(slow)), f"{where}: {fast} != {slow}"
    elif isinstance(slow, (int, np.integer)) and not isinstance(slow, bool):
        assert fast == slow and isinstance(fast, int), f"{where}: {fast!r} != {slow!r}"
    else:
        assert isinstance(fast, float), f"{where}: {fast!r} is not a float"
        if math.isnan(slow):
            assert math.isnan(fast), f"{where}: {fast} != NaN"
        else:
            assert fast == pytest.approx(slow, rel=1e-12, abs=1e-12), f"{where}: {fast} != {slow}"


# ----------------------------------------------------------------------------------------------------------
# Random labels
# ----------------------------------------------------------------------------------------------------------


def random_ids(rng, n, classes=None):
    """``n`` distinct ids in the paper's encoding, random classes, spread over 1..65535."""
    k = rng.choice(np.arange(1, 20000), size=n, replace=False)
    cls = rng.integers(0, 3, n) if classes is None else classes
    return 3 * k + cls


def touching_nuclei(rng, shape=(72, 72), n=24):
    """Irregular disks that touch and press on each other (each pixel goes to the nearest relative center)."""
    h, w = shape
    centers = rng.uniform(0, (h, w), (n, 2))
    radii = rng.uniform(2.5, 8.0, n)
    yy, xx = np.mgrid[:h, :w]
    rel = np.hypot(yy[None] - centers[:, 0, None, None], xx[None] - centers[:, 1, None, None]) / radii[:, None, None]
    rel += rng.uniform(0, 0.25, rel.shape)  # ragged outlines
    nearest = rel.argmin(0)
    inside = rel.min(0) < 1
    ids = random_ids(rng, n)
    return np.where(inside, ids[nearest], 0).astype(np.int32)


def perturbed(rng, gt):
    """A plausible prediction: shifted, grown/shrunk, some nuclei missed, split, merged, reclassed, plus FPs."""
    pred = np.roll(gt, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
    pred = ndi.grey_dilation(pred, size=3) if rng.random() < 0.5 else pred
    out = np.zeros_like(pred)
    used = set()
    for i in np.unique(pred[pred > 0]):
        mask = pred == i
        u = rng.random()
        if u < 0.1:
            continue  # missed
        if u < 0.2:  # eroded away to a sliver
            mask = ndi.binary_erosion(mask, iterations=2) | (mask & (rng.random(mask.shape) < 0.1))
        new = int(random_ids(rng, 1)[0]) if u > 0.8 else int(i)  # reclassed nuclei get a fresh id
        while new in used:
            new = int(random_ids(rng, 1)[0])
        used.add(new)
        if 0.2 <= u < 0.3:  # split along a row
            rows = np.nonzero(mask)[0]
            cut = np.median(rows)
            other = int(random_ids(rng, 1)[0])
            while other in used:
                other = int(random_ids(rng, 1)[0])
            used.add(other)
            out[mask & (np.arange(mask.shape[0])[:, None] > cut)] = other
            mask = mask & (np.arange(mask.shape[0])[:, None] <= cut)
        out[mask] = new
    for _ in range(rng.integers(1, 4)):  # false positives, may land on nuclei
        r, c = rng.integers(0, out.shape[0] - 5), rng.integers(0, out.shape[1] - 5)
        new = int(random_ids(rng, 1)[0])
        while new in used:
            new = int(random_ids(rng, 1)[0])
        used.add(new)
        out[r : r + rng.integers(2, 6), c : c + rng.integers(2, 6)] = new
    if rng.random() < 0.5:  # merge two touching nuclei
        ids = np.unique(out[out > 0])
        if ids.size > 2:
            a, b = rng.choice(ids, 2, replace=False)
            out[out == b] = a
    return out


def random_ignore(rng, shape):
    ignore = np.zeros(shape, np.int32)
    for k in range(rng.integers(1, 5)):
        r, c = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
        ignore[r : r + rng.integers(3, 14), c : c + rng.integers(3, 14)] = k + 1
    return ignore


# ----------------------------------------------------------------------------------------------------------
# Tests against the slow reference
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_random_touching_nuclei_match_slow_reference(seed):
    rng = np.random.default_rng(seed)
    gt = touching_nuclei(rng)
    pred = perturbed(rng, gt)
    ignore = random_ignore(rng, gt.shape) if seed % 2 else None
    fast = metrics.evaluate_image(pred, gt, ignore)
    assert_same(fast, slow_evaluate(pred, gt, ignore))
    assert 0 < fast["all"]["f1"] < 1  # a real mix of hits and errors, not a degenerate case
    if ignore is not None:
        dropped_first = metrics.evaluate_image(slow_drop(pred, ignore), gt)
        assert dropped_first.pop("n_ignored") == 0
        assert_same(fast, dropped_first)


@pytest.mark.parametrize("seed", range(6))
def test_independent_labels_match_slow_reference(seed):
    """Unrelated labels: many objects overlap nothing and need the exact nearest-object Hausdorff search."""
    rng = np.random.default_rng(100 + seed)
    gt = touching_nuclei(rng, (80, 80), n=int(rng.integers(5, 20)))
    pred = touching_nuclei(rng, (80, 80), n=int(rng.integers(1, 20)))
    assert_same(metrics.evaluate_image(pred, gt), slow_evaluate(pred, gt))


def test_very_wide_image_matches_slow_reference():
    """Beyond 32767 px the coordinates switch to 64-bit arithmetic (squared distances above 2**31 here)."""
    rng = np.random.default_rng(5)
    gt = np.zeros((5, 50000), np.int32)
    pred = np.zeros_like(gt)
    for k, c in enumerate(sorted(rng.choice(np.arange(0, 49980, 10), 6, replace=False))):
        gt[1:5, c : c + 6] = 3 * k + 3
    gt[0:3, 49990:] = 300
    for k, c in enumerate(sorted(rng.choice(np.arange(0, 49980, 10), 5, replace=False))):
        pred[0:4, c + 2 : c + 9] = 3 * k + 4
    pred[1:5, 0:1] = 99  # alone at the far left
    pred[2:4, 49995:] = 98  # overlaps 300
    assert_same(metrics.evaluate_image(pred, gt), slow_evaluate(pred, gt))
    far_gt, far_pred = np.zeros((2, 50000), np.int32), np.zeros((2, 50000), np.int32)
    far_gt[:, -1] = 3
    far_pred[0, 0] = 6
    assert metrics.object_hausdorff(far_pred, far_gt) == pytest.approx(math.hypot(1, 49999), rel=1e-15)


@pytest.mark.parametrize("seed", range(6))
def test_fragmented_labels_with_ties_match_slow_reference(seed):
    """Tiny disconnected objects on a coarse grid: many equal overlaps, so tie-breaking is exercised."""
    rng = np.random.default_rng(200 + seed)
    gt_ids, pred_ids = random_ids(rng, 6), random_ids(rng, 6)
    gt = np.kron(np.r_[0, gt_ids][rng.integers(0, 7, (6, 6))], np.ones((2, 2), int))
    pred = np.kron(np.r_[0, pred_ids][rng.integers(0, 7, (6, 6))], np.ones((2, 2), int))
    pred = np.roll(pred, 1, axis=int(rng.integers(0, 2)))
    ignore = random_ignore(rng, gt.shape) if seed % 2 else None
    assert_same(metrics.evaluate_image(pred, gt, ignore), slow_evaluate(pred, gt, ignore))


def test_individual_functions_agree_with_evaluate_image():
    rng = np.random.default_rng(7)
    gt = touching_nuclei(rng)
    pred = perturbed(rng, gt)
    ignore = random_ignore(rng, gt.shape)
    full = metrics.evaluate_image(pred, gt, ignore)
    det = metrics.detection(pred, gt, ignore)
    assert (det["tp"], det["fp"], det["fn"], det["f1"]) == (
        full["all"]["tp"],
        full["all"]["fp"],
        full["all"]["fn"],
        full["all"]["f1"],
    )
    assert det["pairs"].shape == (det["tp"], 2)
    assert np.all(np.diff(det["pairs"][:, 0]) > 0)  # in ascending pred id
    assert metrics.object_dice(pred, gt, ignore) == full["all"]["dice"]
    assert metrics.object_hausdorff(pred, gt, ignore) == full["all"]["hausdorff"]
    assert metrics.aji(pred, gt, ignore) == full["all"]["aji"]
    pq = metrics.panoptic_quality(pred, gt, ignore)
    assert (pq["pq"], pq["dq"], pq["sq"]) == (full["all"]["pq"], full["all"]["dq"], full["all"]["sq"])
    assert metrics.classification(pred, gt, ignore) == full["classification"]


# ----------------------------------------------------------------------------------------------------------
# Hand-made cases
# ----------------------------------------------------------------------------------------------------------


def disk_label(shape, centers, ids, radius=4):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    label = np.zeros(shape, np.int32)
    for (r, c), i in zip(centers, ids, strict=True):
        label[(yy - r) ** 2 + (xx - c) ** 2 <= radius**2] = i
    return label


CENTERS = [(10, 10), (10, 30), (30, 10), (30, 30)]
GT = disk_label((40, 40), CENTERS, [3, 4, 5, 6])  # tumor, lymphocyte, stroma, tumor


def test_perfect_prediction():
    pred = np.where(GT > 0, GT + 300, 0)  # other ids, same classes
    out = metrics.evaluate_image(pred, GT)
    for name in ("all", "tumor"):
        g = out[name]
        assert (g["f1"], g["precision"], g["recall"], g["dice"], g["hausdorff"]) == (1.0, 1.0, 1.0, 1.0, 0.0)
        assert (g["aji"], g["pq"], g["dq"], g["sq"]) == (1.0, 1.0, 1.0, 1.0)
    assert out["all"]["tp"] == 4 and out["tumor"]["tp"] == 2 and out["stroma"]["tp"] == 1
    assert out["classification"]["accuracy"] == 1.0
    assert out["classification"]["confusion"] == [[2, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert out["mpq_plus"] == 1.0


def test_one_missed_nucleus():
    pred = np.where(GT == 4, 0, GT)
    g = metrics.evaluate_image(pred, GT)["all"]
    assert (g["tp"], g["fp"], g["fn"]) == (3, 0, 1)
    assert g["precision"] == 1.0 and g["recall"] == 0.75 and g["f1"] == pytest.approx(6 / 7)
    # the missed nucleus weighs a quarter of the gt side and gets Dice 0; the pred side is perfect
    assert g["dice"] == pytest.approx(0.5 * (0.75 + 1.0))
    assert g["aji"] == pytest.approx(3 / 4)
    assert g["pq"] == pytest.approx(3 / 3.5) and g["sq"] == 1.0
    # its nearest prediction is a same-size disk 20 px away: Hausdorff 20, weighted by 1/4 on the gt side
    assert g["hausdorff"] == pytest.approx(0.5 * 20 / 4)
    out = metrics.evaluate_image(pred, GT)
    assert out["lymphocyte"]["n_pred"] == 0 and math.isnan(out["lymphocyte"]["hausdorff"])
    assert out["lymphocyte"]["dice"] == 0.0 and out["lymphocyte"]["f1"] == 0.0


def test_one_split_nucleus():
    pred = GT.copy()
    pred[(GT == 3) & (np.arange(40)[:, None] > 10)] = 99  # lower part of nucleus 3 (rows 11-14) as a 2nd object
    out = metrics.evaluate_image(pred, GT)
    g = out["all"]
    assert (g["tp"], g["fp"], g["fn"]) == (4, 1, 0)  # the larger piece still covers half of nucleus 3
    assert g["f1"] == pytest.approx(8 / 9)
    assert g["dice"] < 1 and g["aji"] < 1 and g["hausdorff"] > 0
    assert out["classification"]["n_pairs"] == 4


def test_empty_prediction_and_empty_ground_truth():
    empty = np.zeros_like(GT)
    out = metrics.evaluate_image(empty, GT)["all"]
    assert (out["f1"], out["recall"], out["dice"], out["aji"], out["pq"], out["dq"]) == (0.0,) * 6
    assert math.isnan(out["precision"]) and math.isnan(out["hausdorff"]) and math.isnan(out["sq"])
    assert out["fn"] == 4
    out = metrics.evaluate_image(GT, empty)["all"]
    assert (out["f1"], out["precision"], out["dice"], out["aji"], out["pq"]) == (0.0,) * 5
    assert math.isnan(out["recall"]) and math.isnan(out["hausdorff"])
    assert out["fp"] == 4
    both = metrics.evaluate_image(empty, empty)
    assert all(math.isnan(both["all"][f]) for f in metrics.FIGURES)
    assert math.isnan(both["mpq_plus"]) and math.isnan(both["classification"]["accuracy"])


def test_no_overlap_pairing_uses_the_nearest_object_in_hausdorff():
    gt = np.zeros((30, 60), np.int32)
    gt[5:10, 5:10] = 3  # a 5x5 square
    pred = np.zeros_like(gt)
    pred[5:10, 20:25] = 6  # same square 15 px to the right: Hausdorff 15
    pred[20:30, 40:60] = 9  # a far, large object
    # gt side: the square's nearest prediction is at 15. pred side: 6 -> 15; 9 -> its own distance to gt.
    far = slow_hausdorff(pred == 9, gt == 3)
    expected_pred_side = (25 * 15 + 200 * far) / 225
    assert metrics.object_hausdorff(pred, gt) == pytest.approx(0.5 * (15 + expected_pred_side))
    assert metrics.object_dice(pred, gt) == 0.0


def test_hausdorff_sees_interior_points():
    """A ring nucleus inside a filled prediction: the farthest point is the disk's centre, on no outline."""
    yy, xx = np.mgrid[:41, :41]
    r = np.hypot(yy - 20, xx - 20)
    gt = np.where((r >= 12) & (r <= 15), 3, 0).astype(np.int32)
    pred = np.where(r <= 15, 6, 0).astype(np.int32)  # covers the ring and its hole
    assert metrics.object_hausdorff(pred, gt) == 12.0 == slow_hausdorff(pred == 6, gt == 3)


def test_ignore_map_drops_predictions_mostly_on_it():
    ignore = np.zeros_like(GT)
    pred = GT.copy()
    pred[0:4, 0:4] = 99  # a prediction wholly on an ignored nucleus
    ignore[0:4, 0:4] = 1
    pred[36:40, 36:40] = 98  # half on an ignored nucleus: still dropped
    ignore[36:40, 36:38] = 1
    pred[0:4, 36:40] = 97  # a quarter on it: kept, a false positive
    ignore[0:4, 36:37] = 1
    out = metrics.evaluate_image(pred, GT, ignore)
    assert out["n_ignored"] == 2
    assert (out["all"]["tp"], out["all"]["fp"]) == (4, 1)
    assert metrics.evaluate_image(pred, GT)["all"]["fp"] == 3


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="shape"):
        metrics.evaluate_image(GT[:, :10], GT)
    with pytest.raises(ValueError, match="2-D"):
        metrics.evaluate_image(GT[..., None], GT[..., None])
    with pytest.raises(ValueError, match="integer"):
        metrics.detection(GT.astype(float), GT)
    with pytest.raises(ValueError, match="ignore"):
        metrics.evaluate_image(GT, GT, np.zeros((3, 3)))


def test_large_ids_and_dtypes():
    big = np.where(GT > 0, GT.astype(np.int64) * 10**9, 0).astype(np.uint64)
    assert_same(metrics.evaluate_image(big, GT.astype(np.uint16)), slow_evaluate(big.astype(np.int64), GT))


# ----------------------------------------------------------------------------------------------------------
# Summary over images
# ----------------------------------------------------------------------------------------------------------


def test_summarize_means_per_image_and_pools_classification_and_mpq():
    rng = np.random.default_rng(3)
    per_image = {}
    for k in range(3):
        gt = touching_nuclei(rng)
        per_image[f"im{k}"] = metrics.evaluate_image(perturbed(rng, gt), gt)
    per_image["empty"] = metrics.evaluate_image(np.zeros((8, 8), int), np.zeros((8, 8), int))
    summary = metrics.summarize(per_image)
    assert summary["n_images"] == 4
    for name in metrics.GROUPS:
        for fig in metrics.FIGURES:
            values = [img[name][fig] for img in per_image.values()]
            kept = [v for v in values if not math.isnan(v)]
            assert summary[name][fig] == pytest.approx(np.mean(kept), rel=1e-12)
            assert summary[name]["nan_skipped"][fig] == len(values) - len(kept)
        assert summary[name]["tp"] == sum(img[name]["tp"] for img in per_image.values())
    assert summary["all"]["nan_skipped"]["hausdorff"] >= 1
    confusion = sum(np.asarray(img["classification"]["confusion"]) for img in per_image.values())
    assert summary["classification"]["confusion"] == confusion.tolist()
    assert summary["classification"]["accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
    pooled = {}
    for name in CLASS_NAMES:
        tp, fp, fn = (sum(img[name][k] for img in per_image.values()) for k in ("pq_tp", "pq_fp", "pq_fn"))
        iou = sum(img[name]["pq_iou_sum"] for img in per_image.values())
        pooled[name] = iou / (tp + 0.5 * fp + 0.5 * fn)
    assert summary["pq_plus"] == pytest.approx(pooled)
    assert summary["mpq_plus"] == pytest.approx(np.mean(list(pooled.values())))


# ----------------------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------------------


def test_real_tile_against_an_eroded_copy(consep_dir):
    gt = read_label(consep_dir / "train_4_label.png")
    other = read_label(consep_dir / "train_4_other.png")
    same = metrics.evaluate_image(gt, gt, other)
    assert same["all"]["f1"] == 1.0 and same["all"]["hausdorff"] == 0.0 and same["all"]["aji"] == 1.0
    assert same["n_ignored"] == 0

    # each nucleus loses its outline (pixels with a 4-neighbour of another id): a subset of itself
    cross = ndi.generate_binary_structure(2, 1)
    eroded = np.where(
        (ndi.grey_erosion(gt, footprint=cross) == gt) & (ndi.grey_dilation(gt, footprint=cross) == gt), gt, 0
    )
    ids = np.array(_ids(gt))
    kept_half = int(
        np.sum(2 * np.bincount(eroded.ravel(), minlength=gt.max() + 1)[ids] >= np.bincount(gt.ravel())[ids])
    )
    out = metrics.evaluate_image(eroded, gt, other)
    a = out["all"]
    assert a["tp"] == kept_half and a["fn"] == len(ids) - kept_half and a["fp"] == a["n_pred"] - kept_half
    assert 0.7 < a["dice"] < 1.0 and 0.0 < a["hausdorff"] < 3.0 and 0.0 < a["aji"] < a["dice"]
    assert a["sq"] < 1.0 and a["pq"] <= a["dq"]
    assert out["classification"]["accuracy"] == 1.0  # ids are unchanged, so are classes

    # predictions placed on the "other" nuclei are ignored; without the ignore map they are false positives
    n_other = len(_ids(other))
    with_other = np.where(other > 0, other.astype(np.int64) * 3 + 60000 * 3, gt)
    assert metrics.evaluate_image(with_other, gt, other)["all"]["fp"] == 0
    assert metrics.evaluate_image(with_other, gt)["all"]["fp"] == n_other > 0


def test_real_tile_region_matches_slow_reference(consep_dir):
    gt = read_label(consep_dir / "train_4_label.png")[300:420, 300:420]
    rng = np.random.default_rng(0)
    pred = perturbed(rng, gt)
    assert_same(metrics.evaluate_image(pred, gt), slow_evaluate(pred, gt))


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def test_cli_evaluate_writes_json(tmp_path):
    from nucleiseg.cli import app

    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    rng = np.random.default_rng(11)
    expected = {}
    for name in ("a", "b"):
        gt = touching_nuclei(rng)
        pred = perturbed(rng, gt)
        ignore = random_ignore(rng, gt.shape)
        write_label(gt_dir / f"{name}_label.png", gt)
        write_label(pred_dir / f"{name}_label.png", pred)
        if name == "a":  # ignore maps are optional per image
            write_label(gt_dir / f"{name}_other.png", ignore)
            expected[name] = metrics.evaluate_image(pred, gt, ignore)
        else:
            expected[name] = metrics.evaluate_image(pred, gt)
    write_label(gt_dir / "empty_label.png", np.zeros((20, 20), np.int32))
    write_label(pred_dir / "empty_label.png", np.zeros((20, 20), np.int32))
    out = tmp_path / "report" / "metrics.json"

    result = CliRunner().invoke(app, ["evaluate", str(pred_dir), str(gt_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "NaN" not in text
    report = json.loads(text)
    assert sorted(report["images"]) == ["a", "b", "empty"]
    for name, exp in expected.items():
        assert report["images"][name]["all"]["f1"] == exp["all"]["f1"]
        assert report["images"][name]["stroma"]["hausdorff"] == pytest.approx(exp["stroma"]["hausdorff"], nan_ok=True)
        assert report["images"][name]["classification"]["confusion"] == exp["classification"]["confusion"]
    assert report["images"]["empty"]["all"]["hausdorff"] is None
    assert report["summary"]["n_images"] == 3
    assert report["summary"]["all"]["nan_skipped"]["hausdorff"] == 1
    assert report["summary"]["all"]["dice"] == pytest.approx(
        (expected["a"]["all"]["dice"] + expected["b"]["all"]["dice"]) / 2
    )
    for key in ("all", "tumor", "lymphocyte", "stroma"):
        assert {"f1", "precision", "recall", "dice", "hausdorff", "pq"} <= set(report["summary"][key])
    assert {"aji", "dq", "sq"} <= set(report["summary"]["all"])
    assert set(report["summary"]["classification"]) >= {"accuracy", "accuracy_tumor", "confusion"}
    assert "mpq_plus" in report["summary"]


def test_cli_evaluate_names_unpaired_and_bad_files(tmp_path):
    from nucleiseg.cli import app

    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    write_label(gt_dir / "a_label.png", GT)
    write_label(pred_dir / "a_label.png", GT)
    write_label(pred_dir / "stray_label.png", GT)
    out = tmp_path / "metrics.json"
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(pred_dir), str(gt_dir), "--out", str(out)])
    assert result.exit_code != 0
    assert "stray_label.png" in result.output and not out.exists()

    (pred_dir / "stray_label.png").unlink()
    write_label(gt_dir / "b_label.png", GT)
    (pred_dir / "b_label.png").write_bytes(b"not a png")
    write_label(gt_dir / "c_label.png", GT)
    write_label(pred_dir / "c_label.png", GT[:20])
    result = runner.invoke(app, ["evaluate", str(pred_dir), str(gt_dir), "--out", str(out)])
    assert result.exit_code != 0
    assert "b_label.png" in result.output and "c_label.png" in result.output
    report = json.loads(out.read_text())  # the good image is still evaluated and written
    assert list(report["images"]) == ["a"] and report["images"]["a"]["all"]["f1"] == 1.0
    assert set(report["failed"]) == {"b", "c"}

    result = runner.invoke(app, ["evaluate", str(tmp_path / "nowhere"), str(gt_dir), "--out", str(out)])
    assert result.exit_code != 0 and "nowhere" in result.output
