"""Dataset importers (nucleiseg.importers): CoNSeP, PanNuke, folder of instance maps + CSV."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
from typer.testing import CliRunner

from nucleiseg.importers import SourceError, import_consep, import_dataset, import_folder, import_pannuke
from nucleiseg.io import read_image, read_raw, write_image
from nucleiseg.labels import read_label, write_label
from nucleiseg.outputs import RECORD_NAME


def _rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _map_ids(instance_map: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """The expected output: every pixel of input id i becomes mapping[i], anything else 0."""
    keys = np.array(sorted(mapping), dtype=np.int64)
    values = np.array([mapping[k] for k in keys.tolist()], dtype=np.int64)
    pos = np.clip(np.searchsorted(keys, instance_map), 0, len(keys) - 1)
    return np.where(keys[pos] == instance_map, values[pos], 0).astype(np.int32)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Same nuclei with other ids: same foreground and a one-to-one correspondence between ids."""
    if not np.array_equal(a > 0, b > 0):
        return False
    fg = a > 0
    pairs = np.unique(a[fg].astype(np.int64) << 32 | b[fg].astype(np.int64))
    return len(pairs) == len(np.unique(a[fg])) == len(np.unique(b[fg]))


# ------------------------------------------------------------------------------------------------------------
# CoNSeP
# ------------------------------------------------------------------------------------------------------------


