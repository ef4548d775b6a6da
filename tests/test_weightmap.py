"""Weight maps (eq. 2 of Qu et al.) against a brute force of the definition, edge cases, and the CLI."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from nucleiseg import weightmap
from nucleiseg.cli import app
from nucleiseg.labels import read_label, write_label
from nucleiseg.weightmap import (
    TERM_CUTOFF,
    _code_size,
    boundary_pixels,
    cutoff_distance,
    weight_map,
)

PARAMS = [(10.0, 5.0), (5.0, 3.0), (20.0, 8.0), (1.0, 2.0)]


# ------------------------------------------------------------------------------------------------------------
# The brute force: every pixel against every boundary pixel, minimum per nucleus, the two smallest.
# ------------------------------------------------------------------------------------------------------------


def brute_force(label: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """(weight map without cut-off, d1 + d2) straight from the definition; float64."""
    lab = np.asarray(label, dtype=np.int64)
    # Edge padding repeats the edge pixel, so the outside of the image never makes a boundary.
    pad = np.pad(lab, 1, mode="edge")
    centre = pad[1:-1, 1:-1]
    boundary = (centre > 0) & (
        (pad[:-2, 1:-1] != centre) | (pad[2:, 1:-1] != centre) | (pad[1:-1, :-2] != centre) | (pad[1:-1, 2:] != centre)
    )
    ids = np.unique(lab[boundary])
    if ids.size < 2:
        return np.ones(lab.shape), np.full(lab.shape, np.inf)
    pixels = np.indices(lab.shape).reshape(2, -1).T.astype(np.float64)
    per_nucleus = np.empty((ids.size, pixels.shape[0]))
    for k, nucleus in enumerate(ids):
        points = np.argwhere(boundary & (lab == nucleus)).astype(np.float64)
        diff = pixels[:, None, :] - points[None, :, :]
        per_nucleus[k] = np.sqrt((diff**2).sum(axis=2)).min(axis=1)
    per_nucleus.sort(axis=0)
    total = (per_nucleus[0] + per_nucleus[1]).reshape(lab.shape)
    return 1.0 + w0 * np.exp(-(total**2) / (2.0 * sigma**2)), total


def assert_matches_brute_force(label: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    fast = weight_map(label, w0=w0, sigma=sigma)
    slow, total = brute_force(label, w0, sigma)
    assert fast.dtype == np.float32 and fast.shape == label.shape
    error = np.abs(fast.astype(np.float64) - slow)
    assert error.max() <= 1e-3  # the contract
    # Tighter: only the documented cut-off (terms below 1e-4 set to 0) plus float32 rounding ...
    assert error.max() <= TERM_CUTOFF + 1e-5
    # ... and exact (float32 rounding only) wherever the term is above the cut-off.
    kept = total < cutoff_distance(w0, sigma)
    assert np.all(error[kept] <= 1e-5)
    return fast


# ------------------------------------------------------------------------------------------------------------
# Random labels with touching nuclei
# ------------------------------------------------------------------------------------------------------------


def random_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct, non-consecutive ids up to 65535 (what a 16-bit label file holds)."""
    return rng.choice(np.arange(1, 65536), size=n, replace=False)


def voronoi_label(rng: np.random.Generator, shape: tuple[int, int], n_cells: int, background: float) -> np.ndarray:
    """Voronoi cells of random seeds (all touching), a share of them turned into background."""
    seeds = rng.uniform(0, 1, size=(n_cells, 2)) * np.array(shape)
    pixels = np.indices(shape).reshape(2, -1).T
    owner = ((pixels[:, None, :] - seeds[None]) ** 2).sum(axis=2).argmin(axis=1).reshape(shape)
    ids = random_ids(rng, n_cells)
    ids[rng.uniform(size=n_cells) < background] = 0
    return ids[owner]


