"""Benchmark: nucleiseg.metrics.evaluate_image against the reference code's per-object algorithm.

Input: a real CoNSeP tile (1000x1000, ~740 nuclei, default ``train_22``) as ground truth, and a perturbed copy
as prediction (shifted, grown, some nuclei missed, split, merged or reclassed, false positives), with the
tile's ``_other.png`` ignore map. Without the real data, a synthetic 1000x1000 label of ~700 touching nuclei.

"Reference" re-implements the algorithm of github.com/huiqu18/NucleiSegClas (``utils.py``, as called by
``test.py``): every object is a full-image mask (``np.where(label == id)``) and its partners come from
``np.unique`` over the masked image; detection + classification on all nuclei and per class, object-level
Dice per class and all, Hausdorff on all nuclei (``directed_hausdorff`` on pixel lists, nearest-object search
in a growing window). It gets the prediction already cleaned of ignored nuclei and no connected-component
relabelling (both only make it slower). It computes fewer figures than ``evaluate_image`` (no AJI, PQ,
mPQ+, per-class Hausdorff), so the ratio understates the speed-up.

    .venv/bin/python benchmarks/bench_metrics.py [--tile train_22] [--reference-objects N] [--repeat 3]

``--reference-objects N`` times the reference on the first N objects of each loop only and extrapolates
linearly (said so in the output); the default 0 measures it fully.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.distance import directed_hausdorff

from nucleiseg import metrics

REPO = Path(__file__).resolve().parents[1]
CONSEP = Path(os.environ.get("NUCLEISEG_CONSEP_DIR", REPO.parent / "shared" / "realdata" / "consep" / "train"))


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def synthetic_label(rng: np.random.Generator, size: int = 1000, n: int = 700) -> np.ndarray:
    """Touching, ragged nuclei: each pixel goes to the seed of smallest distance / radius, inside if < 1."""
    centers = rng.uniform(0, size, (n, 2))
    radii = rng.uniform(5, 14, n)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    best = np.full((size, size), np.inf, np.float32)
    owner = np.zeros((size, size), np.int32)
    for k, ((cy, cx), r) in enumerate(zip(centers, radii, strict=True)):
        r0, r1 = max(0, int(cy - r - 1)), min(size, int(cy + r + 2))
        c0, c1 = max(0, int(cx - r - 1)), min(size, int(cx + r + 2))
        rel = np.hypot(yy[r0:r1, c0:c1] - cy, xx[r0:r1, c0:c1] - cx) / r
        win = rel < best[r0:r1, c0:c1]
        best[r0:r1, c0:c1][win] = rel[win]
        owner[r0:r1, c0:c1][win] = k
    ids = 3 * np.arange(1, n + 1) + rng.integers(0, 3, n)
    return np.where(best < 1, ids[owner], 0).astype(np.int32)


def perturb(rng: np.random.Generator, gt: np.ndarray) -> np.ndarray:
    """A plausible prediction of ``gt``."""
    pred = np.roll(gt, (1, -2), axis=(0, 1))
    grown = ndi.grey_dilation(pred, size=3)
    pred = np.where(pred == 0, grown, pred)  # nuclei grow by a pixel into the background
    ids = np.unique(pred)[1:]
    fate = rng.random(ids.size)
    next_id = 3 * (int(gt.max()) // 3 + 1)
    lut = np.zeros(int(pred.max()) + 1, np.int64)
    for i, u in zip(ids.tolist(), fate.tolist(), strict=True):
        if u < 0.05:
            continue  # missed
        if u < 0.15:  # reclassed
            lut[i] = next_id + int(rng.integers(0, 3))
            next_id += 3
        else:
            lut[i] = i
    pred = lut[pred]
    rows = np.arange(pred.shape[0])[:, None]
    for i in rng.choice(ids, ids.size // 20, replace=False):  # split along a row
        mask = pred == lut[i]
        if lut[i] and mask.any():
            cut = np.median(np.nonzero(mask)[0])
            pred[mask & (rows > cut)] = next_id
            next_id += 3
    for _ in range(20):  # false positives
        r, c = rng.integers(0, pred.shape[0] - 12, 2)
        pred[r : r + rng.integers(4, 12), c : c + rng.integers(4, 12)] = next_id + int(rng.integers(0, 3))
        next_id += 3
    return pred


def load_inputs(tile: str) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(0)
    label_path = CONSEP / f"{tile}_label.png"
    if label_path.is_file():
        from nucleiseg.labels import read_label

        gt = read_label(label_path)
        other = CONSEP / f"{tile}_other.png"
        ignore = read_label(other) if other.is_file() else None
        source = f"CoNSeP {tile}"
    else:
        gt, ignore, source = synthetic_label(rng), None, "synthetic (CoNSeP not found)"
    return source, perturb(rng, gt), gt, ignore


# ----------------------------------------------------------------------------------------------------------
# The reference code's per-object algorithm
# ----------------------------------------------------------------------------------------------------------


class Budget:
    """Visit at most ``limit`` objects per loop (0: all), and remember the scale-up of the skipped ones."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.visited = 0
        self.total = 0

    def take(self, ids: np.ndarray) -> np.ndarray:
        chosen = ids if not self.limit else ids[: self.limit]
        self.visited += chosen.size
        self.total += ids.size
        return chosen