def _consep_instance_map() -> np.ndarray:
    inst = np.zeros((24, 30), dtype=np.float64)  # CoNSeP stores inst_map as float64
    for i in range(1, 8):  # instance i has CoNSeP type i (1 other, 2 inflammatory, ... 7 endothelial)
        inst[2 + (i % 3) * 7 : 6 + (i % 3) * 7, (i // 3) * 9 + 1 : (i // 3) * 9 + 7] = i
    inst[0:2, 25:30] = 7  # instance 7 touches the image edge too
    return inst


def _write_consep_split(root, split: str, name: str, inst: np.ndarray, types: list[int], rng) -> np.ndarray:
    image = _rgb(rng, *inst.shape)
    write_image(root / split / "Images" / f"{name}.png", image)
    (root / split / "Labels").mkdir(parents=True, exist_ok=True)
    type_map = np.zeros(inst.shape)
    for i, t in enumerate(types, start=1):
        type_map[inst == i] = t
    scipy.io.savemat(
        root / split / "Labels" / f"{name}.mat",
        {"inst_map": inst, "type_map": type_map, "inst_type": np.array(types, dtype=np.float64)[:, None]},
    )
    return image


def test_consep_maps_the_seven_types(tmp_path):
    rng = np.random.default_rng(0)
    inst = _consep_instance_map()
    types = [1, 2, 3, 4, 5, 6, 7]
    image = _write_consep_split(tmp_path / "CoNSeP", "Train", "train_1", inst, types, rng)
    test_inst = np.zeros((16, 16))
    test_inst[3:8, 3:8] = 1
    test_inst[8:12, 3:8] = 2
    test_image = _write_consep_split(tmp_path / "CoNSeP", "Test", "test_1", test_inst, [4, 2], rng)
    out = tmp_path / "out"

    summary = import_consep(tmp_path / "CoNSeP", out)

    # Instances in ascending order: 2 (lymphocyte) -> 1, 3, 4 (epithelial) -> 3, 6, 5, 6, 7 (spindle) -> 2, 5, 8.
    expected = _map_ids(inst, {2: 1, 3: 3, 4: 6, 5: 2, 6: 5, 7: 8})
    assert np.array_equal(read_label(out / "train_1_label.png"), expected)
    assert read_raw(out / "train_1_label.png").dtype == np.uint16
    assert np.array_equal(read_raw(out / "train_1_other.png"), _map_ids(inst, {1: 1}))
    assert np.array_equal(read_image(out / "train_1.png"), image)
    assert np.array_equal(read_label(out / "test_1_label.png"), _map_ids(test_inst, {1: 3, 2: 1}))
    assert np.array_equal(read_image(out / "test_1.png"), test_image)
    assert not (out / "test_1_other.png").exists()
    assert sorted(summary.tiles) == ["test_1", "train_1"]
    assert summary.nuclei == {"tumor": 3, "lymphocyte": 2, "stroma": 3}
    assert summary.other == 1 and summary.tiles_with_other == 1
    # A split folder alone works too.
    again = import_consep(tmp_path / "CoNSeP" / "Test", tmp_path / "out2")
    assert again.tiles == ["test_1"]


def test_consep_rgba_images_and_re_import_removes_a_stale_other_map(tmp_path):
    import cv2

    rng = np.random.default_rng(1)
    inst = np.zeros((12, 12))
    inst[2:6, 2:6] = 1
    _write_consep_split(tmp_path, "Train", "train_2", inst, [1], rng)
    out = tmp_path / "out"
    import_consep(tmp_path, out)
    assert (out / "train_2_other.png").exists() and not read_label(out / "train_2_label.png").any()
    # The official tiles are RGBA PNGs; and the nucleus is now relabelled as a lymphocyte.
    rgba = np.dstack([_rgb(rng, 12, 12), np.full((12, 12), 255, np.uint8)])
    cv2.imwrite(str(tmp_path / "Train" / "Images" / "train_2.png"), rgba[..., [2, 1, 0, 3]])
    scipy.io.savemat(tmp_path / "Train" / "Labels" / "train_2.mat", {"inst_map": inst, "inst_type": [[2]]})
    import_consep(tmp_path, out)
    assert np.array_equal(read_image(out / "train_2.png"), rgba[..., :3])
    assert np.array_equal(read_label(out / "train_2_label.png"), inst.astype(int))
    assert not (out / "train_2_other.png").exists()


def test_consep_malformed_sources_name_the_file(tmp_path):
    rng = np.random.default_rng(2)
    with pytest.raises(SourceError, match=r"nowhere.*not found"):
        import_consep(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"empty.*Train"):
        import_consep(tmp_path / "empty", tmp_path / "out")

    root = tmp_path / "consep"
    good = np.zeros((10, 10))
    good[1:4, 1:4] = 1
    _write_consep_split(root, "Train", "train_1", good, [3], rng)
    _write_consep_split(root, "Train", "train_2", good, [3], rng)
    scipy.io.savemat(root / "Train" / "Labels" / "train_2.mat", {"type_map": good})  # no inst_map
    _write_consep_split(root, "Train", "train_3", np.zeros((9, 10)), [], rng)
    write_image(root / "Train" / "Images" / "train_3.png", _rgb(rng, 10, 10))  # size differs from its inst_map
    _write_consep_split(root, "Train", "train_4", good * 2, [3], rng)  # id 2, one type only
    _write_consep_split(root, "Train", "train_5", good, [9], rng)  # no CoNSeP type 9
    write_image(root / "Train" / "Images" / "train_6.png", _rgb(rng, 10, 10))  # no .mat at all
    (root / "Train" / "Labels" / "train_7.mat").write_bytes(b"MATLAB garbage")
    write_image(root / "Train" / "Images" / "train_7.png", _rgb(rng, 10, 10))

    with pytest.raises(SourceError) as info:
        import_consep(root, tmp_path / "out")
    message = str(info.value)
    assert "6 of 7 tile(s) could not be imported" in message
    assert "train_2.mat: no 'inst_map'" in message
    assert "train_3.mat: inst_map is 9x10 but train_3.png is 10x10" in message
    assert "train_4.mat: inst_map has id 2 but inst_type lists only 1" in message
    assert "train_5.mat: instance 1 has unknown type 9" in message
    assert "train_6.mat: label file not found" in message
    assert "train_7.mat: not a readable .mat" in message
    # The good tile was still written, and nothing of the bad ones.
    assert info.value.summary.tiles == ["train_1"]
    written = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != RECORD_NAME)  # the record: outputs
    assert written == ["train_1.png", "train_1_label.png"]


# ------------------------------------------------------------------------------------------------------------
# PanNuke
# ------------------------------------------------------------------------------------------------------------


def _pannuke_arrays(rng):
    images = rng.integers(0, 256, size=(3, 32, 32, 3)).astype(np.float64)  # PanNuke stores float64
    masks = np.zeros((3, 32, 32, 6), dtype=np.float64)
    m = masks[0]
    m[1:6, 1:6, 0] = 1  # neoplastic 1
    m[1:6, 6:11, 0] = 2  # neoplastic 2, touching neoplastic 1
    m[10:15, 1:6, 1] = 1  # inflammatory 1: same id as neoplastic 1, another nucleus
    m[20:25, 20:31, 2] = 5  # connective 5
    m[26:30, 2:6, 3] = 3  # dead 3
    m[10:16, 20:25, 4] = 2  # epithelial 2
    m[12:14, 22:27, 2] = 7  # connective 7 overlapping epithelial 2
    m[..., 5] = (m[..., :5].sum(axis=2) == 0).astype(np.float64)
    masks[1, ..., 5] = 1  # image 1: no nuclei
    masks[2, 0:4, 0:4, 3] = 1  # image 2: only a dead nucleus
    return images, masks


def test_pannuke_maps_channels_to_classes(tmp_path):
    rng = np.random.default_rng(3)
    images, masks = _pannuke_arrays(rng)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "masks.npy", masks)
    out = tmp_path / "out"

    summary = import_pannuke(tmp_path, out, fold="fold2")

    assert summary.tiles == ["fold2_0", "fold2_1", "fold2_2"]
    m = masks[0]
    # Instances keyed (id, channel) in ascending order: neo 1, inf 1, neo 2, epi 2, dead 3, conn 5, conn 7.
    expected = np.zeros((32, 32), dtype=np.int32)
    expected[m[..., 0] == 1] = 3
    expected[m[..., 1] == 1] = 1
    expected[m[..., 0] == 2] = 6
    expected[m[..., 2] == 5] = 2
    expected[m[..., 4] == 2] = 9
    expected[m[..., 2] == 7] = 5  # the overlap goes to the first channel: connective before epithelial
    label = read_label(out / "fold2_0_label.png")
    assert np.array_equal(label, expected)
    assert np.array_equal(read_label(out / "fold2_0_other.png"), (m[..., 3] == 3).astype(int))
    assert np.array_equal(read_image(out / "fold2_0.png"), images[0].astype(np.uint8))
    assert not read_label(out / "fold2_1_label.png").any() and not (out / "fold2_1_other.png").exists()
    assert not read_label(out / "fold2_2_label.png").any()
    assert np.array_equal(read_label(out / "fold2_2_other.png"), masks[2, ..., 3].astype(int))
    assert summary.nuclei == {"tumor": 3, "lymphocyte": 1, "stroma": 2}
    assert summary.other == 2 and summary.tiles_with_other == 2


