"""The per-nucleus table in real units: shape figures against per-nucleus regionprops, stain densities against
images made with known densities, class probability, chunk offsets, files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from skimage.color import rgb2hed
from skimage.measure import regionprops
from test_export import make_image, make_label

from nucleiseg.measure import (
    RUIFROK_HE,
    TABLE_COLUMNS,
    nuclei_centroids,
    nuclei_table,
    read_table,
    stain_matrix_of,
    write_table,
)
from nucleiseg.stain import IO, FixedSourceNormalizer, MacenkoNormalizer, ReinhardNormalizer


def beer_lambert(h: np.ndarray, e: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """RGB uint8 pixels whose optical density -log10((I + 1) / I0) is h * H + e * E (unit stain vectors)."""
    unit = matrix / np.linalg.norm(matrix, axis=0)
    od = h[..., None] * unit[:, 0] + e[..., None] * unit[:, 1]
    return np.clip(np.rint(IO * 10.0 ** (-od) - 1.0), 0, 255).astype(np.uint8)


def test_shape_figures_are_regionprops_in_micrometres():
    label, image = make_label(), make_image()
    mpp = 0.37
    table = nuclei_table(label, image, mpp=mpp, image_name="tile")
    assert tuple(table.columns) == TABLE_COLUMNS
    assert table["id"].tolist() == sorted(np.unique(label[label > 0]).tolist())
    assert (table["image"] == "tile").all() and (table["um_per_px"] == mpp).all()
    assert table["class_probability"].isna().all(), "no probabilities given"
    rows = table.set_index("id")
    for region in regionprops(label):  # in pixels, no spacing: an independent route to every figure
        row = rows.loc[region.label]
        ys, xs = np.nonzero(label == region.label)
        assert row["class"] == ("tumor", "lymphocyte", "stroma")[region.label % 3]
        assert row["area_um2"] == pytest.approx(len(ys) * mpp**2)
        assert row["centroid_x_px"] == pytest.approx(xs.mean() + 0.5)
        assert row["centroid_y_px"] == pytest.approx(ys.mean() + 0.5)
        assert row["centroid_x_um"] == pytest.approx((xs.mean() + 0.5) * mpp)
        assert row["centroid_y_um"] == pytest.approx((ys.mean() + 0.5) * mpp)
        assert row["perimeter_um"] == pytest.approx(region.perimeter * mpp)
        assert row["equivalent_diameter_um"] == pytest.approx(np.sqrt(4 * len(ys) / np.pi) * mpp)
        assert row["major_axis_um"] == pytest.approx(region.axis_major_length * mpp)
        assert row["minor_axis_um"] == pytest.approx(region.axis_minor_length * mpp, abs=1e-9)
        assert row["eccentricity"] == pytest.approx(region.eccentricity, abs=1e-9)
        assert row["solidity"] == pytest.approx(region.solidity)


def test_orientation_is_the_on_screen_angle_of_the_major_axis():
    yy, xx = np.mgrid[:80, :80]
    cases = {0.0: 3, 45.0: 6, 90.0: 9, -30.0: 12}  # angle -> id (all tumors)
    label = np.zeros((80, 80), np.int32)
    for k, (angle, nucleus_id) in enumerate(cases.items()):
        cy, cx = 20 + 40 * (k // 2), 20 + 40 * (k % 2)
        t = np.radians(angle)
        # On screen y points up, so a rise to the right is a *decreasing* row.
        u = (xx - cx) * np.cos(t) - (yy - cy) * np.sin(t)
        v = (xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        label[(u / 15) ** 2 + (v / 5) ** 2 <= 1] = nucleus_id
    table = nuclei_table(label, make_image((80, 80)), mpp=0.25).set_index("id")
    for angle, nucleus_id in cases.items():
        measured = table.loc[nucleus_id, "orientation_deg"]
        difference = (measured - angle + 90) % 180 - 90  # 90 and -90 are the same axis
        assert abs(difference) < 2.0, (angle, measured)
        assert -90 < measured <= 90


@pytest.mark.parametrize("fitted", [False, True])
def test_stain_densities_are_natural_optical_density_units(fitted):
    """Pixels made by Beer-Lambert with known H and E densities read back those densities, with the fitted
    Macenko matrix or with Ruifrok's; rgb2hed (the old, mislabelled figure) reads a sixth of it."""
    matrix = np.array([[0.60, 0.15], [0.70, 0.85], [0.38, 0.50]]) if fitted else RUIFROK_HE
    stain = MacenkoNormalizer(stain_matrix=matrix / np.linalg.norm(matrix, axis=0)) if fitted else None
    label = np.zeros((20, 40), np.int32)
    label[2:18, 2:18] = 3
    label[2:18, 22:38] = 1
    rng = np.random.default_rng(0)
    h = np.where(label == 3, 0.9, 0.35) + rng.normal(0, 0.05, label.shape)
    e = np.where(label == 3, 0.2, 0.6) + rng.normal(0, 0.05, label.shape)
    image = beer_lambert(h, e, matrix)
    table = nuclei_table(label, image, mpp=0.25, stain_matrix=stain_matrix_of(stain)).set_index("id")
    for nucleus_id in (3, 1):
        mask = label == nucleus_id
        # rounding to 8 bits moves OD by at most 0.5 / (I ln 10) per channel: < 0.01 here
        assert table.loc[nucleus_id, "hematoxylin_od_mean"] == pytest.approx(h[mask].mean(), abs=0.01)
        assert table.loc[nucleus_id, "eosin_od_mean"] == pytest.approx(e[mask].mean(), abs=0.01)
        assert table.loc[nucleus_id, "hematoxylin_od_std"] == pytest.approx(h[mask].std(), abs=0.01)
        assert table.loc[nucleus_id, "eosin_od_std"] == pytest.approx(e[mask].std(), abs=0.01)
    if not fitted:
        old = rgb2hed(image)[..., 0][label == 3].mean()
        assert old < 0.3 * table.loc[3, "hematoxylin_od_mean"]


