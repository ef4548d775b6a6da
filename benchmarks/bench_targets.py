"""Benchmark: training targets of a dense 1000x1000 label, vectorised vs. one nucleus at a time.

Times :func:`nucleiseg.labels.targets` on the densest real CoNSeP tile (train_18: 2,283 nuclei; a synthetic
label of 2,000 touching nuclei when the real data is absent) against the direct reference: the loop of
huiqu18/NucleiSegClas (dilation and erosion of every nucleus with skimage), run on each nucleus's bounding
box plus one pixel, which gives the same result as on the whole image but faster. ``--literal`` also times the
reference exactly as written (whole-image operations per nucleus; about a minute). Checks that all agree.

Usage: ``python benchmarks/bench_targets.py [--label PATH] [--repeat N] [--literal]``
Target (issue 2): under 50 ms for 1000x1000 with 2,000 nuclei.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
from skimage import morphology

from nucleiseg.labels import read_label, targets

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LABEL = REPO.parent / "shared" / "realdata" / "consep" / "train" / "train_18_label.png"
TARGET_MS = 50.0


def _finish(label: np.ndarray, rings: np.ndarray) -> np.ndarray:
    out = np.zeros(label.shape, dtype=np.uint8)
    for c in range(3):
        out[(label > 0) & (label % 3 == c) & ~rings] = c + 1
    inside = out > 0
    out[morphology.dilation(inside, morphology.disk(2)) & ~inside] = 4
    return out


def per_nucleus_targets(label: np.ndarray) -> np.ndarray:
    """The reference loop, each nucleus on its bounding box grown by one pixel (clipped at the image edge)."""
    from scipy import ndimage as ndi

    h, w = label.shape
    rings = np.zeros(label.shape, dtype=bool)
    for i, box in enumerate(ndi.find_objects(label), start=1):
        if box is None:
            continue
        ys = slice(max(box[0].start - 1, 0), min(box[0].stop + 1, h))
        xs = slice(max(box[1].start - 1, 0), min(box[1].stop + 1, w))
        nucleus = label[ys, xs] == i
        rings[ys, xs] |= morphology.dilation(nucleus) & ~morphology.erosion(nucleus)
    return _finish(label, rings)


def literal_reference_targets(label: np.ndarray) -> np.ndarray:
    """The reference loop exactly as written: whole-image dilation and erosion for every nucleus."""
    rings = np.zeros(label.shape, dtype=bool)
    for i in np.unique(label):
        if i == 0:
            continue
        nucleus = label == i
        rings |= morphology.dilation(nucleus) & ~morphology.erosion(nucleus)
    return _finish(label, rings)


def synthetic_dense_label(shape=(1000, 1000), n=2000, seed=0) -> np.ndarray:
    """About ``n`` round nuclei of radius 5-11 px on a jittered grid, many of them touching."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    step = np.array(shape) / side
    gy, gx = np.mgrid[0:side, 0:side].reshape(2, -1)[:, :n]
    seeds = np.stack([(gy + 0.5) * step[0], (gx + 0.5) * step[1]], axis=1) + rng.normal(0, step / 6, size=(n, 2))
    markers = np.zeros(shape, dtype=np.int32)
    yx = np.clip(np.round(seeds).astype(int), 0, np.array(shape) - 1)
    markers[yx[:, 0], yx[:, 1]] = np.arange(1, n + 1)
    dist, (iy, ix) = ndi.distance_transform_edt(markers == 0, return_indices=True)
    owner = markers[iy, ix]
    radius = rng.uniform(5, 11, size=n + 1)
    return np.where(dist <= radius[owner], owner, 0).astype(np.int32)


def best_time(fn, label: np.ndarray, repeat: int) -> tuple[float, np.ndarray]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(label)
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", type=Path, default=DEFAULT_LABEL)
    parser.add_argument("--repeat", type=int, default=20, help="repeats of the fast version (best is kept)")
    parser.add_argument("--literal", action="store_true", help="also time the whole-image reference loop")
    args = parser.parse_args()

    if args.label.is_file():
        label, source = read_label(args.label), str(args.label)
    else:
        label, source = synthetic_dense_label(), "synthetic (real tile not found)"
    n = len(np.unique(label)) - 1
    print(f"label: {source}: {label.shape[0]}x{label.shape[1]}, {n} nuclei")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}")

    fast_s, fast = best_time(targets, label, args.repeat)
    ref_s, ref = best_time(per_nucleus_targets, label, 1)
    assert np.array_equal(fast, ref), "targets() differs from the per-nucleus reference"
    print(f"targets (vectorised):       {fast_s * 1e3:9.1f} ms  (best of {args.repeat})")
    print(f"per-nucleus reference:      {ref_s * 1e3:9.1f} ms  -> speed-up x{ref_s / fast_s:.0f}")
    if args.literal:
        lit_s, lit = best_time(literal_reference_targets, label, 1)
        assert np.array_equal(fast, lit), "targets() differs from the literal reference"
        print(f"literal whole-image loop:   {lit_s * 1e3:9.1f} ms  -> speed-up x{lit_s / fast_s:.0f}")
    print("outputs identical: yes")
    verdict = "met" if fast_s * 1e3 < TARGET_MS else "NOT met"
    print(f"target < {TARGET_MS:.0f} ms for 1000x1000 with ~2,000 nuclei: {verdict}")


if __name__ == "__main__":
    main()