def test_pannuke_official_layout_names_tiles_by_fold(tmp_path):
    rng = np.random.default_rng(4)
    images, masks = _pannuke_arrays(rng)
    fold = tmp_path / "Fold 1"
    (fold / "images" / "fold1").mkdir(parents=True)
    (fold / "masks" / "fold1").mkdir(parents=True)
    np.save(fold / "images" / "fold1" / "images.npy", images[:2])
    np.save(fold / "masks" / "fold1" / "masks.npy", masks[:2])
    summary = import_pannuke(fold, tmp_path / "out")
    assert summary.tiles == ["fold1_0", "fold1_1"]
    assert (tmp_path / "out" / "fold1_0_label.png").is_file()


def test_pannuke_malformed_sources_name_the_file(tmp_path):
    rng = np.random.default_rng(5)
    images, masks = _pannuke_arrays(rng)
    with pytest.raises(SourceError, match=r"nofold.*not found"):
        import_pannuke(tmp_path / "nofold", tmp_path / "out")
    np.save(tmp_path / "images.npy", images)
    with pytest.raises(SourceError, match=r"masks\.npy: file not found"):
        import_pannuke(tmp_path, tmp_path / "out")
    np.save(tmp_path / "masks.npy", masks[:2])
    with pytest.raises(SourceError, match=r"masks\.npy: shape \(2, 32, 32\) does not match images\.npy"):
        import_pannuke(tmp_path, tmp_path / "out")
    np.save(tmp_path / "masks.npy", masks[..., :5])
    with pytest.raises(SourceError, match=r"masks\.npy: expected N x H x W x 6"):
        import_pannuke(tmp_path, tmp_path / "out")
    bad = masks.copy()
    bad[1, 0, 0, 2] = 1.5
    np.save(tmp_path / "masks.npy", bad)
    with pytest.raises(SourceError, match=r"masks\.npy \[image 1\]: instance channels holds non-integer") as info:
        import_pannuke(tmp_path, tmp_path / "out", fold="f")
    assert info.value.summary.tiles == ["f_0", "f_2"]  # the bad image did not stop the others


