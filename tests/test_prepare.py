"""Splits, grid patches and channel statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nucleiseg.io import read_image
from nucleiseg.labels import read_label
from nucleiseg.prepare import (
    channel_stats,
    extract_patches,
    grid_patches,
    read_splits,
    read_stats,
    split_dataset,
    split_sizes,
    write_patches,
    write_splits,
    write_stats,
)


def reference_origins(length: int, size: int = 250) -> list[int]:
    """The reference code's ``split_patches`` along one axis (github.com/huiqu18/NucleiSegClas)."""
    overlap = math.ceil((4 * size - length) / 3)
    return list(range(0, length - size + 1, size - overlap))


# --- patches ----------------------------------------------------------------------------------------


def test_grid_equals_the_reference_for_1000px_tiles() -> None:
    origins = grid_patches((1000, 1000), 250, 4)
    assert len(origins) == 16
    assert sorted({y for y, _ in origins}) == [0, 250, 500, 750] == reference_origins(1000)
    assert origins[:4] == [(0, 0), (0, 250), (0, 500), (0, 750)]  # row by row, as the reference


@pytest.mark.parametrize("length", [997, 904, 550, 313])
def test_grid_equals_the_reference_where_its_steps_are_whole(length: int) -> None:
    # Where (length - size) is a multiple of 3 the reference's steps land exactly on the last row.
    ys = sorted({y for y, _ in grid_patches((length, length), 250, 4)})
    assert ys == reference_origins(length)


@pytest.mark.parametrize("shape", [(1000, 1000), (900, 700), (512, 512), (251, 1999), (2500, 1000), (250, 250)])
def test_grid_covers_the_image_with_evenly_spaced_patches(shape: tuple[int, int]) -> None:
    size, grid = 250, 4
    origins = grid_patches(shape, size, grid)
    covered = np.zeros(shape, dtype=int)
    for y, x in origins:
        assert 0 <= y <= shape[0] - size and 0 <= x <= shape[1] - size
        covered[y : y + size, x : x + size] += 1
    assert covered.min() >= 1
    for axis in (0, 1):
        values = sorted({o[axis] for o in origins})
        expected = min(max(grid, math.ceil(shape[axis] / size)), shape[axis] - size + 1)
        assert len(values) == expected
        assert values[0] == 0 and values[-1] == shape[axis] - size
        steps = np.diff(values)
        assert steps.size == 0 or steps.max() - steps.min() <= 1  # uniform up to rounding


def test_small_images_get_one_padded_patch() -> None:
    image = np.full((100, 300, 3), 7, np.uint8)
    label = np.arange(100 * 300, dtype=np.int32).reshape(100, 300) % 50
    origins = grid_patches(image, 250, 4)
    assert {y for y, _ in origins} == {0}
    patches = extract_patches(image, origins, 250, fill=255)
    labels = extract_patches(label, origins, 250, fill=0)
    assert all(p.shape == (250, 250, 3) for p in patches)
    assert np.all(patches[0][100:] == 255) and np.all(patches[0][:100, :250] == 7)
    assert np.all(labels[0][100:] == 0) and np.array_equal(labels[0][:100], label[:, :250])


def test_write_patches_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (600, 520, 3), dtype=np.uint8)
    label = rng.integers(0, 3000, (600, 520)).astype(np.int32)  # ids above 255 need 16 bits
    other = (rng.random((600, 520)) > 0.95).astype(np.int32) * 2
    written = write_patches(image, label, other, tmp_path, "tile", size=250, grid=4)
    origins = grid_patches(image, 250, 4)
    assert len(written) == len(origins) == 16
    for k, ((img_path, lab_path, other_path), (y, x)) in enumerate(zip(written, origins, strict=True)):
        assert img_path.name == f"tile_p{k}.png" and lab_path.name == f"tile_p{k}_label.png"
        assert other_path is not None and other_path.name == f"tile_p{k}_other.png"
        assert np.array_equal(read_image(img_path), image[y : y + 250, x : x + 250])
        assert np.array_equal(read_label(lab_path), label[y : y + 250, x : x + 250])
        assert np.array_equal(read_label(other_path), other[y : y + 250, x : x + 250])
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_write_patches_rejects_mismatched_sizes(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"tile_7: label size"):
        write_patches(np.zeros((300, 300, 3), np.uint8), np.zeros((300, 299), np.int32), None, tmp_path, "tile_7")