def test_stain_matrix_of_takes_macenko_fits_only():
    macenko = MacenkoNormalizer()
    np.testing.assert_allclose(
        stain_matrix_of(macenko), macenko.stain_matrix / np.linalg.norm(macenko.stain_matrix, axis=0)
    )
    np.testing.assert_allclose(stain_matrix_of(macenko.to_dict()), stain_matrix_of(macenko))
    slide = FixedSourceNormalizer(reference=macenko, source=MacenkoNormalizer(stain_matrix=np.eye(3)[:, :2]))
    np.testing.assert_allclose(stain_matrix_of(slide), stain_matrix_of(macenko), err_msg="the model's, not the slide's")
    assert stain_matrix_of(ReinhardNormalizer()) is None and stain_matrix_of(None) is None
    assert stain_matrix_of({"method": "none"}) is None
    with pytest.raises(ValueError, match="3 x 2"):
        nuclei_table(make_label(), make_image(), mpp=0.25, stain_matrix=np.ones((2, 2)))


def test_class_probability_is_the_renormalised_softmax_of_the_nucleus_class():
    label = np.zeros((12, 24), np.int32)
    label[2:10, 2:10] = 3  # tumor: channel 1
    label[2:10, 14:22] = 4  # lymphocyte: channel 2
    probs = np.zeros((5, 12, 24), np.float32)
    probs[0] = 1.0  # background outside
    probs[:, 2:10, 2:10] = np.array([0.05, 0.6, 0.2, 0.1, 0.05])[:, None, None]
    probs[:, 2:10, 14:22] = np.array([0.0, 0.1, 0.5, 0.0, 0.4])[:, None, None]  # contour mass at the rim
    probs[:, 2, 14:22] = np.array([0.0, 0.3, 0.3, 0.0, 0.4])[:, None]  # one row of doubtful pixels
    image = make_image((12, 24))
    table = nuclei_table(label, image, mpp=0.25, probs=probs).set_index("id")
    assert table.loc[3, "class_probability"] == pytest.approx(0.6 / 0.9)
    assert table.loc[4, "class_probability"] == pytest.approx((7 * 0.5 / 0.6 + 1 * 0.5) / 8)
    three = nuclei_table(label, image, mpp=0.25, probs=probs[1:4].astype(np.float16)).set_index("id")
    np.testing.assert_allclose(three["class_probability"], table["class_probability"], rtol=1e-3)
    with pytest.raises(ValueError, match="probs"):
        nuclei_table(label, image, mpp=0.25, probs=probs[:, :5])


