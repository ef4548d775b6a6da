"""The synthetic H&E generator: determinism, label encoding, morphology, colour, the CLI, and real data."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import label as connected_components
from skimage.measure import regionprops
from typer.testing import CliRunner

from nucleiseg import synth
from nucleiseg.cli import app
from nucleiseg.io import read_image, read_raw
from nucleiseg.labels import read_label, validate_label

SIZE = 256
SEEDS = range(8)
TUMOR, LYMPHOCYTE, STROMA = 0, 1, 2


@pytest.fixture(scope="module")
def tiles() -> list[tuple[np.ndarray, np.ndarray]]:
    return [synth.synth_tile(seed, SIZE) for seed in SEEDS]


@pytest.fixture(scope="module")
def nuclei(tiles) -> list[tuple[int, object]]:
    """(tile index, regionprops) of every nucleus of every tile."""
    return [(t, region) for t, (_, label) in enumerate(tiles) for region in regionprops(label)]


def _by_class(nuclei, c: int) -> list:
    return [region for _, region in nuclei if region.label % 3 == c]


def _touching_ids(label: np.ndarray) -> set[int]:
    """Ids sharing a 4-connected border with a different id."""
    touching: set[int] = set()
    for a, b in ((label[:, :-1], label[:, 1:]), (label[:-1], label[1:])):
        contact = (a > 0) & (b > 0) & (a != b)
        touching |= set(a[contact].tolist()) | set(b[contact].tolist())
    return touching


# ----------------------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_tiles_and_different_seeds_differ():
    image_a, label_a = synth.synth_tile(7, 128)
    image_b, label_b = synth.synth_tile(np.random.default_rng(7), 128)
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(label_a, label_b)
    image_c, label_c = synth.synth_tile(8, 128)
    assert np.mean(image_a != image_c) > 0.5
    assert not np.array_equal(label_a, label_c)


def test_dataset_is_deterministic_and_each_tile_depends_only_on_seed_and_index(tmp_path):
    short = synth.write_dataset(tmp_path / "two", 2, 96, seed=3)
    long = synth.write_dataset(tmp_path / "three", 3, 96, seed=3)
    other = synth.write_dataset(tmp_path / "other", 2, 96, seed=4)
    assert [p.name for p in short] == ["synth_000.png", "synth_001.png"]
    for a, b in zip(short, long[:2], strict=True):
        assert a.read_bytes() == b.read_bytes()
        label_name = f"{a.stem}_label.png"
        assert (a.parent / label_name).read_bytes() == (b.parent / label_name).read_bytes()
    assert short[0].read_bytes() != other[0].read_bytes()
    assert long[1].read_bytes() != long[2].read_bytes()


# ----------------------------------------------------------------------------------------------------------
# Label encoding
# ----------------------------------------------------------------------------------------------------------


def test_labels_follow_the_paper_encoding(tiles):
    totals = np.zeros(3, int)
    for image, label in tiles:
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert label.shape == (SIZE, SIZE) and label.dtype == np.int32
        assert label.min() >= 0
        ids = np.unique(label[label > 0])
        for c in range(3):
            # Consecutive ids per class in the encoding: tumor 3, 6, 9...; lymphocytes 1, 4, ...; stroma 2, 5, ...
            of_class = ids[ids % 3 == c]
            first = 3 if c == TUMOR else c
            np.testing.assert_array_equal(of_class, first + 3 * np.arange(of_class.size))
            totals[c] += of_class.size
        assert validate_label(label, image_shape=image.shape) == []  # no split ids, not empty
    assert np.all(totals > 20), totals


def test_every_nucleus_is_one_4_connected_piece_of_sensible_size(tiles):
    for _, label in tiles:
        pieces = connected_components(label, background=0, connectivity=1)
        fg = label > 0
        pairs = np.unique(np.stack([label[fg], pieces[fg]]), axis=1)
        ids, n_pieces = np.unique(pairs[0], return_counts=True)
        assert np.all(n_pieces == 1), ids[n_pieces > 1]
        assert np.bincount(label.ravel())[ids].min() >= 12


# ----------------------------------------------------------------------------------------------------------
# Morphology
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("c", "target"), [(TUMOR, 350), (LYMPHOCYTE, 180), (STROMA, 190)])
def test_median_area_per_class_is_near_the_target(nuclei, c, target):
    areas = [region.area for region in _by_class(nuclei, c)]
    assert len(areas) > 20
    assert 0.8 * target <= np.median(areas) <= 1.2 * target


def test_shapes_per_class(nuclei):
    def elongation(region) -> float:
        return region.axis_major_length / max(region.axis_minor_length, 1e-6)

    tumor, lymph, stroma = (_by_class(nuclei, c) for c in range(3))
    # Stroma spindles, round lymphocytes, oval tumor nuclei.
    assert np.median([elongation(r) for r in stroma]) >= 2.5
    assert np.median([elongation(r) for r in lymph]) <= 1.3
    assert 1.2 <= np.median([elongation(r) for r in tumor]) <= 2.2
    # Tumor outlines are irregular: less convex than lymphocytes.
    assert np.median([r.solidity for r in tumor]) < np.median([r.solidity for r in lymph])
    # Lymphocyte sizes are tight, tumor sizes spread (real: 10-90 percentile ratio about 3 and 7).
    spread = [np.percentile(a, 90) / np.percentile(a, 10) for a in ([r.area for r in tumor], [r.area for r in lymph])]
    assert spread[0] > spread[1]


def test_at_least_ten_percent_of_nuclei_touch_a_neighbour(tiles):
    touching = sum(len(_touching_ids(label)) for _, label in tiles)
    total = sum(np.unique(label).size - 1 for _, label in tiles)
    assert touching / total >= 0.10


def _fibre_direction(image: np.ndarray, label: np.ndarray, sigma: float = 8.0) -> np.ndarray:
    """Local fibre direction (radians, x right / y down) from the image's structure tensor, nuclei masked out."""
    grey = image.astype(float).mean(axis=-1)
    gy, gx = np.gradient(ndimage.gaussian_filter(grey, 1.0))
    keep = ~ndimage.binary_dilation(label > 0, iterations=3)
    jxx, jyy, jxy = (ndimage.gaussian_filter(g * keep, sigma) for g in (gx * gx, gy * gy, gx * gy))
    return 0.5 * np.arctan2(2 * jxy, jxx - jyy) + np.pi / 2  # fibres run across the dominant gradient