def _ids(label: np.ndarray) -> np.ndarray:
    ids = np.unique(label)
    return ids[ids != 0]


def _haus(a: np.ndarray, b: np.ndarray) -> float:
    pa, pb = np.argwhere(a), np.argwhere(b)
    return max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0])


def _window_candidates(obj: np.ndarray, others: np.ndarray, radius: int = 50) -> np.ndarray:
    if radius > 400:
        return np.array([], int)
    r, c = (int(v) for v in ndi.center_of_mass(obj))
    found = _ids(others[max(0, r - radius) : r + radius, max(0, c - radius) : c + radius])
    return found if found.size else _window_candidates(obj, others, 2 * radius)


def reference_detection(pred: np.ndarray, gt: np.ndarray, budget: Budget) -> tuple[int, int, int, list]:
    tp = fp = 0
    matched, pairs = set(), []
    for i in budget.take(_ids(pred)):
        pred_i = np.where(pred == i, 1, 0)
        overlap = pred_i * gt
        objs = _ids(overlap)
        if objs.size == 0:
            fp += 1
            continue
        areas = [np.sum(overlap == k) for k in objs]
        j = objs[int(np.argmax(areas))]
        if max(areas) / np.sum(gt == j) >= 0.5 and j not in matched:
            tp += 1
            matched.add(j)
            pairs.append((int(i), int(j)))
        else:
            fp += 1
    return tp, fp, _ids(gt).size - tp, pairs


def _one_side(a: np.ndarray, b: np.ndarray, budget: Budget, with_hausdorff: bool) -> tuple[float, float]:
    total = np.sum(a > 0)
    dice = haus = 0.0
    for i in budget.take(_ids(a)):
        a_i = np.where(a == i, 1, 0)
        overlap = a_i * b
        objs = _ids(overlap)
        weight = np.sum(a_i) / total
        if objs.size == 0:
            d = 0.0
            h = min(_haus(a_i, b == j) for j in _window_candidates(a_i, b)) if with_hausdorff else 0.0
        else:
            areas = [np.sum(overlap == k) for k in objs]
            b_j = np.where(b == objs[int(np.argmax(areas))], 1, 0)
            d = 2 * max(areas) / (np.sum(a_i) + np.sum(b_j))
            h = _haus(a_i, b_j) if with_hausdorff else 0.0
        dice += weight * d
        haus += weight * h
    return dice, haus