def test_offset_moves_only_the_centroids():
    label, image = make_label(), make_image()
    base = nuclei_table(label, image, mpp=0.5)
    moved = nuclei_table(label, image, mpp=0.5, offset=(1000, 2000))
    np.testing.assert_allclose(moved["centroid_y_px"], base["centroid_y_px"] + 1000)
    np.testing.assert_allclose(moved["centroid_x_px"], base["centroid_x_px"] + 2000)
    np.testing.assert_allclose(moved["centroid_x_um"], (base["centroid_x_px"] + 2000) * 0.5)
    other = [c for c in TABLE_COLUMNS if not c.startswith("centroid")]
    pd.testing.assert_frame_equal(moved[other], base[other])


def test_empty_label_and_bad_arguments():
    empty = nuclei_table(np.zeros((4, 4), np.int32), make_image((4, 4)), mpp=0.25)
    assert len(empty) == 0 and tuple(empty.columns) == TABLE_COLUMNS
    for bad in (0, -1.0, float("nan"), "0.25"):
        with pytest.raises(ValueError, match="mpp"):
            nuclei_table(make_label(), make_image(), mpp=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differ in size"):
        nuclei_table(make_label(), make_image((10, 10)), mpp=0.25)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_tables_round_trip_and_bad_files_are_named(tmp_path, suffix):
    table = nuclei_table(make_label(), make_image(), mpp=0.25, image_name="a")
    path = tmp_path / f"nuclei{suffix}"
    write_table(table, path)
    back = read_table(path)
    assert list(back.columns) == list(TABLE_COLUMNS) and len(back) == len(table)
    np.testing.assert_allclose(back["area_um2"], table["area_um2"], rtol=1e-5)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*missing columns"):
        read_table(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="not found"):
        read_table(tmp_path / "none.parquet")


def test_a_real_consep_tile_in_micrometres(consep_dir):
    from skimage.measure import regionprops_table

    from nucleiseg.io import read_image
    from nucleiseg.labels import read_label

    label = read_label(consep_dir / "train_2_label.png")
    table = nuclei_table(label, read_image(consep_dir / "train_2.png"), mpp=0.25)
    props = regionprops_table(label, properties=("label", "area", "perimeter", "solidity"))
    assert table["id"].tolist() == props["label"].tolist()
    np.testing.assert_allclose(table["area_um2"], props["area"] * 0.0625)
    np.testing.assert_allclose(table["perimeter_um"], props["perimeter"] * 0.25)
    np.testing.assert_allclose(table["solidity"], props["solidity"])
    # Haematoxylin dominates nuclei: every class's median H density exceeds its median E density.
    medians = table.groupby("class")[["hematoxylin_od_mean", "eosin_od_mean"]].median()
    assert (medians["hematoxylin_od_mean"] > medians["eosin_od_mean"]).all()


def test_centroids_alone_equal_the_full_tables():
    label, image = make_label(), make_image()
    full = nuclei_table(label, image, mpp=0.4, image_name="a", offset=(3, 5))
    light = nuclei_centroids(label, mpp=0.4, image_name="a", offset=(3, 5))
    for column in light.columns:
        if column in ("image", "class"):
            assert light[column].tolist() == full[column].tolist()
        else:
            np.testing.assert_allclose(light[column], full[column], rtol=1e-12)


def test_one_network_pass_gives_the_classes_and_the_maps_of_the_class_probabilities():
    from test_infer import MEAN, STD, conv_net, rgb

    from nucleiseg.infer import predict_classes, predict_classes_and_probabilities, predict_probabilities

    model, image = conv_net(seed=4), rgb(120, 90, seed=4)
    classes, probs = predict_classes_and_probabilities(model, image, MEAN, STD, tile=64, overlap=16)
    assert np.array_equal(classes, predict_classes(model, image, MEAN, STD, tile=64, overlap=16))
    half = predict_probabilities(model, image, MEAN, STD, tile=64, overlap=16, dtype=np.float16)
    assert probs.dtype == np.float16 and np.array_equal(probs, half)
    label = np.zeros(classes.shape, np.int32)
    label[10:30, 10:30] = 3
    table = nuclei_table(label, image, mpp=0.25, probs=probs)
    inside = probs[1:4, 10:30, 10:30].astype(np.float64)
    assert table["class_probability"].iloc[0] == pytest.approx(np.mean(inside[0] / inside.sum(axis=0)), rel=1e-3)
