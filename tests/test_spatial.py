"""Spatial statistics on point patterns whose answer is known, and against PySAL (pointpats, esda) on the same
points.

Agreement with the reference implementations, as asserted below:
- pointpats 2.5 ``k`` / ``l`` (no edge correction, bounding-box area): equal to 1e-10 relative once our unbiased
  ``n (n - 1)`` intensity estimator is rescaled to pointpats' ``n^2``; pointpats' nearest-neighbour distances
  equal ours exactly.
- esda 2.9 ``Join_Counts`` on a libpysal ``DistanceBand`` graph: the neighbour counts are equal exactly
  (``C_tt = 2 bb``, ``C_tl = bw``, ``C_ll = 2 ww``); the permutation z-scores agree within 10% (each rests on a
  permutation standard deviation with ~2.2% relative sampling error at 999 permutations).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from nucleiseg.spatial import (
    SpatialSettings,
    Window,
    class_counts,
    l_function,
    morisita_horn,
    nearest_neighbour_distances,
    nearest_neighbour_summary,
    neighbourhood_enrichment,
    radii_for,
    ripley_k,
    settings_from,
    spatial_statistics,
)

WINDOW = Window.rectangle(400.0, 300.0)


def poisson(n: int, rng: np.random.Generator, window: Window = WINDOW) -> np.ndarray:
    return window.sample(n, rng)


def thomas(rng: np.random.Generator, parents: int = 25, children: int = 30, sigma: float = 6.0) -> np.ndarray:
    """A Thomas cluster process: Gaussian clusters of nuclei around random centres (clustered)."""
    centres = poisson(parents, rng)
    points = np.repeat(centres, children, axis=0) + rng.normal(0, sigma, (parents * children, 2))
    return points[WINDOW.contains(points)]


def hard_core(rng: np.random.Generator, spacing: float = 12.0, jitter: float = 2.0) -> np.ndarray:
    """A jittered grid: no two points closer than spacing - 2 jitter = 8 um (regular)."""
    xs, ys = np.meshgrid(np.arange(6, 400, spacing), np.arange(6, 300, spacing))
    grid = np.column_stack([xs.ravel(), ys.ravel()])
    return grid + rng.uniform(-jitter, jitter, grid.shape)


def single(xy: np.ndarray, simulations: int = 39, seed: int = 1):
    radii = radii_for(WINDOW, 50.0, 25)
    result = l_function(
        xy, np.zeros(len(xy), int), WINDOW, radii, simulations=simulations, rng=np.random.default_rng(seed)
    )
    return result.radii, result.l_minus_r[0, 0], result.low[0, 0], result.high[0, 0], result.mad_p[0, 0]


# ----------------------------------------------------------------------------------------------------------
# Ripley's K / Besag's L: known answers
# ----------------------------------------------------------------------------------------------------------


def test_poisson_pattern_has_l_near_zero_inside_the_envelopes():
    radii, curve, low, high, p = single(poisson(900, np.random.default_rng(0)))
    inside = (curve >= low) & (curve <= high)
    assert inside.mean() >= 0.9, f"{(~inside).sum()} of {len(radii)} radii outside the pointwise envelope"
    assert p > 0.05, "the global MAD test does not reject CSR"
    assert np.max(np.abs(curve)) < 2.0  # um, at radii up to 50 um


def test_clustered_pattern_is_above_and_hard_core_pattern_below_the_envelopes():
    radii, curve, low, high, p = single(thomas(np.random.default_rng(2)))
    assert np.mean(curve > high) >= 0.9 and p == pytest.approx(1 / 40)
    radii, curve, low, high, p = single(hard_core(np.random.default_rng(3)))
    near = radii < 8.0  # closer than the hard core: no pairs at all, so K = 0 and L(r) - r = -r exactly
    np.testing.assert_allclose(curve[near], -radii[near])
    assert np.all(curve[radii <= 12.0] < low[radii <= 12.0]) and p == pytest.approx(1 / 40)


def test_two_independent_types_have_cross_l_and_enrichment_near_zero():
    rng = np.random.default_rng(4)
    xy = np.vstack([poisson(500, rng), poisson(500, rng)])
    codes = np.repeat([0, 1], 500)
    result = l_function(xy, codes, WINDOW, radii_for(WINDOW, 50.0, 25), simulations=39, rng=rng)
    assert result.mad_p[0, 1] > 0.05 and np.max(np.abs(result.l_minus_r[0, 1])) < 2.5
    enrichment = neighbourhood_enrichment(xy, codes, 20.0, permutations=199, rng=rng)
    assert np.all(np.abs(enrichment.z[:2, :2]) < 3), enrichment.z
    assert np.isnan(enrichment.z[2]).all(), "an absent class never varies under permutation"
    # The same two types segregated into the left and right halves: attraction within, avoidance between.
    segregated = xy.copy()
    segregated[:, 0] = np.where(codes == 0, segregated[:, 0] / 2, 200 + segregated[:, 0] / 2)
    apart = neighbourhood_enrichment(segregated, codes, 20.0, permutations=199, rng=rng)
    assert apart.z[0, 0] > 10 and apart.z[1, 1] > 10 and apart.z[0, 1] < -10
    cross = l_function(segregated, codes, WINDOW, radii_for(WINDOW, 50.0, 25), simulations=39, rng=rng)
    assert np.all(cross.l_minus_r[0, 1][cross.radii >= 10] < cross.low[0, 1][cross.radii >= 10])


def test_translation_correction_makes_k_unbiased_where_the_uncorrected_estimate_is_not():
    rng = np.random.default_rng(5)
    radii = np.array([10.0, 40.0, 75.0])
    corrected, plain = [], []
    for _ in range(20):
        xy = poisson(400, rng)
        codes = np.zeros(len(xy), int)
        corrected.append(ripley_k(xy, codes, WINDOW, radii)[0, 0])
        plain.append(ripley_k(xy, codes, WINDOW, radii, edge_correction=False)[0, 0])
    theory = np.pi * radii**2
    np.testing.assert_allclose(np.mean(corrected, axis=0), theory, rtol=0.05)
    assert np.mean(plain, axis=0)[-1] < 0.85 * theory[-1], "without correction pairs across the edge are lost"


def test_a_full_mask_gives_the_rectangle_and_cross_k_pools_into_the_all_nuclei_k():
    rng = np.random.default_rng(6)
    xy, codes = poisson(600, rng), rng.integers(0, 3, 600)
    radii = np.linspace(2, 60, 30)
    rectangle = ripley_k(xy, codes, WINDOW, radii)
    masked = ripley_k(xy, codes, Window(400.0, 300.0, mask=np.ones((150, 200), bool)), radii)
    np.testing.assert_allclose(masked, rectangle, rtol=1e-3)
    # N (N - 1) K_all = sum_i n_i (n_i - 1) K_ii + sum_{i != j} n_i n_j K_ij: the same pairs, the same weights.
    n = np.bincount(codes, minlength=3).astype(float)
    pooled = sum(n[i] * (n[j] - (i == j)) * rectangle[i, j] for i in range(3) for j in range(3))
    total = ripley_k(xy, np.zeros(600, int), WINDOW, radii)[0, 0]
    np.testing.assert_allclose(pooled, 600 * 599 * total, rtol=1e-10)


def test_tissue_mask_window_area_membership_and_simulation():
    mask = np.zeros((30, 40), bool)
    mask[:, :20] = True  # the left half of a 400 x 300 um rectangle is tissue
    window = Window(400.0, 300.0, mask=mask)
    assert window.area == pytest.approx(200.0 * 300.0)
    points = window.sample(2000, np.random.default_rng(7))
    assert window.contains(points).all() and points[:, 0].max() <= 200.0
    assert not window.contains(np.array([[300.0, 10.0]]))[0]
    # A Poisson pattern inside the tissue is CSR *in that window*: the L envelope test does not reject it.
    radii = radii_for(window, 40.0, 20)
    result = l_function(points[:600], np.zeros(600, int), window, radii, simulations=39)
    assert result.mad_p[0, 0] > 0.05
    with pytest.raises(ValueError, match="empty"):
        Window(10.0, 10.0, mask=np.zeros((4, 4), bool))


# ----------------------------------------------------------------------------------------------------------
# Counts, nearest neighbours, Morisita-Horn
# ----------------------------------------------------------------------------------------------------------


def test_counts_and_densities_per_mm2_of_tissue():
    codes = np.array([0] * 100 + [1] * 50)
    rectangle = class_counts(codes, Window.rectangle(1000.0, 500.0))  # 0.5 mm^2
    assert rectangle["counts"] == {"tumor": 100, "lymphocyte": 50, "stroma": 0}
    assert rectangle["fractions"]["tumor"] == pytest.approx(2 / 3)
    assert rectangle["density_per_mm2"]["tumor"] == pytest.approx(200.0)
    half = np.zeros((10, 10), bool)
    half[:, :5] = True
    assert class_counts(codes, Window(1000.0, 500.0, mask=half))["density_per_mm2"]["lymphocyte"] == pytest.approx(
        200.0
    )


def test_nearest_neighbour_distances_and_contact_fraction():
    xy = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 5.0], [100.0, 100.0]])
    codes = np.array([0, 0, 1, 2])
    d = nearest_neighbour_distances(xy, codes)
    np.testing.assert_allclose(d[0, 1], [5.0, math.sqrt(125)])
    np.testing.assert_allclose(d[0, 0], [10.0, 10.0])
    assert len(d[2, 2]) == 0 and len(d[1, 1]) == 0, "a class alone has no nearest other nucleus of its class"
    summary = nearest_neighbour_summary(d, contact_radius_um=6.0)
    assert summary["tumor"]["lymphocyte"]["fraction_within"] == 0.5
    assert summary["tumor"]["lymphocyte"]["median_um"] == pytest.approx((5 + math.sqrt(125)) / 2)
    assert math.isnan(summary["stroma"]["stroma"]["median_um"])


def test_morisita_horn_known_values():
    window = Window.rectangle(200.0, 100.0)  # two 100 um cells
    left, right = [25.0, 50.0], [150.0, 50.0]
    xy = np.array([left] * 4 + [right] * 4 + [left] * 2 + [right] * 2 + [right] * 3)
    codes = np.array([0] * 8 + [1] * 4 + [2] * 3)
    index = morisita_horn(xy, codes, window, grid_um=100.0)
    assert index[0, 1] == pytest.approx(1.0), "the same proportions in every cell"
    assert index[0, 0] == pytest.approx(1.0)
    # tumor (4, 4) vs stroma (0, 3): 2 * 12 / ((32/64 + 9/9) * 8 * 3) = 2/3
    assert index[0, 2] == pytest.approx(2 / 3)
    apart = morisita_horn(np.array([left, right]), np.array([0, 1]), window, grid_um=100.0)
    assert apart[0, 1] == 0.0 and np.isnan(apart[0, 2])


def test_settings_are_validated_and_all_statistics_run_together():
    with pytest.raises(ValueError, match="r_max_um"):
        SpatialSettings(r_max_um=0)
    with pytest.raises(ValueError, match="envelope_null"):
        SpatialSettings(envelope_null="poisson")  # type: ignore[arg-type]
    from nucleiseg.params import ParamsError, load_params

    with pytest.raises(ParamsError, match=r"spatial\.permutations"):
        load_params(None, ["spatial.permutations=1"])
    settings = settings_from({**load_params(None, []).spatial.model_dump(), "simulations": 9, "permutations": 19})
    rng = np.random.default_rng(8)
    result = spatial_statistics(poisson(300, rng), rng.integers(0, 3, 300), WINDOW, settings)
    figures = result.figures()
    assert figures["nuclei"] == 300 and figures["area_mm2"] == pytest.approx(0.12)
    assert set(figures["l_function"]["pairs"]) == {
        "tumor-tumor", "tumor-lymphocyte", "tumor-stroma", "lymphocyte-lymphocyte", "lymphocyte-stroma",
        "stroma-stroma",
    }  # fmt: skip
    assert figures["tumor_with_lymphocyte_within"]["radius_um"] == 20.0
    assert 0 <= figures["tumor_with_lymphocyte_within"]["fraction"] <= 1


# ----------------------------------------------------------------------------------------------------------
# Against PySAL
# ----------------------------------------------------------------------------------------------------------


def test_k_l_and_nearest_neighbours_agree_with_pointpats():
    pointpats = pytest.importorskip("pointpats")
    from pointpats.distance_statistics import k as pp_k
    from pointpats.distance_statistics import l as pp_l

    xy = thomas(np.random.default_rng(9))
    n = len(xy)
    radii = np.linspace(1.0, 60.0, 40)
    window = Window.bounding_box(xy)  # pointpats' area when no hull is given
    ours = ripley_k(xy, np.zeros(n, int), window, radii, edge_correction=False)[0, 0]
    support, theirs = pp_k(xy, support=radii)
    np.testing.assert_allclose(support, radii)
    np.testing.assert_allclose(ours * (n - 1) / n, theirs, rtol=1e-10)  # lambda^2: n (n - 1) / |W|^2 vs n^2 / |W|^2
    _, l_theirs = pp_l(xy, support=radii, linearized=True)
    np.testing.assert_allclose(np.sqrt(ours * (n - 1) / n / np.pi) - radii, l_theirs, rtol=1e-10, atol=1e-10)
    nnd = pointpats.PointPattern(xy).nnd
    np.testing.assert_allclose(nearest_neighbour_distances(xy, np.zeros(n, int))[0, 0], np.ravel(nnd))


def test_enrichment_agrees_with_esda_join_counts():
    pytest.importorskip("esda")
    from esda.join_counts import Join_Counts
    from libpysal.weights import DistanceBand

    rng = np.random.default_rng(10)
    xy = np.vstack([thomas(rng, parents=8, children=25), poisson(200, rng)])
    codes = np.repeat([0, 1], [len(xy) - 200, 200])  # clustered tumour among scattered lymphocytes
    ours = neighbourhood_enrichment(xy, codes, 15.0, permutations=999, rng=rng)
    graph = DistanceBand(xy, threshold=15.0, binary=True, silence_warnings=True)
    np.random.seed(11)  # noqa: NPY002 (esda permutes with numpy's global generator)
    theirs = Join_Counts((codes == 0).astype(int), graph, permutations=999)
    assert ours.counts[0, 0] == 2 * theirs.bb and ours.counts[1, 1] == 2 * theirs.ww
    assert ours.counts[0, 1] == ours.counts[1, 0] == theirs.bw
    z_bb = (theirs.bb - np.mean(theirs.sim_bb)) / np.std(theirs.sim_bb.astype(float))
    z_bw = (theirs.bw - np.mean(theirs.sim_bw)) / np.std(theirs.sim_bw.astype(float))
    # Each z rests on a permutation std with ~2.2% relative sampling error (999 permutations): 10% apart at most.
    assert ours.z[0, 0] > 3 and ours.z[0, 0] == pytest.approx(z_bb, rel=0.1, abs=0.35)
    assert ours.z[0, 1] < -3 and ours.z[0, 1] == pytest.approx(z_bw, rel=0.1, abs=0.35)
