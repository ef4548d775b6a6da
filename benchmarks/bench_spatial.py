"""Benchmark: the spatial statistics of a slide-sized pattern (500,000 nuclei), and a reference on a subsample.

Input: a synthetic slide of ``--nuclei`` nuclei (default 500,000) in a 14 x 12 mm rectangle whose tissue is an
ellipse (a tissue mask of 1400 x 1200 px at 10 um/px: 121.6 mm^2 of tissue, ~4,100 nuclei/mm^2, half the
density of CoNSeP's tiles, as a slide with stroma and glass between cellular areas): tumour nuclei in Gaussian
clusters (glands), lymphocytes half in aggregates and half scattered, stroma nuclei scattered; classes
45 / 25 / 30 %.

Ours: :func:`nucleiseg.spatial.spatial_statistics` with the default settings of params.yaml (nearest
neighbours of all 9 class pairs on all nuclei; L functions of the 6 class pairs with translation edge
correction from the mask's set covariance and 39 CSR simulations, on at most 20,000 nuclei per class;
neighbourhood enrichment with 199 permutations on all nuclei; Morisita-Horn), then the whole HTML report
(:func:`nucleiseg.spatial_report.write_spatial_report`, statistics included).

Reference, measured in the same run on a random subsample of ``--subsample`` nuclei (default 5,000), all one
class: pointpats 2.5 (``k`` at the same radii, no edge correction, and ``PointPattern.nnd``; both form all
pairwise distances) against ours on the same points (``ripley_k`` without edge correction and
``nearest_neighbour_distances``): the ratio is measured, and the reference's time for the whole slide is
extrapolated as O(N^2) (said so).

    .venv/bin/python benchmarks/bench_spatial.py [--nuclei 500000] [--subsample 5000] [--no-report]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable

import numpy as np

from nucleiseg.spatial import (
    SpatialSettings,
    Window,
    nearest_neighbour_distances,
    radii_for,
    ripley_k,
    spatial_statistics,
)

WIDTH_UM, HEIGHT_UM, MASK_UM = 14000.0, 12000.0, 10.0


def tissue_mask() -> np.ndarray:
    rows, cols = int(HEIGHT_UM / MASK_UM), int(WIDTH_UM / MASK_UM)
    yy, xx = np.mgrid[:rows, :cols]
    return ((yy - rows / 2) / (0.48 * rows)) ** 2 + ((xx - cols / 2) / (0.48 * cols)) ** 2 <= 1


def synthetic_slide(n: int, window: Window, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` nuclei inside the window's tissue: clustered tumour, half-aggregated lymphocytes, scattered stroma."""
    n_tumor, n_lymph = int(0.45 * n), int(0.25 * n)
    n_stroma = n - n_tumor - n_lymph

    def inside(points: np.ndarray, wanted: int, refill: Callable[[int], np.ndarray]) -> np.ndarray:
        points = points[window.contains(points)]
        while len(points) < wanted:
            extra = refill(wanted - len(points))
            points = np.vstack([points, extra[window.contains(extra)]])
        return points[:wanted]

    def clustered(count: int, per_cluster: int, sigma: float) -> np.ndarray:
        centres = window.sample(max(1, count // per_cluster), rng)
        pick = rng.integers(0, len(centres), count)
        return centres[pick] + rng.normal(0, sigma, (count, 2))

    tumor = inside(clustered(n_tumor, 150, 60.0), n_tumor, lambda k: clustered(k, 150, 60.0))
    half = n_lymph // 2
    lymph = np.vstack([
        inside(clustered(half, 80, 40.0), half, lambda k: clustered(k, 80, 40.0)),
        window.sample(n_lymph - half, rng),
    ])  # fmt: skip
    stroma = window.sample(n_stroma, rng)
    xy = np.vstack([tumor, lymph, stroma])
    codes = np.repeat(np.arange(3, dtype=np.int8), [n_tumor, n_lymph, n_stroma])
    return xy, codes


def timed(fn, *args, **kwargs):
    started, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nuclei", type=int, default=500_000)
    parser.add_argument("--subsample", type=int, default=5000)
    parser.add_argument("--no-report", action="store_true", help="time the statistics only")
    args = parser.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")  # fmt: skip
    rng = np.random.default_rng(0)
    window = Window(WIDTH_UM, HEIGHT_UM, mask=tissue_mask(), description="benchmark ellipse")
    xy, codes = synthetic_slide(args.nuclei, window, rng)
    print(f"pattern: {len(xy):,} nuclei in {window.area * 1e-6:.1f} mm^2 of tissue "
          f"({len(xy) / (window.area * 1e-6):,.0f} per mm^2)")  # fmt: skip

    settings = SpatialSettings()
    result, wall, cpu = timed(spatial_statistics, xy, codes, window, settings)
    print(f"ours, all statistics ({settings.simulations} CSR simulations, {settings.permutations} permutations): "
          f"{wall:.1f} s wall, {cpu:.1f} s CPU")  # fmt: skip
    enrichment = result.enrichment
    print(f"  enrichment graph: {enrichment.edges:,} edges; L on {result.l_function.used.tolist()} nuclei per class")
    if not args.no_report:
        import pandas as pd

        from nucleiseg.labels import CLASS_NAMES
        from nucleiseg.spatial_report import write_spatial_report

        table = pd.DataFrame({"class": np.asarray(CLASS_NAMES)[codes], "centroid_x_um": xy[:, 0],
                              "centroid_y_um": xy[:, 1], "image": "benchmark"})  # fmt: skip
        with tempfile.TemporaryDirectory() as out:
            _, wall_report, cpu_report = timed(
                write_spatial_report, table, out, mpp=MASK_UM, tissue_mask=window.mask,
                image_shape=window.mask.shape, settings=settings,
            )  # fmt: skip
        print(f"ours, statistics + HTML report: {wall_report:.1f} s wall, {cpu_report:.1f} s CPU")

    # Reference on a subsample, the same points for both.
    pick = rng.choice(len(xy), args.subsample, replace=False)
    sub = xy[pick]
    zeros = np.zeros(len(sub), np.int8)
    box = Window.bounding_box(sub)
    radii = radii_for(box, settings.r_max_um, settings.r_steps)

    def ours_subsample():
        return ripley_k(sub, zeros, box, radii, edge_correction=False), nearest_neighbour_distances(sub, zeros)

    from pointpats import PointPattern  # imported before timing: geopandas and libpysal take a second
    from pointpats.distance_statistics import k

    def pointpats_subsample():
        return k(sub, support=radii), PointPattern(sub).nnd

    (k_ours, nn_ours), ours_wall, _ = timed(ours_subsample)
    ((_, k_theirs), nn_theirs), ref_wall, _ = timed(pointpats_subsample)
    n = len(sub)
    agree_k = np.allclose(k_ours[0, 0] * (n - 1) / n, k_theirs, rtol=1e-10)
    agree_nn = np.allclose(nn_ours[0, 0], np.ravel(nn_theirs))
    print(f"subsample of {n:,}: ours {ours_wall * 1e3:.1f} ms, pointpats {ref_wall * 1e3:.1f} ms, "
          f"ratio {ref_wall / ours_wall:.0f}x (K equal: {agree_k}, NN equal: {agree_nn})")  # fmt: skip
    scale = (len(xy) / n) ** 2
    pairs = len(xy) * (len(xy) - 1) / 2
    print(f"pointpats on all {len(xy):,} nuclei, extrapolated as O(N^2) from the subsample: "
          f"~{ref_wall * scale / 3600:.1f} h for one K + NN of one class "
          f"(its {pairs:.1e}-pair distance vector: {pairs * 8 / 2**30:,.0f} GiB)")  # fmt: skip


if __name__ == "__main__":
    main()