def test_stroma_nuclei_align_with_the_eosin_fibres_seen_in_the_image(tiles):
    differences = []
    for image, label in tiles:
        fibre = _fibre_direction(image, label)
        for region in regionprops(label):
            if region.label % 3 != STROMA or region.area < 40:
                continue
            y, x = region.coords[:, 0].astype(float), region.coords[:, 1].astype(float)
            axis = 0.5 * np.arctan2(2 * np.mean((x - x.mean()) * (y - y.mean())), x.var() - y.var())
            cy, cx = (int(v) for v in region.centroid)
            differences.append(abs((axis - fibre[cy, cx] + np.pi / 2) % np.pi - np.pi / 2))
    assert len(differences) > 30
    # Random orientations would give a median of 45 degrees.
    assert np.degrees(np.median(differences)) < 20


# ----------------------------------------------------------------------------------------------------------
# Colour
# ----------------------------------------------------------------------------------------------------------


def test_haematoxylin_nuclei_are_darker_and_bluer_than_the_eosin_background(tiles):
    for image, label in tiles:
        pixels = image.reshape(-1, 3).astype(float)
        nucleus = (label > 0).ravel()
        if nucleus.sum() < 200:
            continue
        nuc, bg = pixels[nucleus].mean(0), pixels[~nucleus].mean(0)
        assert nuc.mean() < bg.mean() - 30
        assert nuc[2] - nuc[0] > bg[2] - bg[0] + 10  # blue minus red
        assert bg[1] < min(bg[0], bg[2])  # eosin: pink, green absorbed most


def test_lymphocytes_are_darker_than_tumor_nuclei(tiles):
    lymph, tumor = [], []
    for image, label in tiles:
        grey = image.astype(float).mean(axis=-1)
        if (label % 3 == LYMPHOCYTE).any() and ((label > 0) & (label % 3 == TUMOR)).any():
            lymph.append(grey[label % 3 == LYMPHOCYTE].mean())
            tumor.append(grey[(label > 0) & (label % 3 == TUMOR)].mean())
    assert len(lymph) >= 3
    assert all(a < b - 10 for a, b in zip(lymph, tumor, strict=True))


def test_tiles_have_white_space_and_vary_in_stain(tiles):
    for image, _ in tiles:
        assert np.mean(image.min(axis=-1) > 215) > 0.01  # lumens and loose stroma
    background = np.array([image[label == 0].mean(0) for image, label in tiles])
    assert background.std(axis=0).max() > 2  # per-tile stain variation


# ----------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------