def test_real_tile_patches(tmp_path, consep_dir) -> None:
    image = read_image(consep_dir / "train_1.png")
    label = read_label(consep_dir / "train_1_label.png")
    written = write_patches(image, label, None, tmp_path, "train_1")
    assert len(written) == 16 and all(o is None for *_, o in written)
    ids = set()
    for _, lab_path, _ in written:
        ids |= set(np.unique(read_label(lab_path)).tolist())
    assert ids == set(np.unique(label).tolist())  # every nucleus lands in some patch, ids intact


# --- splits -----------------------------------------------------------------------------------------

NAMES = [f"train_{i}" for i in range(1, 28)]


def test_split_sizes() -> None:
    assert split_sizes(27, (0.7, 0.15, 0.15)) == [19, 4, 4]
    assert split_sizes(3, (0.8, 0.1, 0.1)) == [1, 1, 1]
    assert split_sizes(4, (0.9, 0.05, 0.05)) == [2, 1, 1]
    assert split_sizes(5, (0.8, 0.2, 0.0)) == [4, 1, 0]
    assert split_sizes(2, (0.7, 0.15, 0.15))[0] >= 1


def test_split_is_by_image_deterministic_and_order_independent() -> None:
    a = split_dataset(NAMES, (0.7, 0.15, 0.15), seed=3)
    b = split_dataset(list(reversed(NAMES)), (0.7, 0.15, 0.15), seed=3)
    assert a == b
    assert [len(a[s]) for s in ("train", "val", "test")] == [19, 4, 4]
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(NAMES)
    others = [split_dataset(NAMES, (0.7, 0.15, 0.15), seed=s) for s in range(4, 8)]
    assert any(o != a for o in others)


def test_every_split_non_empty_from_three_images() -> None:
    for seed in range(5):
        splits = split_dataset(["a", "b", "c"], (0.9, 0.05, 0.05), seed=seed)
        assert all(len(splits[s]) == 1 for s in ("train", "val", "test"))


def _classes_with_a_rare_class() -> dict[str, set[int]]:
    # Stroma (2) is in only 3 of 27 images: a random cut often leaves it out of val or test.
    present = {n: {0, 1} for n in NAMES}
    for n in ("train_4", "train_11", "train_20"):
        present[n] = {0, 1, 2}
    present["train_5"] = set()  # an all-background label, as the real train_5
    return present


def test_stratified_split_puts_every_class_in_every_split() -> None:
    present = _classes_with_a_rare_class()
    unstratified_misses = 0
    for seed in range(10):
        splits = split_dataset(NAMES, (0.7, 0.15, 0.15), seed=seed, classes_present=present)
        assert splits == split_dataset(NAMES, (0.7, 0.15, 0.15), seed=seed, classes_present=present)
        for members in splits.values():
            assert set().union(*(present[n] for n in members)) == {0, 1, 2}
        assert "train_5" in splits["train"]  # no nucleus to score: it trains
        assert [len(splits[s]) for s in ("train", "val", "test")] == [19, 4, 4]
        plain = split_dataset(NAMES, (0.7, 0.15, 0.15), seed=seed)
        unstratified_misses += any(2 not in set().union(*(present[n] for n in members)) for members in plain.values())
    assert unstratified_misses > 0  # the search is what made the difference


def test_stratified_split_does_its_best_when_impossible() -> None:
    present = {n: {0} for n in NAMES}
    present["train_9"] = {0, 1}  # lymphocytes in one image only: it must go to train
    splits = split_dataset(NAMES, (0.7, 0.15, 0.15), seed=0, classes_present=present)
    assert "train_9" in splits["train"]
    with pytest.raises(ValueError, match="train_27"):
        split_dataset(NAMES, seed=0, classes_present={n: {0} for n in NAMES[:-1]})


def test_unscoreable_images_train_even_when_most_are() -> None:
    names = [f"t{k}" for k in range(7)]
    present = {n: set() for n in names} | {"t0": {0, 1, 2}, "t1": {0, 1, 2}}
    splits = split_dataset(names, (0.7, 0.15, 0.15), seed=0, classes_present=present)
    assert set(splits["train"]) >= {f"t{k}" for k in range(2, 7)}
    assert sorted(n for members in splits.values() for n in members) == sorted(names)
    assert len(splits["train"]) == 6 and len(splits["val"]) + len(splits["test"]) == 1


