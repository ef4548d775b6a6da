"""Training samples: augmentation of instance labels, targets and weights after it, the Dataset."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from nucleiseg.data import NucleiDataset, augment, build_augmentation, build_eval_transform, list_patches
from nucleiseg.labels import TARGET_CONTOUR, targets
from nucleiseg.prepare import write_patches
from nucleiseg.synth import synth_tile
from nucleiseg.weightmap import weight_map


@pytest.fixture(scope="module")
def tile() -> tuple[np.ndarray, np.ndarray]:
    image, label = synth_tile(3, 250, density=1500)
    assert len(np.unique(label)) > 30
    return image, label


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> list:
    image, label = synth_tile(4, 500, density=1500)
    other = np.zeros(label.shape, np.int32)
    other[100:140, 100:140] = 7  # an "other" nucleus on background
    out = tmp_path_factory.mktemp("patches")
    write_patches(image, label, other, out, "synth", size=250, grid=2)
    return list_patches(out)


def _contour_distance_to_inside(target: np.ndarray) -> np.ndarray:
    """Euclidean distance of every contour pixel to the nearest inside pixel."""
    inside = (target >= 1) & (target <= 3)
    distance = cv2.distanceTransform((~inside).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return distance[target == TARGET_CONTOUR]


@pytest.mark.parametrize("shift", [0, 70000])
def test_augmentation_moves_ids_without_blending(tile, shift: int) -> None:
    image, label = tile
    # Adding 3 * shift keeps every class; ids above 65535 go through the float32 path.
    label = np.where(label > 0, label + 3 * shift, 0).astype(np.int32)
    before = set(np.unique(label).tolist())
    transform = build_augmentation(crop=224, seed=0)
    sizes = []
    for _ in range(12):
        out_image, out_label, ignore = augment(transform, image, label)
        assert out_image.shape == (224, 224, 3) and out_image.dtype == np.uint8
        assert out_label.shape == (224, 224) and out_label.dtype == np.int32 and ignore is None
        after = set(np.unique(out_label).tolist())
        assert after <= before, sorted(after - before)[:5]
        sizes.append(len(after))
    assert min(sizes) > 5  # nuclei survived the warps


def test_ignore_map_follows_the_label(tile) -> None:
    image, label = tile
    other = np.zeros_like(label)
    other[label == 0] = 3  # the ignore map is exactly the background
    _, out_label, ignore = augment(build_augmentation(seed=1), image, label, other)
    assert ignore is not None and ignore.dtype == bool
    assert np.array_equal(ignore, out_label == 0)


def test_contours_stay_two_pixels_wide_because_targets_follow_the_warp(tile, tmp_path) -> None:
    image, label = tile
    zoom = dict(crop=224, scale=(1.5, 1.5), flip=False, rotate=0, affine_shear=0, elastic=False)
    # What the Dataset does: warp the label, then compute the target.
    _, warped_label, _ = augment(build_augmentation(**zoom, seed=0), image, label)
    good = targets(warped_label)
    assert (good == TARGET_CONTOUR).any()
    assert _contour_distance_to_inside(good).max() <= 2.0 + 1e-6
    # Warping a precomputed target instead would widen contours to 3 px at 1.5x.
    _, warped_target, _ = augment(build_augmentation(**zoom, seed=0), image, targets(label))
    assert _contour_distance_to_inside(warped_target.astype(np.uint8)).max() > 2.5


def test_dataset_sample_shapes_dtypes_and_consistency(patches) -> None:
    assert len(patches) == 4 and all(other is not None for *_, other in patches)
    mean, std = (0.7, 0.5, 0.7), (0.15, 0.2, 0.12)
    dataset = NucleiDataset(patches, build_augmentation(crop=224), mean=mean, std=std, w0=10, sigma=5)
    assert len(dataset) == 4
    image, target, weight = dataset.sample(0, seed=11)
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    assert target.shape == (224, 224) and target.dtype == torch.int64
    assert weight.shape == (224, 224) and weight.dtype == torch.float32
    assert 0 <= int(target.min()) and int(target.max()) <= 4 and (target == 4).any()
    assert float(weight.min()) >= 0 and float(weight.max()) > 1
    # Target and weight are those of the warped label (same seed, same warp).
    transform = build_augmentation(crop=224)
    transform.set_random_seed(11)
    from nucleiseg.io import read_image
    from nucleiseg.labels import read_label

    img_path, lab_path, other_path = patches[0]
    raw = read_image(img_path)
    warped_image, warped_label, ignore = augment(transform, raw, read_label(lab_path), read_label(other_path))
    assert torch.equal(target, torch.from_numpy(targets(warped_label).astype(np.int64)))
    expected_weight = np.where(ignore, 0, weight_map(warped_label, 10, 5))
    np.testing.assert_allclose(weight.numpy(), expected_weight, atol=1e-6)
    m, sd = np.reshape(mean, (3, 1, 1)), np.reshape(std, (3, 1, 1))
    expected_image = (warped_image.transpose(2, 0, 1) / 255.0 - m) / sd
    np.testing.assert_allclose(image.numpy(), expected_image, atol=1e-5)


def test_other_nuclei_get_zero_weight(patches) -> None:
    dataset = NucleiDataset(patches, build_eval_transform())
    weight = dataset[0][2]  # the patch at (0, 0) holds the "other" nucleus at 100:140
    assert torch.all(weight[100:140, 100:140] == 0)
    assert torch.all(weight[:90] > 0)
    kept = NucleiDataset(patches, build_eval_transform(), ignore_other=False)[0][2]
    assert torch.all(kept[100:140, 100:140] >= 1)


def test_seeded_samples_are_reproducible(patches) -> None:
    dataset = NucleiDataset(patches, build_augmentation(crop=224))
    a = dataset.sample(1, seed=5)
    b = dataset.sample(1, seed=5)
    c = dataset.sample(1, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_workers_do_not_repeat_each_others_augmentations(patches) -> None:
    dataset = NucleiDataset([patches[0]] * 6, build_augmentation(crop=224, seed=0))
    loader = DataLoader(dataset, batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(0))
    epochs = [[image for image, _, _ in loader] for _ in range(2)]
    flat = [x for epoch in epochs for x in epoch]
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            assert not torch.equal(flat[i], flat[j]), (i, j)


def test_eval_transform_is_deterministic_center_crop(patches) -> None:
    whole = NucleiDataset(patches, build_eval_transform())[2]
    cropped = NucleiDataset(patches, build_eval_transform(crop=224))[2]
    again = NucleiDataset(patches, build_eval_transform(crop=224))[2]
    assert whole[0].shape == (3, 250, 250) and cropped[0].shape == (3, 224, 224)
    assert all(torch.equal(x, y) for x, y in zip(cropped, again, strict=True))
    assert torch.equal(cropped[0], whole[0][:, 13:237, 13:237])


def test_mismatched_files_are_named(tmp_path, patches) -> None:
    from nucleiseg.labels import write_label

    small = tmp_path / "small_label.png"
    write_label(small, np.zeros((100, 100), np.int32))
    dataset = NucleiDataset([(patches[0][0], small)], build_eval_transform())
    with pytest.raises(ValueError, match=r"small_label\.png"):
        dataset[0]
    with pytest.raises(ValueError, match="scale"):
        build_augmentation(scale=(1.5, 0.75))
