"""Training samples: patches read from disk, augmented, and turned into (image, target, weight map).

A sample is built in this order, so that the training targets always match the augmented geometry:

1. read the RGB patch, its *instance* label (paper encoding, ids up to 65535) and, when present, its
   ``_other`` ignore map;
2. augment image and label together (:func:`build_augmentation`): flips, one affine warp (isotropic
   scale, rotation, shear), elastic deformation, random crop, optional colour jitter (image only). The label
   goes through every geometric transform with nearest-neighbour interpolation, as ``uint16`` (``float32``
   for ids above 65535, exact up to 2^24), so ids are moved, never blended, and no new id appears.
   Borders are filled by reflection, of the image and of the label alike, so they stay consistent;
3. compute the 5-class target (:func:`nucleiseg.labels.targets`, contours 2 px wide) and the loss weight
   map (:func:`nucleiseg.weightmap.weight_map`, paper eq. 2) from the augmented label, times an optional
   per-class factor (:func:`class_weights`). The weight is 0 on pixels of ``_other`` nuclei (debris,
   unclassifiable), which the loss then ignores, since they are nuclei that the label calls background;
4. normalise the image with the channel statistics of the training set.

Randomness: augmentations draw from the transform's own generator (albumentations ignores global seeds).
:meth:`NucleiDataset.sample` with a ``seed`` reseeds it, so a sample is a pure function of
``(index, seed)`` in any process; without a seed, each DataLoader worker reseeds it once from
``torch.initial_seed()`` (different per worker and per epoch), because workers otherwise start from
copies of the same generator state and would repeat each other's augmentations.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

# Albumentations otherwise asks PyPI for a newer version on import (a network call in a library import).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2

from nucleiseg.io import read_image

_EXACT_FLOAT32_ID = 2**24  # largest integer range float32 holds exactly
_BORDER = cv2.BORDER_REFLECT_101

PatchItem = (
    tuple[str | os.PathLike[str], str | os.PathLike[str]]
    | tuple[str | os.PathLike[str], str | os.PathLike[str], str | os.PathLike[str] | None]
)


def build_augmentation(
    crop: int = 224,
    scale: Sequence[float] = (0.75, 1.5),
    flip: bool = True,
    rotate: float = 90.0,
    affine_shear: float = 5.0,
    elastic: bool = True,
    elastic_alpha: float = 30.0,
    elastic_sigma: float = 6.0,
    color_jitter: float = 0.0,
    seed: int | None = None,
) -> A.Compose:
    """The training augmentation (settings as in ``params.yaml``'s ``augmentation`` section).

    - ``flip``: horizontal and vertical flips, each with probability 0.5;
    - one affine warp, always applied: isotropic scale uniform in ``scale``, rotation uniform in
      ``[-rotate, rotate]`` degrees, shear uniform in ``[-affine_shear, affine_shear]`` degrees (one warp
      rather than three: one interpolation of the image);
    - ``elastic``: albumentations' elastic deformation (``elastic_alpha``, ``elastic_sigma``), always applied;
    - a random ``crop`` x ``crop`` window (reflect-padded if the patch is smaller);
    - ``color_jitter`` > 0: brightness, contrast and saturation factors in ``1 ± color_jitter`` and a hue
      shift up to ``color_jitter / 4`` (H&E hues vary less than their intensity), image only.

    Masks use nearest-neighbour interpolation throughout. Normalisation is done by :class:`NucleiDataset`.
    """
    lo, hi = (float(scale[0]), float(scale[1])) if len(scale) == 2 else (None, None)
    if lo is None or not 0 < lo <= hi:
        raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {scale}")
    if crop < 1:
        raise ValueError(f"crop must be positive, got {crop}")
    transforms: list[A.BasicTransform] = []
    if flip:
        transforms += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if (lo, hi) != (1.0, 1.0) or rotate > 0 or affine_shear > 0:
        transforms.append(
            A.Affine(
                scale=(lo, hi),
                keep_ratio=True,
                rotate=(-rotate, rotate),
                shear=(-affine_shear, affine_shear),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=_BORDER,
                p=1.0,
            )
        )
    if elastic:
        transforms.append(
            A.ElasticTransform(
                alpha=elastic_alpha,
                sigma=elastic_sigma,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=_BORDER,
                p=1.0,
            )
        )
    transforms.append(A.RandomCrop(crop, crop, pad_if_needed=True, border_mode=_BORDER))
    if color_jitter > 0:
        c = float(color_jitter)
        transforms.append(A.ColorJitter(brightness=c, contrast=c, saturation=c, hue=min(0.5, c / 4), p=1.0))
    return A.Compose(transforms, mask_interpolation=cv2.INTER_NEAREST, seed=seed)


def build_eval_transform(crop: int | None = None) -> A.Compose:
    """No augmentation: the whole patch, or its central ``crop`` x ``crop`` window (reflect-padded)."""
    transforms = [] if crop is None else [A.CenterCrop(crop, crop, pad_if_needed=True, border_mode=_BORDER)]
    return A.Compose(transforms, mask_interpolation=cv2.INTER_NEAREST)


def _label_as_mask(label: np.ndarray, path: Any = None) -> np.ndarray:
    """An instance label in a dtype every OpenCV warp supports and interpolates nearest without loss."""
    top = int(label.max()) if label.size else 0
    if top <= np.iinfo(np.uint16).max:
        return label.astype(np.uint16)
    if top < _EXACT_FLOAT32_ID:
        return label.astype(np.float32)
    raise ValueError(f"{path or 'label'}: id {top} is too large to augment exactly (max {_EXACT_FLOAT32_ID - 1})")


def augment(
    transform: Callable[..., dict[str, Any]] | None,
    image: np.ndarray,
    label: np.ndarray,
    other: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Apply an albumentations transform to an image, its instance label and an optional ignore map.

    Returns the image (uint8 RGB), the label (int32, ids moved, never blended) and the ignore map (bool).
    """
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape} differ in size")
    if transform is None:
        return image, label.astype(np.int32, copy=False), None if other is None else other > 0
    mask = _label_as_mask(label)
    if other is not None:
        if other.shape != label.shape:
            raise ValueError(f"ignore map {other.shape} and label {label.shape} differ in size")
        mask = np.stack([mask, (other > 0).astype(mask.dtype)], axis=-1)
    out = transform(image=image, mask=mask)
    mask = out["mask"]
    if other is None:
        return out["image"], mask.astype(np.int32), None
    return out["image"], mask[..., 0].astype(np.int32), mask[..., 1] > 0