# ------------------------------------------------------------------------------------------------------------
# Folder of instance maps + CSV
# ------------------------------------------------------------------------------------------------------------


def test_folder_per_tile_csvs(tmp_path):
    import tifffile

    rng = np.random.default_rng(6)
    src = tmp_path / "src"
    a = np.zeros((20, 20), dtype=np.uint16)
    a[1:5, 1:5], a[1:5, 5:9], a[10:14, 10:14], a[15:19, 2:6] = 40, 7, 300, 12
    write_image(src / "a.png", (image_a := _rgb(rng, 20, 20)))
    write_image(src / "a_inst.png", a)
    (src / "a.csv").write_text("id,class\n7,Tumor\n12,other\n40,lymphocyte\n300,0\n999,stroma\n")
    b = np.zeros((16, 18), dtype=np.uint32)
    b[2:6, 2:6], b[8:12, 8:12] = 100_000, 3
    write_image(src / "b.png", _rgb(rng, 16, 18))
    tifffile.imwrite(src / "b_inst.tif", b)
    (src / "b.csv").write_text("class,id\n2,100000\n1,3\n")  # column order is free

    summary = import_folder(src, tmp_path / "out")

    out = tmp_path / "out"
    assert summary.tiles == ["a", "b"]
    assert np.array_equal(read_label(out / "a_label.png"), _map_ids(a, {7: 3, 40: 1, 300: 6}))
    assert np.array_equal(read_label(out / "a_other.png"), _map_ids(a, {12: 1}))
    assert np.array_equal(read_image(out / "a.png"), image_a)
    assert np.array_equal(read_label(out / "b_label.png"), _map_ids(b, {3: 1, 100_000: 2}))
    assert summary.nuclei == {"tumor": 2, "lymphocyte": 2, "stroma": 1} and summary.other == 1
    assert any("a.csv" in n and "1 id(s)" in n for n in summary.notes)  # id 999 is not in the map