def ellipse_label(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """Random ellipses drawn one over the other, so that many touch or cut into each other."""
    label = np.zeros(shape, dtype=np.int32)
    for nucleus in random_ids(rng, n):
        centre = (int(rng.integers(-3, shape[1] + 3)), int(rng.integers(-3, shape[0] + 3)))
        axes = (int(rng.integers(1, 9)), int(rng.integers(1, 7)))
        cv2.ellipse(label, centre, axes, float(rng.uniform(0, 180)), 0, 360, int(nucleus), thickness=-1)
    return label


def blob_label(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """Irregular blobs: thresholded smoothed noise, split into nuclei by Voronoi cells of random seeds."""
    noise = cv2.GaussianBlur(rng.normal(size=shape).astype(np.float32), (0, 0), 2.0)
    cells = voronoi_label(rng, shape, n, background=0.0)
    return np.where(noise > 0.0, cells, 0)


@pytest.mark.parametrize("w0, sigma", PARAMS)
@pytest.mark.parametrize("seed", range(3))
def test_voronoi_cells_match_brute_force(seed: int, w0: float, sigma: float) -> None:
    rng = np.random.default_rng(seed)
    label = voronoi_label(rng, (int(rng.integers(40, 65)), int(rng.integers(40, 65))), 30, background=0.3)
    weights = assert_matches_brute_force(label, w0, sigma)
    assert weights.max() > 1.0 + 0.3 * w0  # touching nuclei: the term is high along their common boundary


@pytest.mark.parametrize("w0, sigma", PARAMS)
@pytest.mark.parametrize("seed", range(3))
def test_ellipses_match_brute_force(seed: int, w0: float, sigma: float) -> None:
    rng = np.random.default_rng(100 + seed)
    label = ellipse_label(rng, (int(rng.integers(40, 65)), int(rng.integers(40, 65))), 40)
    assert_matches_brute_force(label, w0, sigma)


@pytest.mark.parametrize("seed", range(3))
def test_blobs_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    assert_matches_brute_force(blob_label(rng, (64, 56), 25))


@pytest.mark.parametrize(
    "n_cells, sigma, code", [(3, 5.0, (3, 1)), (4, 5.0, (4, 1)), (6, 5.0, (4, 2)), (60, 10.0, (8, 3))]
)
def test_codes_of_every_weight_are_exact(monkeypatch, n_cells: int, sigma: float, code: tuple[int, int]) -> None:
    """Few nuclei give codes of weight 1 (one set per colour); dense ones and a wide sigma heavier codes."""
    used: list[tuple[int, int]] = []

    def spy(n_colours: int) -> tuple[int, int]:
        used.append(_code_size(n_colours))
        return used[-1]

    monkeypatch.setattr(weightmap, "_code_size", spy)
    label = voronoi_label(np.random.default_rng(7), (64, 64), n_cells, background=0.0)
    assert_matches_brute_force(label, 10.0, sigma)
    assert used == [code]  # (sets, weight): the path this case is meant to cover


def test_real_tile_crops_match_brute_force(consep_dir) -> None:
    label = read_label(consep_dir / "train_18_label.png")  # the densest tile: 2,283 nuclei
    for top, left in [(300, 300), (640, 128)]:
        crop = label[top : top + 72, left : left + 72]
        assert np.unique(crop).size > 10
        assert_matches_brute_force(crop)


def test_real_tile_is_in_range(consep_dir) -> None:
    label = read_label(consep_dir / "train_18_label.png")
    weights = weight_map(label)
    assert weights.shape == label.shape and weights.dtype == np.float32
    assert weights.min() >= 1.0 and weights.max() <= 11.0
    # Touching nuclei share boundaries: there d1 = 0 and d2 = 1, so w = 1 + 10 exp(-1/50).
    assert weights.max() == pytest.approx(1 + 10 * math.exp(-1 / 50), abs=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------------------------


def test_no_nucleus_and_one_nucleus_give_ones() -> None:
    assert np.array_equal(weight_map(np.zeros((30, 40), np.uint16)), np.ones((30, 40), np.float32))
    one = np.zeros((30, 40), np.int32)
    one[5:12, 8:20] = 7
    assert np.array_equal(weight_map(one), np.ones((30, 40), np.float32))
    one[20:25, 30:40] = 7  # two pieces, one id: still one nucleus
    assert np.array_equal(weight_map(one), np.ones((30, 40), np.float32))


def test_nuclei_farther_apart_than_the_cut_off_give_ones() -> None:
    label = np.zeros((60, 90), np.int32)
    label[10:20, 5:15] = 1
    label[10:20, 45:55] = 2  # 30 px apart: d1 + d2 >= 30 > R = 24 everywhere
    weights = assert_matches_brute_force(label)
    assert np.array_equal(weights, np.ones(label.shape, np.float32))
    label[10:20, 30:40] = 3  # 15 px from each: now close
    assert assert_matches_brute_force(label).max() > 1.0


def test_nucleus_covering_the_image_has_no_boundary() -> None:
    full = np.full((20, 20), 3, np.int32)
    assert not boundary_pixels(full).any()
    assert np.array_equal(weight_map(full), np.ones((20, 20), np.float32))


def test_two_nuclei_filling_the_image() -> None:
    label = np.full((40, 48), 2, np.int32)
    label[:, 20:] = 5
    label[10:30, 5:12] = 9  # a third one inside the first
    assert_matches_brute_force(label)


def test_nuclei_touching_the_image_edges() -> None:
    label = np.zeros((44, 50), np.int32)
    label[:6, :9] = 1  # corner
    label[:5, 9:20] = 2  # touches 1 and the top edge
    label[20:44, 45:50] = 3  # right and bottom edges
    label[38:44, 30:45] = 4  # touches 3 and the bottom edge
    label[15:30, 0:4] = 5  # left edge
    assert_matches_brute_force(label)
    # The image edge is not a boundary: nucleus 1's corner pixel is not one, its pixel next to 2 is.
    assert not boundary_pixels(label)[0, 0] and boundary_pixels(label)[0, 8]


def test_one_pixel_nuclei() -> None:
    label = np.zeros((41, 43), np.int32)
    label[10, 10], label[10, 11] = 1, 2  # two adjacent single pixels
    label[20, 30] = 3  # isolated
    label[0, 0], label[40, 42] = 4, 5  # in corners
    label[25:28, 5:8] = 6
    label[28, 6] = 7  # a single pixel under a square
    assert_matches_brute_force(label)
    assert_matches_brute_force(label, 20.0, 8.0)


def test_thin_and_tiny_images() -> None:
    rng = np.random.default_rng(3)
    row = rng.integers(0, 4, size=(1, 60))
    assert_matches_brute_force(row)
    assert_matches_brute_force(row.T.copy())
    assert weight_map(np.zeros((0, 5), np.int32)).shape == (0, 5)


def test_w0_and_sigma_variations() -> None:
    label = voronoi_label(np.random.default_rng(11), (48, 48), 25, background=0.2)
    assert np.array_equal(weight_map(label, w0=0.0), np.ones(label.shape, np.float32))
    assert np.array_equal(weight_map(label, w0=5e-5), np.ones(label.shape, np.float32))  # below the cut-off
    low = assert_matches_brute_force(label, w0=-0.5, sigma=4.0)  # a negative w0 down-weights
    assert low.max() <= 1.0 and low.min() >= 0.5
    wide = assert_matches_brute_force(label, w0=10.0, sigma=30.0)  # cut-off radius beyond the image
    assert wide.min() > 1.0
    with pytest.raises(ValueError, match="sigma"):
        weight_map(label, sigma=0.0)
    with pytest.raises(ValueError, match="w0"):
        weight_map(label, w0=float("nan"))


def test_input_types_and_layouts() -> None:
    label = voronoi_label(np.random.default_rng(5), (50, 45), 20, background=0.3)
    reference = weight_map(label.astype(np.int32))
    before = label.copy()
    # float32 exp may differ by an ulp with the buffer alignment, hence atol rather than equality.
    for variant in (label.astype(np.uint16), label.astype(np.int64), np.asfortranarray(label)):
        np.testing.assert_allclose(weight_map(variant), reference, rtol=0, atol=1e-5)
    assert np.array_equal(label, before)  # the input is not modified
    flipped = label[::-1, ::2]  # a non-contiguous view
    np.testing.assert_allclose(weight_map(flipped), weight_map(np.ascontiguousarray(flipped)), rtol=0, atol=1e-5)
    # Ids above the lookup-table range take the np.unique path.
    big = label.astype(np.int64) * 100_000
    np.testing.assert_allclose(weight_map(big), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((4, 4, 3), np.int32), "2-D"),
        (np.zeros((4, 4), np.float32), "integer"),
        (np.full((4, 4), -1, np.int32), "negative"),
    ],
)
def test_bad_labels_are_refused(bad: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        weight_map(bad)
    with pytest.raises(ValueError, match=match):
        boundary_pixels(bad)


# ------------------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------------------


def test_boundary_pixels_by_hand() -> None:
    label = np.zeros((6, 7), np.int32)
    label[1:4, 1:4] = 1  # a 3x3 square: its 8 outer pixels
    label[1:4, 4:6] = 2  # touching it on the right, and the right edge minus one column
    label[5, :] = 3  # the bottom row: boundary only where row 4 (background) is above
    expected = np.zeros((6, 7), bool)
    expected[1:4, 1:4] = True
    expected[2, 2] = False
    expected[1:4, 4:6] = True
    expected[5, :] = True
    assert np.array_equal(boundary_pixels(label), expected)
    assert boundary_pixels(label).dtype == bool


def test_cutoff_distance() -> None:
    radius = cutoff_distance(10.0, 5.0)
    assert 10.0 * math.exp(-(radius**2) / 50.0) == pytest.approx(TERM_CUTOFF)
    assert radius == pytest.approx(23.99, abs=0.01)
    assert cutoff_distance(0.0, 5.0) == 0.0


def test_code_size_is_the_fewest_sets() -> None:
    for colours in range(2, 200):
        n_sets, weight = _code_size(colours)
        assert math.comb(n_sets, weight) >= colours  # enough distinct codes
        assert all(math.comb(n_sets - 1, w) < colours for w in range(1, n_sets))  # no fewer sets would do
        assert all(math.comb(n_sets, w) < colours for w in range(1, weight))  # and the lightest code


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------


def test_cli_writes_the_map(tmp_path) -> None:
    label = voronoi_label(np.random.default_rng(9), (48, 52), 20, background=0.3)
    write_label(tmp_path / "tile_label.png", label)
    out = tmp_path / "maps" / "tile.npy"
    result = CliRunner().invoke(
        app, ["weightmap", str(tmp_path / "tile_label.png"), str(out), "--w0", "5", "--sigma", "3"]
    )
    assert result.exit_code == 0, result.output
    saved = np.load(out)
    assert saved.dtype == np.float32
    assert np.array_equal(saved, weight_map(label, w0=5.0, sigma=3.0))
    assert not [p for p in out.parent.iterdir() if p.name != "tile.npy"]  # no temporary file left


def test_cli_bad_input_keeps_the_previous_output(tmp_path) -> None:
    out = tmp_path / "tile.npy"
    np.save(out, np.full((3, 3), 7.0, np.float32))
    corrupt = tmp_path / "broken_label.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    runner = CliRunner()
    result = runner.invoke(app, ["weightmap", str(corrupt), str(out)])
    assert result.exit_code != 0
    assert "broken_label.png" in result.output
    rgb = tmp_path / "rgb_label.png"
    cv2.imwrite(str(rgb), np.zeros((8, 8, 3), np.uint8))
    result = runner.invoke(app, ["weightmap", str(rgb), str(out)])
    assert result.exit_code != 0 and "rgb_label.png" in result.output
    label = tmp_path / "ok_label.png"
    write_label(label, np.zeros((8, 8), np.int32))
    result = runner.invoke(app, ["weightmap", str(label), str(out), "--sigma", "0"])
    assert result.exit_code == 2 and "--sigma" in result.output
    assert np.array_equal(np.load(out), np.full((3, 3), 7.0, np.float32))  # untouched