def test_class_fractions_and_density_are_honoured():
    def class_counts(**options) -> np.ndarray:
        counts = np.zeros(3, int)
        for seed in range(3):
            ids = np.unique(synth.synth_tile(seed, 192, class_dirichlet=None, **options)[1])
            counts += np.bincount(ids[ids > 0] % 3, minlength=3)
        return counts

    only_tumor = class_counts(class_fractions=(1, 0, 0))
    assert only_tumor[0] > 0 and only_tumor[1:].sum() == 0
    mostly_lymph = class_counts(class_fractions=(0.1, 0.8, 0.1))
    assert mostly_lymph[1] > 0.6 * mostly_lymph.sum()
    sparse, dense = class_counts(density=200).sum(), class_counts(density=1200).sum()
    area = 3 * 192 * 192 / 1e6
    assert 0.5 * 200 * area < sparse < 1.5 * 200 * area
    assert dense > 3 * sparse
    image, label = synth.synth_tile(0, 96, density=0)
    assert not label.any() and image.std() > 5  # tissue without nuclei


def test_bad_options_raise_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="class_fractions"):
        synth.synth_tile(0, 64, class_fractions=(-1, 1, 1))
    with pytest.raises(ValueError, match="at least 16"):
        synth.synth_tile(0, 8)
    with pytest.raises(ValueError, match="white_space"):
        synth.write_dataset(tmp_path / "never", 2, 64, white_space=1.5)
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def test_cli_writes_the_dataset(tmp_path):
    out = tmp_path / "synth"
    result = CliRunner().invoke(app, ["synth", str(out), "--n-images", "2", "--size", "96", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert "wrote 2 tiles" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "synth_000.png",
        "synth_000_label.png",
        "synth_001.png",
        "synth_001_label.png",
    ]
    assert read_raw(out / "synth_000_label.png").dtype == np.uint16
    assert read_image(out / "synth_000.png").shape == (96, 96, 3)
    assert validate_label(read_label(out / "synth_000_label.png"), image_shape=(96, 96)) == []
    # The same tiles as the library writes.
    reference = synth.write_dataset(tmp_path / "reference", 2, 96, seed=5)
    for path in reference:
        for name in (path.name, f"{path.stem}_label.png"):
            assert (out / name).read_bytes() == (path.parent / name).read_bytes()


def test_cli_defaults_are_the_library_defaults():
    # The CLI spells its defaults out so that ``nucleiseg --help`` does not import the generator.
    from nucleiseg.cli.synth import synth_command

    parameters = inspect.signature(synth_command).parameters
    assert parameters["class_fractions"].default == synth.DEFAULT_CLASS_FRACTIONS
    assert parameters["density"].default == synth.DEFAULT_DENSITY


def test_cli_reports_a_bad_option(tmp_path):
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--class-fractions", "0", "0", "0"])
    assert result.exit_code != 0
    assert "class_fractions" in result.output
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------------
# Against the real CoNSeP tiles
# ----------------------------------------------------------------------------------------------------------


def test_matches_real_consep_statistics(consep_dir, tiles):
    """Per-class median areas (all real tiles), nuclear and background colours (every third real tile) within a
    tolerance of the real CoNSeP data."""
    real_areas: list[list[int]] = [[], [], []]
    real_colour: list[list[np.ndarray]] = [[], [], [], []]  # tumor, lymphocyte, stroma, background
    for n, label_path in enumerate(sorted(consep_dir.glob("*_label.png"))):
        label = read_label(label_path)
        areas = np.bincount(label.ravel())
        ids = np.flatnonzero(areas)
        for c in range(3):
            real_areas[c] += areas[ids[(ids > 0) & (ids % 3 == c)]].tolist()
        if n % 3 or not label.any():
            continue
        image = read_image(label_path.with_name(label_path.name.replace("_label", "")))
        other = read_label(label_path.with_name(label_path.name.replace("_label", "_other")))
        for c in range(3):
            mask = (label > 0) & (label % 3 == c)
            if mask.any():
                real_colour[c].append(image[mask].mean(0))
        real_colour[3].append(image[(label == 0) & (other == 0)].mean(0))

    for c in range(3):
        synthetic = [np.bincount(label.ravel())[np.unique(label[(label > 0) & (label % 3 == c)])] for _, label in tiles]
        assert abs(np.median(np.concatenate(synthetic)) / np.median(real_areas[c]) - 1) < 0.25, c
    for c in range(4):
        masks = [(label > 0) & (label % 3 == c) if c < 3 else label == 0 for _, label in tiles]
        synthetic = np.mean([image[m].mean(0) for (image, _), m in zip(tiles, masks, strict=True) if m.any()], 0)
        real = np.mean(real_colour[c], 0)
        assert np.abs(synthetic - real).max() < 25, (c, synthetic, real)