def test_explicit_split_is_validated() -> None:
    explicit = {"train": ["train_1", "train_2.png"], "val": ["train_3"], "test": ["train_4"]}
    with pytest.warns(UserWarning, match="leaves out 23"):
        splits = split_dataset(NAMES, explicit=explicit)
    assert splits == {"train": ["train_1", "train_2"], "val": ["train_3"], "test": ["train_4"]}
    with pytest.raises(ValueError, match=r"unknown image\(s\): train_99 \(val\), nope \(test\)"):
        split_dataset(NAMES, explicit={"train": ["train_1"], "val": ["train_99"], "test": ["nope"]})
    with pytest.raises(ValueError, match=r"more than once: train_2 \(train and test\)"):
        split_dataset(NAMES, explicit={"train": ["train_1", "train_2"], "test": ["train_2"]})
    with pytest.raises(ValueError, match="duplicated image names: a"):
        split_dataset(["a", "a", "b"])


def test_splits_file_round_trip(tmp_path) -> None:
    splits = split_dataset(NAMES, seed=1)
    write_splits(tmp_path / "splits.json", splits)
    assert read_splits(tmp_path / "splits.json") == splits


# --- channel statistics -----------------------------------------------------------------------------


def test_channel_stats_are_exact() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(50, 70), (1, 1), (333, 20), (128, 128)]]
    images[1][:] = 255
    mean, std = channel_stats(iter(images))
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64) / 255
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=0, atol=1e-14)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=0, atol=1e-14)
    fmean, fstd = channel_stats(im.astype(np.float32) / 255 for im in images)
    np.testing.assert_allclose(fmean, mean, atol=1e-7)
    np.testing.assert_allclose(fstd, std, atol=1e-7)


def test_channel_stats_large_uniform_image_has_no_cancellation() -> None:
    # E[x^2] - E[x]^2 in float would lose this; integer sums keep it exact.
    image = np.full((2000, 2000, 3), 200, np.uint8)
    image[0, 0] = 201
    mean, std = channel_stats([image])
    n = image.shape[0] * image.shape[1]
    exact_std = math.sqrt((n - 1) / n**2) / 255
    np.testing.assert_allclose(std, exact_std, rtol=1e-9)
    np.testing.assert_allclose(mean, (200 + 1 / n) / 255, rtol=1e-15)


def test_stats_file_round_trip_and_errors(tmp_path) -> None:
    write_stats(tmp_path / "stats.json", [0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    mean, std = read_stats(tmp_path / "stats.json")
    assert mean.tolist() == [0.1, 0.2, 0.3] and std.tolist() == [0.4, 0.5, 0.6]
    with pytest.raises(ValueError, match="no pixels"):
        channel_stats([])
    (tmp_path / "bad.json").write_text('{"mean": [1, 2]}')
    with pytest.raises(ValueError, match=r"bad\.json"):
        read_stats(tmp_path / "bad.json")


def _consep_like_counts() -> dict[str, list[int]]:
    # Nuclei per class (tumor, lymphocyte, stroma) of the 27 CoNSeP training tiles: train_18 holds half of
    # all lymphocytes, train_5 none of any class.
    rows = {
        1: (287, 95, 459), 2: (0, 31, 262), 3: (430, 36, 201), 4: (0, 3, 74), 5: (0, 0, 0), 6: (281, 215, 271),
        7: (555, 0, 51), 8: (377, 195, 298), 9: (0, 232, 414), 10: (384, 278, 333), 11: (0, 1, 99),
        12: (0, 35, 100), 13: (721, 3, 24), 14: (278, 30, 194), 15: (0, 33, 127), 16: (0, 43, 219),
        17: (728, 32, 36), 18: (0, 2018, 265), 19: (488, 4, 250), 20: (452, 37, 50), 21: (0, 7, 254),
        22: (333, 74, 330), 23: (0, 447, 793), 24: (223, 26, 464), 25: (0, 11, 0), 26: (0, 32, 98), 27: (0, 23, 40),
    }  # fmt: skip
    return {f"train_{k}": list(v) for k, v in rows.items()}


def test_split_balances_the_nuclei_of_each_class() -> None:
    counts = _consep_like_counts()
    names = sorted(counts)
    for seed in range(3):
        splits = split_dataset(names, (0.7, 0.15, 0.15), seed=seed, class_counts=counts)
        assert splits == split_dataset(list(reversed(names)), (0.7, 0.15, 0.15), seed=seed, class_counts=counts)
        assert "train_18" in splits["train"] and "train_5" in splits["train"]
        assert [len(splits[s]) for s in ("train", "val", "test")] == [19, 4, 4]
        for c in range(3):
            total = sum(v[c] for v in counts.values())
            held = [sum(counts[n][c] for n in splits[s]) / total for s in ("train", "val", "test")]
            assert held[0] > 0.6 and min(held[1:]) > 0.05, (seed, c, held)
    with pytest.raises(ValueError, match="class_counts has no entry for: train_9"):
        split_dataset(names, class_counts={n: v for n, v in counts.items() if n != "train_9"})