def test_folder_single_classes_csv_and_cli(tmp_path):
    from nucleiseg.cli import app

    rng = np.random.default_rng(7)
    src = tmp_path / "src"
    inst = np.zeros((12, 12), dtype=np.uint16)
    inst[1:5, 1:5], inst[6:10, 6:10] = 1, 2
    for name in ("t1", "t2"):
        write_image(src / f"{name}.png", _rgb(rng, 12, 12))
        write_image(src / f"{name}_inst.png", inst)
    (src / "t1.csv").write_text("id,class\n1,tumor\n2,tumor\n")  # ignored: classes.csv takes precedence
    (src / "classes.csv").write_text("image,id,class\nt1,1,stroma\nt1,2,1\nt2,1,other\nt2,2,STROMA\n")

    result = CliRunner().invoke(app, ["import", "folder", str(src), str(tmp_path / "out")])

    assert result.exit_code == 0, result.output
    assert "2 tile(s)" in result.output and "1 lymphocyte" in result.output and "2 stroma" in result.output
    assert np.array_equal(read_label(tmp_path / "out" / "t1_label.png"), _map_ids(inst, {1: 2, 2: 1}))
    assert np.array_equal(read_label(tmp_path / "out" / "t2_label.png"), _map_ids(inst, {2: 2}))
    assert np.array_equal(read_label(tmp_path / "out" / "t2_other.png"), _map_ids(inst, {1: 1}))


def test_folder_malformed_sources_name_the_file(tmp_path):
    rng = np.random.default_rng(8)
    src = tmp_path / "src"
    inst = np.zeros((10, 10), dtype=np.uint16)
    inst[1:4, 1:4], inst[5:8, 5:8] = 1, 2
    for name in ("ok", "badclass", "missingid", "noinst", "nocsv", "shape", "rgbinst"):
        write_image(src / f"{name}.png", _rgb(rng, 10, 10))
        if name not in ("noinst", "shape", "rgbinst"):
            write_image(src / f"{name}_inst.png", inst)
        if name != "nocsv":
            (src / f"{name}.csv").write_text("id,class\n1,tumor\n2,stroma\n")
    (src / "badclass.csv").write_text("id,class\n1,tumor\n2,macrophage\n")
    (src / "missingid.csv").write_text("id,class\n1,tumor\n")
    write_image(src / "shape_inst.png", inst[:9])
    write_image(src / "rgbinst_inst.png", _rgb(rng, 10, 10))

    with pytest.raises(SourceError) as info:
        import_folder(src, tmp_path / "out")
    message = str(info.value)
    assert "6 of 7" in message
    assert "badclass.csv line 3: unknown class 'macrophage'" in message
    assert "missingid.csv: no class for 1 id(s) of missingid_inst.png: 2" in message
    assert "noinst_inst.png: instance map not found" in message
    assert "nocsv.csv: class CSV not found" in message
    assert "shape_inst.png: instance map is 9x10 but shape.png is 10x10" in message
    assert "rgbinst_inst.png: a label must be a 2-D single-channel image" in message
    assert info.value.summary.tiles == ["ok"]

    with pytest.raises(SourceError, match=r"nothing_here.*folder not found"):
        import_folder(tmp_path / "nothing_here", tmp_path / "out")
    (src / "classes.csv").write_text("image,id\nok,1\n")
    with pytest.raises(SourceError, match=r"classes\.csv: header must have columns image,id,class"):
        import_folder(src, tmp_path / "out")
    (src / "classes.csv").write_text("image,id,class\nok,1,tumor\nghost,1,tumor\n")
    with pytest.raises(SourceError, match=r"classes\.csv: rows for images not in .*: ghost"):
        import_folder(src, tmp_path / "out")
    (src / "classes.csv").write_text("image,id,class\nok,1,tumor\nok,1,stroma\n")
    with pytest.raises(SourceError, match=r"classes\.csv line 3: id 1 given two different classes"):
        import_folder(src, tmp_path / "out")