class NucleiDataset(Dataset):
    """Patches as ``(image, target, weight)``: ``float32 3 x H x W`` normalised with ``mean``/``std`` (in
    [0, 1] units), ``int64 H x W`` in 0..4 (:func:`nucleiseg.labels.targets`), ``float32 H x W`` (paper
    eq. 2 with ``w0``, ``sigma``; 0 on ``_other`` nuclei when ``ignore_other``).

    ``items``: ``(image path, label path)`` or ``(image path, label path, other path or None)`` per patch
    (see :func:`list_patches`). ``transform``: :func:`build_augmentation` for training,
    :func:`build_eval_transform` or ``None`` otherwise.
    """

    def __init__(
        self,
        items: Sequence[PatchItem],
        transform: Callable[..., dict[str, Any]] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        w0: float = 10.0,
        sigma: float = 5.0,
        ignore_other: bool = True,
        class_weight: Sequence[float] | None = None,
    ) -> None:
        self.items = [_as_item(item) for item in items]
        self.class_weight = None if class_weight is None else np.asarray(class_weight, dtype=np.float32)
        if self.class_weight is not None and (self.class_weight.shape != (5,) or np.any(self.class_weight <= 0)):
            raise ValueError(f"class_weight must be 5 positive numbers, got {class_weight}")
        self.transform = transform
        self.mean = np.asarray(mean if mean is not None else (0.0, 0.0, 0.0), dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std if std is not None else (1.0, 1.0, 1.0), dtype=np.float32).reshape(3, 1, 1)
        if np.any(self.std <= 0):
            raise ValueError(f"std must be positive, got {std}")
        self.w0 = float(w0)
        self.sigma = float(sigma)
        self.ignore_other = ignore_other
        self._worker_seed: int | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.sample(index)

    def _reseed_in_worker(self) -> None:
        info = torch.utils.data.get_worker_info()
        if info is None or not hasattr(self.transform, "set_random_seed"):
            return
        seed = torch.initial_seed() % 2**32  # base_seed + worker id: new every epoch
        if seed != self._worker_seed:
            self.transform.set_random_seed(seed)
            self._worker_seed = seed

    def sample(self, index: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample ``index``; with ``seed``, its augmentation depends only on ``(index, seed)``."""
        from nucleiseg.labels import read_label, targets
        from nucleiseg.weightmap import weight_map

        image_path, label_path, other_path = self.items[index]
        image = read_image(image_path)
        label = read_label(label_path)
        other = read_label(other_path) if other_path is not None else None
        if image.shape[:2] != label.shape:
            raise ValueError(f"{label_path}: label size {label.shape} differs from {image_path} {image.shape[:2]}")
        if other is not None and other.shape != label.shape:
            raise ValueError(f"{other_path}: size {other.shape} differs from {label_path} {label.shape}")
        if seed is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)
        else:
            self._reseed_in_worker()
        image, label, ignore = augment(self.transform, image, label, other)

        target = targets(label)
        weight = np.asarray(weight_map(label, self.w0, self.sigma), dtype=np.float32)
        if self.class_weight is not None:
            weight = weight * self.class_weight[target]
        if ignore is not None and self.ignore_other:
            weight = np.where(ignore, np.float32(0), weight)
        pixels = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)
        pixels = (pixels - self.mean) / self.std
        return (
            torch.from_numpy(pixels),
            torch.from_numpy(target.astype(np.int64)),
            torch.from_numpy(np.ascontiguousarray(weight)),
        )


def target_frequencies(label_paths: Sequence[str | os.PathLike[str]]) -> np.ndarray:
    """The share of each of the 5 target classes (:func:`nucleiseg.labels.targets`) over all pixels of the
    given labels."""
    from nucleiseg.labels import read_label, targets

    counts = np.zeros(5, dtype=np.int64)
    for path in label_paths:
        counts += np.bincount(targets(read_label(path)).ravel(), minlength=5)[:5]
    if counts.sum() == 0:
        raise ValueError("no labelled pixels to count class frequencies on")
    return counts / counts.sum()


def class_weights(frequencies: Sequence[float]) -> np.ndarray:
    """Balanced per-class loss factors: ``f_c ** -0.5``, scaled so that their mean over pixels
    (``sum_c f_c · w_c``) is 1, which keeps the loss on the scale of the unweighted one.

    The square root tempers plain inverse frequency: on CoNSeP the rarest inside class (stroma, ~2% of the
    pixels) gets ~3x the weight of background, not ~40x, which would trade precision for recall. A class
    absent from the training set gets the largest weight of the others."""
    freq = np.asarray(frequencies, dtype=np.float64)
    present = freq > 0
    if not present.any():
        raise ValueError("every class frequency is 0")
    raw = np.zeros_like(freq)
    raw[present] = freq[present] ** -0.5
    raw[~present] = raw[present].max()
    return (raw / float((freq * raw).sum())).astype(np.float32)


def _as_item(item: Sequence[Any]) -> tuple[Path, Path, Path | None]:
    if len(item) == 2:
        return Path(item[0]), Path(item[1]), None
    if len(item) == 3:
        return Path(item[0]), Path(item[1]), Path(item[2]) if item[2] is not None else None
    raise ValueError(f"a patch item is (image, label) or (image, label, other), got {item!r}")


def list_patches(folder: str | os.PathLike[str]) -> list[tuple[Path, Path, Path | None]]:
    """The patches written by :func:`nucleiseg.prepare.write_patches` in ``folder``:
    ``(image, label, other or None)``, sorted. A patch without its label is an error naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: patch folder not found")
    items = []
    for image in sorted(folder.glob("*.png")):
        if image.stem.endswith(("_label", "_other")):
            continue
        label = image.with_name(f"{image.stem}_label.png")
        if not label.is_file():
            raise FileNotFoundError(f"{image}: no label patch {label.name}")
        other = image.with_name(f"{image.stem}_other.png")
        items.append((image, label, other if other.is_file() else None))
    return items
