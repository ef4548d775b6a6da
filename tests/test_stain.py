"""Stain normalisation: identity on the reference, stain transfer, white tiles, save/load, real tiles."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from nucleiseg.io import read_image
from nucleiseg.stain import (
    METHODS,
    ReinhardNormalizer,
    StainError,
    StainNormalizer,
    StainWarning,
    fit_normalizer,
    load_normalizer,
    tissue_fraction,
)

# OD vectors (columns H, E): torchstain's reference H&E, and a strongly shifted one (bluer H, redder E).
HE_REF = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
HE_SHIFTED = np.array([[0.45, 0.25], [0.60, 0.92], [0.66, 0.30]])


def _unit(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=0, keepdims=True)


def synthetic_he(stains: np.ndarray, size: int = 192, seed: int = 0) -> np.ndarray:
    """An H&E-like tile by Beer-Lambert: round haematoxylin nuclei on an eosin stroma, some glass."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    h = np.zeros((size, size))
    for _ in range(40):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(4, 9)
        h += rng.uniform(0.8, 1.6) * ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2)
    e = 0.7 + 0.8 * (np.sin(xx / 13.0) * np.cos(yy / 17.0) + 1) / 2 + rng.normal(0, 0.05, (size, size))
    e[h > 0] *= 0.3  # nuclei are mostly haematoxylin
    e[:, : size // 8] = 0.0  # a strip of bare glass
    h[:, : size // 8] = 0.0
    conc = np.stack([h.ravel(), np.clip(e, 0, None).ravel()])
    od = _unit(stains) @ conc
    rgb = 255.0 * np.exp(-od) + rng.normal(0, 1.0, od.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).T.reshape(size, size, 3)


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(cos, -1, 1))))


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return synthetic_he(HE_REF, seed=0)


@pytest.fixture(scope="module")
def perturbed() -> np.ndarray:
    # Same tissue (same seed, same concentrations), different stain vectors.
    return synthetic_he(HE_SHIFTED, seed=0)


@pytest.mark.parametrize("method", METHODS)
def test_normalising_the_reference_is_near_identity(reference: np.ndarray, method: str) -> None:
    out = fit_normalizer(reference, method).transform(reference)
    assert out.dtype == np.uint8 and out.shape == reference.shape
    err = np.abs(out.astype(int) - reference.astype(int))
    # Reinhard is exact up to rounding; Macenko loses the OD component outside the H-E plane.
    assert err.mean() < {"none": 1e-9, "reinhard": 0.5, "macenko": 5.0}[method]


def test_macenko_recovers_the_reference_stains(reference: np.ndarray, perturbed: np.ndarray) -> None:
    normalizer = fit_normalizer(reference, "macenko")
    # The fitted stain vectors are those used to make the reference (H first).
    for k in range(2):
        assert _angle_deg(normalizer.stain_matrix[:, k], HE_REF[:, k]) < 5
    out = normalizer.transform(perturbed)
    before = np.abs(perturbed.astype(int) - reference).mean()
    after = np.abs(out.astype(int) - reference).mean()
    assert after < before / 4, (before, after)
    # The normalised tile's own stain vectors moved to the reference ones.
    out_stains = fit_normalizer(out, "macenko").stain_matrix
    shifted_stains = fit_normalizer(perturbed, "macenko").stain_matrix
    for k in range(2):
        assert _angle_deg(out_stains[:, k], normalizer.stain_matrix[:, k]) < 3
        assert _angle_deg(shifted_stains[:, k], normalizer.stain_matrix[:, k]) > 10


def test_reinhard_matches_the_reference_lab_statistics(reference: np.ndarray, perturbed: np.ndarray) -> None:
    normalizer = fit_normalizer(reference, "reinhard")
    assert isinstance(normalizer, ReinhardNormalizer)
    out = normalizer.transform(perturbed)
    stats = fit_normalizer(out, "reinhard")
    shifted = fit_normalizer(perturbed, "reinhard")
    # Matched up to the colours that fall outside the RGB gamut and are clipped.
    for attr in ("mean", "std"):
        gap_before = np.abs(getattr(shifted, attr) - getattr(normalizer, attr)).sum()
        gap_after = np.abs(getattr(stats, attr) - getattr(normalizer, attr)).sum()
        assert gap_after < 0.4 * gap_before, (attr, gap_before, gap_after)


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
@pytest.mark.parametrize("value", [255, 235])
def test_white_tile_is_returned_unchanged_with_a_warning(reference: np.ndarray, method: str, value: int) -> None:
    normalizer = fit_normalizer(reference, method)
    rng = np.random.default_rng(1)
    white = np.clip(value + rng.normal(0, 2, (64, 80, 3)), 0, 255).astype(np.uint8)
    white[:3, :3] = (120, 40, 140)  # a speck of tissue, far below 1%
    with pytest.warns(StainWarning, match="tissue"):
        out = normalizer.transform(white)
    assert out.dtype == np.uint8 and np.array_equal(out, white)


def test_nearly_white_tile_with_some_tissue_stays_finite(reference: np.ndarray) -> None:
    tile = np.full((100, 100, 3), 242, np.uint8)
    tile[40:52, 40:52] = reference[40:52, 100:112]  # ~1.4% of the pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StainWarning)
        out = fit_normalizer(reference, "macenko").transform(tile)
    assert out.dtype == np.uint8 and out.shape == tile.shape


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_fitting_on_a_white_reference_is_a_clear_error(method: str) -> None:
    white = np.full((50, 50, 3), 250, np.uint8)
    assert tissue_fraction(white) == 0.0
    with pytest.raises(StainError, match=f"{method}.*tissue"):
        fit_normalizer(white, method)


