"""Shared file I/O: clear errors that name the file, and writes that never leave half a file."""

import numpy as np
import pytest

from nucleiseg.io import ImageReadError, atomic_path, list_images, read_image, write_image, write_json_atomic


def test_rgb_round_trip_keeps_channel_order(tmp_path):
    image = np.zeros((8, 10, 3), np.uint8)
    image[..., 0] = 200  # red
    write_image(tmp_path / "a.png", image)
    assert np.array_equal(read_image(tmp_path / "a.png"), image)
    write_image(tmp_path / "a.tif", image)
    assert np.array_equal(read_image(tmp_path / "a.tif"), image)


def test_corrupt_and_missing_files_are_named(tmp_path):
    good = np.full((16, 16, 3), 128, np.uint8)
    write_image(tmp_path / "good.png", good)
    broken = tmp_path / "broken.png"
    broken.write_bytes((tmp_path / "good.png").read_bytes()[:20])
    with pytest.raises(ImageReadError, match=r"broken\.png"):
        read_image(broken)
    with pytest.raises(ImageReadError, match=r"missing\.png: file not found"):
        read_image(tmp_path / "missing.png")


def test_failed_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"v": 1})
    before = target.read_bytes()
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"v": 2, "half')
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_list_images_skips_labels(tmp_path):
    for name in ("a.png", "a_label.png", "a_other.png", "b.tif", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.tif"]


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os

    write_json_atomic(tmp_path / "a.json", {})
    plain = tmp_path / "b.json"
    plain.write_text("{}")
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == os.stat(plain).st_mode & 0o777