def test_folder_round_trip_on_real_consep_tiles(consep_dir, tmp_path):
    """Real labels -> instance map with shuffled ids + CSV -> import -> the same nuclei, classes and pixels."""
    import tifffile

    rng = np.random.default_rng(9)
    src = tmp_path / "src"
    src.mkdir()
    originals = {}
    for name, as_tiff in (("train_25", False), ("train_1", True)):
        label = read_label(consep_dir / f"{name}_label.png")
        other = read_label(consep_dir / f"{name}_other.png")
        assert not ((label > 0) & (other > 0)).any()
        ids = np.unique(label[label > 0])
        other_ids = np.unique(other[other > 0])
        # Fresh ids unrelated to the encoding: random and, for the TIFF tile, above 16 bits.
        new = rng.permutation(np.arange(1, 60_000))[: len(ids) + len(other_ids)] + (200_000 if as_tiff else 0)
        lut = dict(zip(ids.tolist(), new[: len(ids)].tolist(), strict=True))
        lut_other = dict(zip(other_ids.tolist(), new[len(ids) :].tolist(), strict=True))
        inst = _map_ids(label, lut).astype(np.uint32) + _map_ids(other, lut_other).astype(np.uint32)
        rows = [f"{lut[i]},{('tumor', 'lymphocyte', 'stroma')[i % 3]}" for i in ids.tolist()]
        rows += [f"{lut_other[i]},other" for i in other_ids.tolist()]
        if as_tiff:
            tifffile.imwrite(src / f"{name}_inst.tif", inst)
        else:
            write_image(src / f"{name}_inst.png", inst.astype(np.uint16))
        (src / f"{name}.csv").write_text("id,class\n" + "\n".join(rows) + "\n")
        write_image(src / f"{name}.png", (image := read_image(consep_dir / f"{name}.png")))
        originals[name] = (label, other, image)

    summary = import_folder(src, tmp_path / "out")

    assert sorted(summary.tiles) == ["train_1", "train_25"]
    for name, (label, other, image) in originals.items():
        back = read_label(tmp_path / "out" / f"{name}_label.png")
        assert _same_partition(back, label)
        assert np.array_equal(back % 3, label % 3)  # every pixel keeps its class
        assert np.array_equal(read_image(tmp_path / "out" / f"{name}.png"), image)
        assert _same_partition(read_label(tmp_path / "out" / f"{name}_other.png"), other)
    assert summary.nuclei["tumor"] + summary.nuclei["lymphocyte"] + summary.nuclei["stroma"] == 841 + 11
    assert summary.other == 9 + 29


# ------------------------------------------------------------------------------------------------------------
# CLI and dispatch
# ------------------------------------------------------------------------------------------------------------


def test_cli_import_consep_prints_the_summary_and_names_bad_files(tmp_path):
    from nucleiseg.cli import app

    rng = np.random.default_rng(10)
    inst = np.zeros((10, 10))
    inst[1:4, 1:4], inst[5:9, 5:9] = 1, 2
    _write_consep_split(tmp_path / "c", "Train", "train_1", inst, [4, 1], rng)
    runner = CliRunner()
    result = runner.invoke(app, ["import", "consep", str(tmp_path / "c"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "1 tile(s)" in result.output and "1 tumor" in result.output and "1 other" in result.output

    scipy.io.savemat(tmp_path / "c" / "Train" / "Labels" / "train_1.mat", {"inst_map": inst})
    result = runner.invoke(app, ["import", "consep", str(tmp_path / "c"), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "train_1.mat: no 'inst_type'" in result.output
    result = runner.invoke(app, ["import", "cellpose", str(tmp_path / "c"), str(tmp_path / "out")])
    assert result.exit_code == 2


def test_import_dataset_dispatch(tmp_path):
    with pytest.raises(SourceError, match=r"unknown format 'monuseg'"):
        import_dataset("monuseg", tmp_path, tmp_path / "out")
    label = np.zeros((8, 8), dtype=np.int32)
    label[2:5, 2:5] = 9
    src = tmp_path / "src"  # the output folder must lie outside the folder read
    write_label(src / "x_inst.png", label)
    write_image(src / "x.png", np.zeros((8, 8, 3), dtype=np.uint8))
    (src / "x.csv").write_text("id,class\n9,stroma\n")
    summary = import_dataset("folder", src, tmp_path / "out")
    assert summary.to_dict()["nuclei"] == {"tumor": 0, "lymphocyte": 0, "stroma": 1}