def test_unknown_method_and_bad_input() -> None:
    with pytest.raises(StainError, match="vahadane"):
        fit_normalizer(np.zeros((8, 8, 3), np.uint8), "vahadane")
    with pytest.raises(ValueError, match="RGB uint8"):
        StainNormalizer().transform(np.zeros((8, 8), np.uint8))


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_is_identical(tmp_path, reference, perturbed, method: str) -> None:
    normalizer = fit_normalizer(reference, method)
    path = tmp_path / "stain.json"
    normalizer.save(path)
    assert path.stat().st_size < 2000
    loaded = load_normalizer(path)
    assert type(loaded) is type(normalizer)
    assert loaded.to_dict() == normalizer.to_dict()
    assert np.array_equal(loaded.transform(perturbed), normalizer.transform(perturbed))


def test_load_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(StainError, match=r"missing\.json"):
        load_normalizer(missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(StainError, match=r"broken\.json"):
        load_normalizer(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"method": "macenko", "stain_matrix": [[1, 2]], "max_concentration": [1, 1]}))
    with pytest.raises(StainError, match=r"wrong\.json.*stain_matrix"):
        load_normalizer(wrong)


def test_real_consep_tiles(consep_dir) -> None:
    reference = read_image(consep_dir / "train_1.png")
    tile = read_image(consep_dir / "train_2.png")
    for method in ("reinhard", "macenko"):
        normalizer = fit_normalizer(reference, method)
        out = normalizer.transform(tile)
        assert out.dtype == np.uint8 and out.shape == tile.shape
        assert np.all(np.isfinite(out.astype(float)))
        assert not np.array_equal(out, tile)
    stains = fit_normalizer(reference, "macenko").stain_matrix
    assert np.all(stains > 0) and stains[0, 0] > stains[0, 1]  # H absorbs more red than E


# ----------------------------------------------------------------------------------------------------
# A large image, measured in blocks and normalised strip by strip (inference)


def test_streamed_percentiles_are_numpys_exactly() -> None:
    from nucleiseg.stain import streamed_percentiles

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(size=(2, 50_001)), np.full((2, 999), 0.25)], axis=1)  # ties too

    def blocks():
        return (values[:, i : i + 4093] for i in range(0, values.shape[1], 4093))

    q = [0, 1, 50, 99, 100]
    got = streamed_percentiles(blocks, q, [-8, -8], [8, 8])
    np.testing.assert_array_equal(got, np.percentile(values, q, axis=1))


def _in_strips(normalizer, image: np.ndarray, rows: int = 96) -> np.ndarray:
    return np.concatenate([normalizer.transform(image[y : y + rows]) for y in range(0, image.shape[0], rows)])


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_image_normalizer_in_strips_equals_the_whole_image_method(reference, perturbed, method: str) -> None:
    """The stated tolerance: within one intensity level of transform() on the whole image, in under 0.1% of
    the pixels (float32 instead of float64; the statistics are the same)."""
    from nucleiseg.stain import image_normalizer

    normalizer = fit_normalizer(reference, method)
    image = np.concatenate([perturbed, synthetic_he(HE_SHIFTED, seed=3)], axis=1)  # 192 x 384
    streamed = image_normalizer(normalizer, image, block_pixels=5_000)  # many blocks
    difference = np.abs(_in_strips(streamed, image).astype(int) - normalizer.transform(image).astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_image_normalizer_leaves_a_blank_image_as_transform_does(reference) -> None:
    from nucleiseg.stain import image_normalizer

    with pytest.warns(StainWarning, match="too little|tissue"):
        assert image_normalizer(fit_normalizer(reference, "macenko"), np.full((64, 64, 3), 250, np.uint8)) is None
    assert image_normalizer(fit_normalizer(reference, "none"), reference) is None


def test_image_normalizer_memory_is_bounded_by_its_blocks(reference, perturbed) -> None:
    """numpy allocations (tracemalloc) while measuring and normalising a 2.4-megapixel image strip by strip stay
    within a few blocks' worth, while the whole-image transform holds float copies of every pixel."""
    import tracemalloc

    from nucleiseg.stain import image_normalizer

    normalizer = fit_normalizer(reference, "macenko")
    image = np.tile(perturbed, (8, 8, 1))  # 1536 x 1536
    tracemalloc.start()
    try:
        normalizer.transform(image)
        whole = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        streamed = image_normalizer(normalizer, image, block_pixels=1 << 18)
        for y in range(0, image.shape[0], 224):  # the strips of tiles inference cuts
            streamed.transform(image[y : y + 224])
        strips = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    pixels, strip = image.shape[0] * image.shape[1], 224 * image.shape[1]
    assert whole > 80 * pixels  # float64 OD and concentrations of every pixel (13 GB for 12000 x 12000)
    # Whatever the image's height: a strip's float32 temporaries (about 47 bytes per pixel of the strip), or one
    # block's float64 statistics and the histograms (about 26 MB for blocks of 2^18 pixels).
    assert strips < max(64 * strip, 2**25)


def test_real_tile_normalised_in_strips(consep_dir) -> None:
    from nucleiseg.stain import image_normalizer

    normalizer = fit_normalizer(read_image(consep_dir / "train_1.png"), "macenko")
    image = read_image(consep_dir / "train_7.png")
    streamed = image_normalizer(normalizer, image, block_pixels=50_000)
    difference = np.abs(_in_strips(streamed, image, 224).astype(int) - normalizer.transform(image).astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