def reference_object_level(pred: np.ndarray, gt: np.ndarray, budget: Budget, with_hausdorff: bool) -> tuple:
    if not _ids(pred).size or not _ids(gt).size:
        return 0.0, float("nan")
    dice_g, haus_g = _one_side(gt, pred, budget, with_hausdorff)
    dice_s, haus_s = _one_side(pred, gt, budget, with_hausdorff)
    return (dice_g + dice_s) / 2, (haus_g + haus_s) / 2


def reference_all(pred: np.ndarray, gt: np.ndarray, budget: Budget) -> dict:
    """What the reference test.py computes per image."""
    out = {}
    tp, fp, fn, pairs = reference_detection(pred, gt, budget)
    dice, haus = reference_object_level(pred, gt, budget, with_hausdorff=True)
    conf = np.zeros((3, 3), int)
    for i, j in pairs:
        conf[j % 3, i % 3] += 1
    out["all"] = {"f1": 2 * tp / (2 * tp + fp + fn), "dice": dice, "hausdorff": haus, "confusion": conf}
    for c, name in enumerate(metrics.CLASS_NAMES):
        p, g = np.where(pred % 3 == c, pred, 0), np.where(gt % 3 == c, gt, 0)
        tp, fp, fn, _ = reference_detection(p, g, budget)
        dice, _ = reference_object_level(p, g, budget, with_hausdorff=False)
        out[name] = {"f1": 2 * tp / max(2 * tp + fp + fn, 1), "dice": dice}
    return out


# ----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", default="train_22")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--reference-objects", type=int, default=0, help="0: time the reference fully")
    args = parser.parse_args()

    source, pred, gt, ignore = load_inputs(args.tile)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}")
    print(f"input: {source}, {gt.shape[0]}x{gt.shape[1]}, {_ids(gt).size} gt / {_ids(pred).size} predicted nuclei")

    wall, cpu = [], []
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        ours = metrics.evaluate_image(pred, gt, ignore)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    t_ours, c_ours = float(np.median(wall)), float(np.median(cpu))
    print(
        f"ours, nucleiseg.metrics.evaluate_image (every figure, all + 3 classes, ignore map): "
        f"{t_ours:.3f} s wall, {c_ours:.3f} s CPU (median of {args.repeat})"
    )

    cleaned = metrics.drop_ignored(pred, ignore) if ignore is not None else pred
    budget = Budget(args.reference_objects)
    t0, c0 = time.perf_counter(), time.process_time()
    ref = reference_all(cleaned, gt, budget)
    t_ref, c_ref = time.perf_counter() - t0, time.process_time() - c0
    if budget.visited < budget.total:
        scale = budget.total / budget.visited
        print(
            f"reference per-object algorithm: {t_ref:.1f} s wall, {c_ref:.1f} s CPU for {budget.visited} of "
            f"{budget.total} object visits, EXTRAPOLATED linearly to {t_ref * scale:.1f} s wall, "
            f"{c_ref * scale:.1f} s CPU"
        )
        t_ref, c_ref = t_ref * scale, c_ref * scale
    else:
        print(f"reference per-object algorithm (its test.py figures only): {t_ref:.1f} s wall, {c_ref:.1f} s CPU")
        print(
            "agreement (ours/reference): "
            + ", ".join(
                f"{g} F1 {ours[g]['f1']:.4f}/{ref[g]['f1']:.4f} Dice {ours[g]['dice']:.4f}/{ref[g]['dice']:.4f}"
                for g in ("all", *metrics.CLASS_NAMES)
            )
            + f"; Hausdorff {ours['all']['hausdorff']:.4f}/{ref['all']['hausdorff']:.4f} (reference: windowed search)"
            + f"; confusion equal: {ours['classification']['confusion'] == ref['all']['confusion'].tolist()}"
        )
    print(
        f"speed-up: {t_ref / t_ours:.0f}x wall, {c_ref / c_ours:.0f}x CPU "
        f"(targets: >= 50x; ours < 1 s: {'yes' if t_ours < 1 else 'NO'})"
    )


if __name__ == "__main__":
    main()
