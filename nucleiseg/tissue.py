"""Tissue detection on a slide thumbnail: where the slide path runs the model.

Definitions
-----------
saturation
    HSV saturation of a thumbnail pixel, 0-255 (OpenCV's ``RGB2HSV`` on 8-bit RGB): glass and white lumens are
    grey-white (low), stained tissue is pink to purple (high).
tissue mask
    Pixels whose saturation, smoothed by a Gaussian of one thumbnail pixel, exceeds Otsu's threshold of the
    thumbnail's saturation clipped to ``[min_saturation, max_saturation]``: the floor keeps an all-glass slide,
    whose Otsu threshold falls inside its noise, empty; the ceiling keeps a slide that is all tissue (no glass
    to separate from, so Otsu splits pale from dark tissue) whole. Then:
    pieces smaller than ``min_area_um2`` (or 5% of the thumbnail, on images too small for that) removed (dust),
    holes smaller than ``hole_area_um2`` filled (lumens, fat), and the result dilated by ``dilation_um`` (a
    disk) so that nuclei at the edge of a section, which the coarse thumbnail may miss, are inside. Areas and
    lengths are converted to thumbnail pixels with the thumbnail's mpp. A user's mask (:func:`read_mask`)
    replaces the whole computation.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OUTLINE_RGB = (0, 0, 0)


@dataclass(frozen=True)
class TissueSettings:
    """Tissue detection (params section ``slide.tissue``; definitions in the module docstring)."""

    mpp: float = 8.0  # thumbnail resolution, um per pixel
    min_saturation: int = 15
    max_saturation: int = 30
    min_area_um2: float = 20000.0
    hole_area_um2: float = 50000.0
    dilation_um: float = 50.0


def saturation(thumbnail: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(thumbnail), cv2.COLOR_RGB2HSV)[..., 1]


def detect_tissue(thumbnail: np.ndarray, mpp: float, settings: TissueSettings = TissueSettings()) -> np.ndarray:
    """The boolean tissue mask of an RGB ``uint8`` thumbnail at ``mpp`` um per pixel (module docstring)."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk, remove_small_holes, remove_small_objects

    thumbnail = np.asarray(thumbnail)
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or thumbnail.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 thumbnail, got {thumbnail.dtype} {thumbnail.shape}")
    sat = ndimage.gaussian_filter(saturation(thumbnail).astype(np.float32), sigma=1.0)
    otsu = float(threshold_otsu(sat)) if sat.min() != sat.max() else 0.0
    mask = sat > min(max(otsu, settings.min_saturation), settings.max_saturation)
    pixel_area = mpp * mpp
    # A slide no larger than a tile is all "dust" by the absolute size: never drop more than 5% of it by size.
    min_area = min(settings.min_area_um2 / pixel_area, 0.05 * mask.size)
    mask = remove_small_objects(mask, max_size=max(0, math.ceil(min_area) - 1))
    mask = remove_small_holes(mask, max_size=max(0, math.ceil(settings.hole_area_um2 / pixel_area) - 1))
    radius = round(settings.dilation_um / mpp)
    if radius > 0 and mask.any():
        mask = ndimage.binary_dilation(mask, structure=disk(radius))
    return mask


def read_mask(path: str | os.PathLike[str], shape: tuple[int, int]) -> np.ndarray:
    """A user's tissue mask (an image of any size, non-zero = tissue, e.g. exported from QuPath) resized to
    ``shape`` (the thumbnail's) by nearest neighbour. Raises ``ValueError`` naming the file when it cannot be
    read or its aspect ratio differs from the slide's by more than 2% (a mask of another slide)."""
    import cv2

    from nucleiseg.io import read_raw

    path = Path(path)
    try:
        array = read_raw(path)
    except ValueError as exc:
        raise ValueError(f"--mask {exc}") from None
    if array.ndim == 3:
        array = array.max(axis=2)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"--mask {path}: expected a 2-D image, got shape {array.shape}")
    slide_ratio, mask_ratio = shape[1] / shape[0], array.shape[1] / array.shape[0]
    if abs(mask_ratio / slide_ratio - 1) > 0.02:
        raise ValueError(
            f"--mask {path}: aspect ratio {array.shape[1]}x{array.shape[0]} differs from the slide's "
            f"({shape[1]}x{shape[0]} at the thumbnail's resolution): is it the mask of this slide?"
        )
    binary = (array > 0).astype(np.uint8)
    return cv2.resize(binary, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)


def outline(thumbnail: np.ndarray, mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The thumbnail with the mask's outline drawn over it (``width`` pixels, inside the mask)."""
    from scipy import ndimage

    out = np.array(thumbnail, copy=True)
    inner = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    out[mask & ~inner] = OUTLINE_RGB
    return out


__all__ = ["TissueSettings", "detect_tissue", "outline", "read_mask", "saturation"]
