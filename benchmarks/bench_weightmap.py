"""Benchmark: nucleiseg.weightmap.weight_map (eq. 2 of Qu et al.) against a brute force of the definition.

Targets (issue 3), one thread: a 224x224 crop in under 10 ms, the densest real tile (``train_18``, 2,283 nuclei,
1000x1000) in under 0.5 s, and at most 1e-3 from the brute force.

Input: the real CoNSeP tile ``train_18`` and 224x224 crops of it on a 4x4 grid; without the real data, a
synthetic 1000x1000 label of ~2,300 touching nuclei. The brute force is the reference code's method (every
pixel against every boundary pixel, minimum per nucleus, the two smallest), vectorised per nucleus; it runs on
a 128x128 and a 224x224 crop (the full tile would take hours: its time is extrapolated from the 224 crop by the
pixel x boundary-pixel count, and said so). The speed-up is measured on the same crop in the same run.

    .venv/bin/python benchmarks/bench_weightmap.py [--tile train_18] [--repeat 5] [--w0 10] [--sigma 5]

Wall times on a busy machine are inflated: the thread CPU time is printed beside them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy loads its BLAS

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from threadpoolctl import threadpool_limits

from nucleiseg.labels import read_label
from nucleiseg.weightmap import boundary_pixels, weight_map

REPO = Path(__file__).resolve().parents[1]
CONSEP = Path(os.environ.get("NUCLEISEG_CONSEP_DIR", REPO.parent / "shared" / "realdata" / "consep" / "train"))
CROP = 224


def synthetic_label(rng: np.random.Generator, size: int = 1000, n: int = 2300) -> np.ndarray:
    """Touching, ragged nuclei as dense as train_18: each pixel goes to the seed of smallest distance / radius."""
    centers = rng.uniform(0, size, (n, 2))
    radii = rng.uniform(5, 12, n)
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
    return np.where(best < 1, owner + 1, 0).astype(np.int32)


def brute_force(label: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """The definition, as the reference MATLAB code computes it (same as tests/test_weightmap.py)."""
    pad = np.pad(label, 1, mode="edge")  # the outside of the image repeats the edge: never a boundary
    centre = pad[1:-1, 1:-1]
    boundary = (centre > 0) & (
        (pad[:-2, 1:-1] != centre) | (pad[2:, 1:-1] != centre) | (pad[1:-1, :-2] != centre) | (pad[1:-1, 2:] != centre)
    )
    ids = np.unique(label[boundary])
    if ids.size < 2:
        return np.ones(label.shape)
    py, px = (a.ravel().astype(np.float64) for a in np.indices(label.shape))
    d1 = np.full(py.size, np.inf)
    d2 = np.full(py.size, np.inf)
    for nucleus in ids:
        by, bx = (a.astype(np.float64) for a in np.nonzero(boundary & (label == nucleus)))
        dist = np.full(py.size, np.inf)
        for s in range(0, by.size, 32):
            sq = (py[:, None] - by[None, s : s + 32]) ** 2 + (px[:, None] - bx[None, s : s + 32]) ** 2
            np.minimum(dist, sq.min(axis=1), out=dist)
        dist = np.sqrt(dist)
        d2 = np.minimum(d2, np.maximum(d1, dist))
        d1 = np.minimum(d1, dist)
    return (1.0 + w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))).reshape(label.shape)


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float, float]:
    """(best wall, median wall, best thread CPU) seconds over ``repeat`` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.thread_time()
        fn()
        cpus.append(time.thread_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return min(walls), float(np.median(walls)), min(cpus)


def n_nuclei(label: np.ndarray) -> int:
    return int(np.unique(label[label > 0]).size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tile", default="train_18", help="CoNSeP tile (the densest by default)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per input (best and median reported)")
    parser.add_argument("--w0", type=float, default=10.0)
    parser.add_argument("--sigma", type=float, default=5.0)
    args = parser.parse_args()
    w0, sigma = args.w0, args.sigma

    cv2.setNumThreads(1)  # OpenCV's distance transform is parallel by default
    threadpool_limits(1)
    path = CONSEP / f"{args.tile}_label.png"
    if path.is_file():
        label, source = read_label(path), f"{args.tile} (real CoNSeP)"
    else:
        label, source = synthetic_label(np.random.default_rng(0)), "synthetic (real data not found)"
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"one thread (cv2.setNumThreads(1), threadpoolctl); w0={w0:g}, sigma={sigma:g}")
    print(f"tile: {source}, {label.shape[1]}x{label.shape[0]}, {n_nuclei(label)} nuclei\n")

    weight_map(label[:CROP, :CROP], w0, sigma)  # warm-up: imports, first-touch allocations
    tops = np.linspace(0, label.shape[0] - CROP, 4).astype(int)
    lefts = np.linspace(0, label.shape[1] - CROP, 4).astype(int)
    crops = [np.ascontiguousarray(label[t : t + CROP, c : c + CROP]) for t in tops for c in lefts]
    crop_times = [timed(lambda crop=crop: weight_map(crop, w0, sigma), args.repeat * 4) for crop in crops]
    counts = [n_nuclei(crop) for crop in crops]
    densest = int(np.argmax(counts))
    best = np.array([t[0] for t in crop_times])
    cpu = np.array([t[2] for t in crop_times])
    print(f"fast, {CROP}x{CROP} crops (16 on a 4x4 grid, {min(counts)}-{max(counts)} nuclei):")
    print(f"  median crop {np.median(best) * 1e3:.2f} ms wall ({np.median(cpu) * 1e3:.2f} ms CPU)")
    print(f"  slowest crop {best.max() * 1e3:.2f} ms wall ({cpu.max() * 1e3:.2f} ms CPU), target < 10 ms")
    print(f"  densest crop ({counts[densest]} nuclei) {best[densest] * 1e3:.2f} ms wall")
    tile_best, tile_median, tile_cpu = timed(lambda: weight_map(label, w0, sigma), args.repeat)
    print(
        f"fast, whole tile: best {tile_best:.3f} s, median {tile_median:.3f} s wall ({tile_cpu:.3f} s CPU),"
        " target < 0.5 s"
    )

    print("\nagainst the brute force (same input, same run):")
    print(f"  {'input':>10} {'nuclei':>6} {'brute s':>9} {'fast ms':>9} {'speed-up':>9} {'max |error|':>12}")
    crop = crops[densest]
    for size in (128, CROP):
        part = np.ascontiguousarray(crop[:size, :size])
        start = time.perf_counter()
        slow = brute_force(part, w0, sigma)
        brute_s = time.perf_counter() - start
        fast_s = timed(lambda part=part: weight_map(part, w0, sigma), args.repeat * 4)[0]
        error = float(np.abs(weight_map(part, w0, sigma) - slow).max())
        print(
            f"  {f'{size}x{size}':>10} {n_nuclei(part):>6} {brute_s:>9.2f} {fast_s * 1e3:>9.2f} "
            f"{brute_s / fast_s:>8.0f}x {error:>12.2e}"
        )
    # The brute force costs pixels x boundary pixels: extrapolate the last (224) crop to the whole tile.
    per_pair = brute_s / (part.size * boundary_pixels(part).sum())
    estimate = per_pair * label.size * boundary_pixels(label).sum()
    print(
        f"  {'tile':>10} {n_nuclei(label):>6} {estimate:>9.0f} {tile_best * 1e3:>9.1f} {estimate / tile_best:>8.0f}x"
        f" {'n/a':>12}   (brute force extrapolated, not run: ~{estimate / 3600:.1f} h)"
    )
    print("  error tolerance: 1e-3 (the cut-off of terms below 1e-4 bounds it at 1e-4)")


if __name__ == "__main__":
    main()
