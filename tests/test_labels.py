"""Label encoding, validation and training targets (nucleiseg.labels)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from skimage import morphology
from typer.testing import CliRunner

from nucleiseg.io import read_raw, write_image
from nucleiseg.labels import (
    CLASS_NAMES,
    LabelError,
    class_index,
    class_view,
    classes_of,
    encode,
    read_label,
    relabel_sequential,
    targets,
    validate_label,
    write_label,
)

# ------------------------------------------------------------------------------------------------------------
# The reference, written as directly as the paper's code (huiqu18/NucleiSegClas): one nucleus at a time.
# ------------------------------------------------------------------------------------------------------------


def reference_targets(label: np.ndarray) -> np.ndarray:
    """prepare_data.create_labels_from_instance followed by my_transforms.LabelBinarization2, per nucleus."""
    rings = np.zeros(label.shape, dtype=bool)
    for i in np.unique(label):
        if i == 0:
            continue
        nucleus = label == i
        # skimage's default footprint is the 3x3 cross; erosion's default mode='reflect' keeps the image edge.
        rings |= morphology.dilation(nucleus) & ~morphology.erosion(nucleus)
    out = np.zeros(label.shape, dtype=np.uint8)
    for c in range(3):
        out[(label > 0) & (label % 3 == c) & ~rings] = c + 1
    inside = out > 0
    out[morphology.dilation(inside, morphology.disk(2)) & ~inside] = 4
    return out


def random_touching_label(rng: np.random.Generator, shape=(48, 64), n=18) -> np.ndarray:
    """Nuclei grown from random seeds inside their Voronoi cells, so many of them touch; random unique ids."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    seeds = rng.uniform((0, 0), shape, size=(n, 2))
    radius = rng.uniform(2.0, 9.0, size=n)
    dist = np.hypot(yy[..., None] - seeds[:, 0], xx[..., None] - seeds[:, 1])
    nearest = dist.argmin(axis=2)
    ids = rng.choice(np.arange(1, 400), size=n, replace=False)
    label = np.where(dist.min(axis=2) <= radius[nearest], ids[nearest], 0)
    # A few one-pixel nuclei, some on top of others.
    for y, x in rng.integers(0, shape, size=(3, 2)):
        label[y, x] = 400 + rng.integers(0, 100)
    return label.astype(np.int32)


def _touch_count(label: np.ndarray) -> int:
    a, b = label[:, 1:], label[:, :-1]
    return int(((a != b) & (a > 0) & (b > 0)).sum())


# ------------------------------------------------------------------------------------------------------------
# Targets
# ------------------------------------------------------------------------------------------------------------


def test_disk2_is_the_reference_footprint():
    from nucleiseg.labels import _DISK2

    assert np.array_equal(_DISK2, morphology.disk(2).astype(np.uint8))


def test_targets_two_touching_nuclei():
    label = np.zeros((7, 12), dtype=np.int32)
    label[1:6, 1:6] = 3  # tumor
    label[1:6, 6:11] = 1  # lymphocyte, touching it
    expected = np.array(
        [
            [0, 0, 4, 4, 4, 0, 0, 4, 4, 4, 0, 0],
            [0, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 0],
            [4, 4, 1, 1, 1, 4, 4, 2, 2, 2, 4, 4],
            [4, 4, 1, 1, 1, 4, 4, 2, 2, 2, 4, 4],
            [4, 4, 1, 1, 1, 4, 4, 2, 2, 2, 4, 4],
            [0, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 0],
            [0, 0, 4, 4, 4, 0, 0, 4, 4, 4, 0, 0],
        ],
        dtype=np.uint8,
    )
    assert np.array_equal(targets(label), expected)
    assert np.array_equal(reference_targets(label), expected)


def test_targets_nucleus_at_the_image_border_gets_no_contour_along_the_edge():
    label = np.zeros((5, 6), dtype=np.uint16)
    label[0:3, 0:4] = 2  # stroma, cut by the top and left edges
    expected = np.array(
        [
            [3, 3, 3, 4, 4, 0],
            [3, 3, 3, 4, 4, 0],
            [4, 4, 4, 4, 0, 0],
            [4, 4, 4, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=np.uint8,
    )
    assert np.array_equal(targets(label), expected)
    assert np.array_equal(reference_targets(label), expected)


def test_targets_one_pixel_nuclei():
    # Alone, a one-pixel nucleus is all ring: it has no inside and so leaves no trace.
    alone = np.zeros((5, 5), dtype=np.int32)
    alone[2, 2] = 4
    assert not targets(alone).any()
    # Filling the whole image, nothing is a boundary: the image edge is not one.
    assert np.array_equal(targets(np.array([[3]])), [[1]])
    # Inside a tumor nucleus, its ring eats the tumor's inside around it.
    label = np.zeros((7, 7), dtype=np.int32)
    label[1:6, 1:6] = 6
    label[3, 3] = 5
    expected = np.array(
        [
            [0, 0, 4, 0, 4, 0, 0],
            [0, 4, 4, 4, 4, 4, 0],
            [4, 4, 1, 4, 1, 4, 4],
            [0, 4, 4, 4, 4, 4, 0],
            [4, 4, 1, 4, 1, 4, 4],
            [0, 4, 4, 4, 4, 4, 0],
            [0, 0, 4, 0, 4, 0, 0],
        ],
        dtype=np.uint8,
    )
    assert np.array_equal(targets(label), expected)
    assert np.array_equal(reference_targets(label), expected)


def test_targets_equal_the_per_nucleus_reference_on_random_touching_labels():
    rng = np.random.default_rng(7)
    touching = 0
    for _ in range(25):
        label = random_touching_label(rng)
        touching += _touch_count(label)
        out = targets(label)
        assert out.dtype == np.uint8
        assert np.array_equal(out, reference_targets(label))
    assert touching > 100  # the labels really exercise touching nuclei


def test_targets_equal_the_reference_on_a_real_tile_crop(consep_dir):
    label = read_label(consep_dir / "train_18_label.png")[300:460, 500:660]
    assert len(np.unique(label)) > 50
    assert np.array_equal(targets(label), reference_targets(label))


def test_targets_reject_non_labels():
    with pytest.raises(LabelError, match=r"2-D"):
        targets(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(LabelError, match=r"integer"):
        targets(np.zeros((4, 4), dtype=np.float32))
    assert targets(np.zeros((0, 0), dtype=np.int32)).shape == (0, 0)


# ------------------------------------------------------------------------------------------------------------
# Reading and writing
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff"])
def test_write_read_round_trip(tmp_path, suffix):
    label = np.zeros((20, 30), dtype=np.int32)
    label[2:5, 3:9] = 65535
    label[10:15, 10:20] = 7
    path = tmp_path / f"tile_label{suffix}"
    write_label(path, label)
    assert read_raw(path).dtype == np.uint16
    back = read_label(path)
    assert back.dtype == np.int32
    assert np.array_equal(back, label)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_write_label_refuses_ids_above_16_bits_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "a_label.png"
    write_label(path, np.full((4, 4), 3))
    with pytest.raises(LabelError, match=r"a_label\.png.*65536.*65535"):
        write_label(path, np.full((4, 4), 65536))
    assert np.array_equal(read_label(path), np.full((4, 4), 3))
    with pytest.raises(LabelError, match=r"negative"):
        write_label(tmp_path / "b_label.png", np.full((4, 4), -1))
    with pytest.raises(LabelError, match=r"float"):
        write_label(tmp_path / "c_label.png", np.full((4, 4), 1.0))
    with pytest.raises(LabelError, match=r"\.jpg"):
        write_label(tmp_path / "d_label.jpg", np.full((4, 4), 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_label.png"]


def test_read_label_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt_label.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(LabelError, match=r"corrupt_label.png"):
        read_label(corrupt)
    with pytest.raises(LabelError, match=r"missing_label.png.*not found"):
        read_label(tmp_path / "missing_label.png")
    rgb = tmp_path / "rgb_label.png"
    write_image(rgb, np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(LabelError, match=r"rgb_label.png.*RGB"):
        read_label(rgb)
    import tifffile

    floats = tmp_path / "float_label.tif"
    tifffile.imwrite(floats, np.ones((8, 8), dtype=np.float32))
    with pytest.raises(LabelError, match=r"float_label.tif.*float"):
        read_label(floats)
    negative = tmp_path / "negative_label.tif"
    tifffile.imwrite(negative, np.full((8, 8), -2, dtype=np.int16))
    with pytest.raises(LabelError, match=r"negative_label.tif.*negative"):
        read_label(negative)


def test_read_label_accepts_8_bit_and_32_bit(tmp_path):
    import tifffile

    small = tmp_path / "small_label.png"
    write_image(small, np.full((3, 3), 200, dtype=np.uint8))
    assert np.array_equal(read_label(small), np.full((3, 3), 200))
    big = tmp_path / "big_label.tif"
    tifffile.imwrite(big, np.full((3, 3), 100_000, dtype=np.uint32))
    assert read_label(big).max() == 100_000


def test_real_label_reads_as_the_paper_encoding(consep_dir):
    label = read_label(consep_dir / "train_1_label.png")
    assert label.shape == (1000, 1000) and label.dtype == np.int32
    classes = classes_of(label)
    assert len(classes) == 841
    assert set(classes.values()) == {0, 1, 2}
    assert validate_label(label, consep_dir / "train_1_label.png", image_shape=(1000, 1000, 3)) == []


# ------------------------------------------------------------------------------------------------------------
# Classes and encoding
# ------------------------------------------------------------------------------------------------------------


def test_classes_of_and_class_view():
    label = np.array([[0, 1, 2, 3], [4, 5, 6, 0], [9, 9, 10, 11]], dtype=np.int32)
    assert classes_of(label) == {1: 1, 2: 2, 3: 0, 4: 1, 5: 2, 6: 0, 9: 0, 10: 1, 11: 2}
    assert np.array_equal(class_view(label, 0), [[0, 0, 0, 3], [0, 0, 6, 0], [9, 9, 0, 0]])
    assert np.array_equal(class_view(label, 1), [[0, 1, 0, 0], [4, 0, 0, 0], [0, 0, 10, 0]])
    assert np.array_equal(class_view(label, "stroma"), [[0, 0, 2, 0], [0, 5, 0, 0], [0, 0, 0, 11]])
    assert class_view(label.astype(np.uint16), 2).dtype == np.uint16
    assert classes_of(np.zeros((3, 3), dtype=np.int32)) == {}
    with pytest.raises(ValueError, match=r"0, 1 or 2"):
        class_view(label, 3)


def test_class_index():
    assert [class_index(n) for n in CLASS_NAMES] == [0, 1, 2]
    assert class_index("Lymphocyte ") == 1
    assert class_index("2") == 2
    assert class_index(np.int64(0)) == 0
    for bad in ("neutrophil", 3, -1, True):
        with pytest.raises(ValueError):
            class_index(bad)


def test_encode_assigns_ids_per_class_in_ascending_input_order():
    inst = np.array([[0, 50, 50, 7], [12, 12, 0, 7], [900, 3, 3, 0], [4, 0, 0, 0]], dtype=np.int64)
    classes = {50: 0, 7: "tumor", 12: 1, 900: 2, 3: 2, 4: 0, 8888: 1}  # 8888: not in the map, ignored
    label = encode(inst, classes)
    # Ascending input ids: 3 (stroma), 4 (tumor), 7 (tumor), 12 (lymphocyte), 50 (tumor), 900 (stroma).
    expected_ids = {3: 2, 4: 3, 7: 6, 12: 1, 50: 9, 900: 5}
    expected = np.vectorize(lambda v: expected_ids.get(v, 0))(inst)
    assert label.dtype == np.int32
    assert np.array_equal(label, expected)
    assert {i % 3 for i in np.unique(label[inst == 50])} == {0}


def test_encode_missing_classes_error_names_the_ids_or_drops_them():
    inst = np.array([[1, 2, 3], [4, 5, 0]])
    with pytest.raises(LabelError, match=r"2 instance\(s\) have no class: ids 2, 5"):
        encode(inst, {1: 0, 3: 1, 4: 2})
    dropped = encode(inst, {1: 0, 3: 1, 4: 2}, missing="drop")
    assert np.array_equal(dropped, [[3, 0, 1], [2, 0, 0]])
    with pytest.raises(LabelError, match=r"instance 1.*unknown class"):
        encode(inst, {1: "macrophage"}, missing="drop")


def test_encode_handles_huge_sparse_ids_and_empty_maps():
    inst = np.zeros((4, 4), dtype=np.int64)
    inst[0, 0] = 2_000_000_000
    inst[3, 3] = 5
    assert np.array_equal(encode(inst, {2_000_000_000: 1, 5: 1})[[0, 3], [0, 3]], [4, 1])
    assert not encode(np.zeros((3, 3), dtype=np.uint16), {}).any()


def test_relabel_sequential():
    inst = np.array([[0, 70, 70], [12, 0, 9000]])
    assert np.array_equal(relabel_sequential(inst), [[0, 2, 2], [1, 0, 3]])


# ------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------


def test_validate_label_errors_name_the_file_and_problem():
    ok = np.zeros((10, 12), dtype=np.int32)
    ok[2:4, 2:4] = 3
    with pytest.raises(LabelError, match=r"t1_label.png.*2-D.*shape"):
        validate_label(np.zeros((10, 12, 3), dtype=np.uint8), "t1_label.png")
    with pytest.raises(LabelError, match=r"t1_label.png.*float"):
        validate_label(ok.astype(np.float64), "t1_label.png")
    with pytest.raises(LabelError, match=r"t1_label.png.*negative"):
        validate_label(ok - 1, "t1_label.png")
    with pytest.raises(LabelError, match=r"t1_label.png.*10x12.*image size 10x13"):
        validate_label(ok, "t1_label.png", image_shape=(10, 13, 3))
    assert validate_label(ok, "t1_label.png", image_shape=(10, 12, 3)) == []


def test_validate_label_warns_on_split_ids_with_the_count():
    label = np.zeros((10, 10), dtype=np.int32)
    label[0:2, 0:2] = 3
    label[5:7, 5:7] = 3
    label[9, 0] = 3  # third piece of id 3
    label[8:10, 8:10] = 4
    label[2, 2] = 4  # diagonal to nothing of id 4 -> second piece
    label[3, 3] = 5  # id 5: a single pixel, alone
    label[4, 4] = 5  # diagonal neighbour: one piece under 8-connectivity
    with pytest.warns(UserWarning, match=r"t2_label.png.*2 id\(s\) split.*id 3 \(3 pieces\), id 4 \(2 pieces\)"):
        messages = validate_label(label, "t2_label.png")
    assert len(messages) == 1 and "id 5" not in messages[0]


def test_validate_label_notes_an_empty_label_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        messages = validate_label(np.zeros((6, 6), dtype=np.uint16), "empty_label.png")
    assert len(messages) == 1 and "empty_label.png" in messages[0] and "empty" in messages[0]


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------


def test_cli_targets_writes_the_8_bit_map(tmp_path):
    from nucleiseg.cli import app

    rng = np.random.default_rng(3)
    label = random_touching_label(rng)
    write_label(tmp_path / "x_label.png", label)
    out = tmp_path / "out" / "x_targets.png"
    result = CliRunner().invoke(app, ["targets", str(tmp_path / "x_label.png"), str(out)])
    assert result.exit_code == 0, result.output
    written = read_raw(out)
    assert written.dtype == np.uint8 and written.ndim == 2
    assert np.array_equal(written, reference_targets(label))
    assert "contour" in result.output


def test_cli_targets_names_a_bad_file(tmp_path):
    from nucleiseg.cli import app

    bad = tmp_path / "bad_label.png"
    bad.write_bytes(b"garbage")
    result = CliRunner().invoke(app, ["targets", str(bad), str(tmp_path / "t.png")])
    assert result.exit_code == 1
    assert "bad_label.png" in result.output
    assert not (tmp_path / "t.png").exists()


# ----------------------------------------------------------------------------------------------------------
# Labels with more than 21,845 nuclei of one class: 32-bit TIFF


def _big_ids() -> np.ndarray:
    label = np.zeros((24, 24), np.int32)
    label[2:6, 2:6] = 3
    label[8:12, 8:12] = 70_001  # a lymphocyte beyond 16 bits
    label[14:20, 14:20] = 131_070  # a tumor nucleus: ids of one class beyond 65535 mean > 21,845 of them
    return label


def test_large_ids_go_to_a_32_bit_tiff_and_a_png_is_refused_naming_it(tmp_path) -> None:
    import tifffile

    from nucleiseg.labels import label_suffix

    label = _big_ids()
    assert label_suffix(label) == ".tif" and label_suffix(label % 65_536) == ".png"
    write_label(tmp_path / "a_label.tif", label)
    assert tifffile.imread(tmp_path / "a_label.tif").dtype == np.uint32
    np.testing.assert_array_equal(read_label(tmp_path / "a_label.tif"), label)
    with pytest.raises(LabelError, match=rf"^{tmp_path / 'b_label.png'}: id 131070 .*\.tif"):
        write_label(tmp_path / "b_label.png", label)
    assert not list(tmp_path.glob("*b_label*"))


def test_lzw_compressed_32_bit_tiff_labels_are_read(tmp_path) -> None:
    import tifffile

    tifffile.imwrite(tmp_path / "x_label.tif", _big_ids().astype(np.uint32), compression="lzw")
    np.testing.assert_array_equal(read_label(tmp_path / "x_label.tif"), _big_ids())


def test_prediction_outputs_of_a_large_label_and_their_evaluation(tmp_path) -> None:
    from nucleiseg.cli import app
    from nucleiseg.export import write_outputs

    label = _big_ids()
    paths = write_outputs(tmp_path / "pred", "a", np.full((24, 24, 3), 200, np.uint8), label)
    assert paths["label"].name == "a_label.tif" and not (tmp_path / "pred" / "a_label.png").exists()
    np.testing.assert_array_equal(read_label(paths["label"]), label)
    write_label(tmp_path / "truth" / "a_label.tif", label)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "pred"), str(tmp_path / "truth"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["summary"]["all"]["f1"] == 1.0


def test_two_formats_of_one_label_are_an_error(tmp_path) -> None:
    from nucleiseg.labels import label_files

    write_label(tmp_path / "a_label.png", _big_ids() % 65_536)
    write_label(tmp_path / "a_label.tif", _big_ids())
    with pytest.raises(LabelError, match="two label files for 'a'"):
        label_files(tmp_path)
