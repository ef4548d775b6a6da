"""The label encoding of Qu et al. (ISBI 2019) and the training targets built from it.

Definitions
-----------
label
    A 2-D integer image the size of its H&E tile. ``0`` is background; every nucleus is a set of pixels
    sharing a unique positive id, and the nucleus's class is ``id % 3``: ``0`` tumor, ``1`` lymphocyte,
    ``2`` stroma (:data:`CLASS_NAMES`). On disk a label is a 16-bit PNG or TIFF (ids up to 65535, so 21,845
    nuclei of one class), or a 32-bit TIFF for larger ids (:func:`label_suffix` picks the format).
instance map
    A 2-D integer image with 0 background and one positive id per nucleus, with no meaning attached to the
    id; :func:`encode` turns an instance map plus a class per instance into a label.
targets
    The 5-class map the network is trained on (:func:`targets`): 0 background, 1/2/3 the inside of a tumor /
    lymphocyte / stroma nucleus, 4 the contour that separates touching nuclei. It reproduces the reference
    implementation (github.com/huiqu18/NucleiSegClas: ``create_labels_from_instance`` in ``prepare_data.py``
    then ``LabelBinarization2`` in ``my_transforms.py``) pixel for pixel.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from nucleiseg.io import ImageReadError, read_raw, write_image

CLASS_NAMES: tuple[str, str, str] = ("tumor", "lymphocyte", "stroma")
"""Class ``c`` of a nucleus with id ``i`` is ``CLASS_NAMES[i % 3]``."""

LABEL_SUFFIXES = (".png", ".tif", ".tiff")
MAX_LABEL_ID = 65535  # largest id a 16-bit label file can hold
MAX_TIFF_LABEL_ID = np.iinfo(np.int32).max  # a 32-bit TIFF label (read as int32)

# Target map values (see :func:`targets`).
TARGET_BACKGROUND = 0
TARGET_CONTOUR = 4
TARGET_NAMES: tuple[str, ...] = ("background", "tumor", "lymphocyte", "stroma", "contour")

# disk(2) of skimage.morphology: the reference's contour width.
_DISK2 = np.array(
    [
        [0, 0, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
        [0, 1, 1, 1, 0],
        [0, 0, 1, 0, 0],
    ],
    dtype=np.uint8,
)


class LabelError(ValueError):
    """A label is malformed (wrong shape, type or values). The message names the file and the problem."""


def _where(path: str | os.PathLike[str] | None) -> str:
    return f"{path}: " if path is not None else "label: "


def class_index(value: int | str) -> int:
    """The class index (0 tumor, 1 lymphocyte, 2 stroma) of a class given as an index or a name.

    Names are matched case-insensitively; a digit string such as ``"2"`` counts as an index.
    Raises :class:`ValueError` for anything else.
    """
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"not a class: {value!r}")
    if isinstance(value, (int, np.integer)):
        if 0 <= int(value) <= 2:
            return int(value)
        raise ValueError(f"class index must be 0, 1 or 2, got {value}")
    text = str(value).strip().lower()
    if text in CLASS_NAMES:
        return CLASS_NAMES.index(text)
    if text in ("0", "1", "2"):
        return int(text)
    raise ValueError(f"unknown class {value!r} (expected one of {', '.join(CLASS_NAMES)} or 0, 1, 2)")


# ----------------------------------------------------------------------------------------------------------
# Reading, writing, checking
# ----------------------------------------------------------------------------------------------------------


def _as_label(array: np.ndarray, path: str | os.PathLike[str] | None) -> np.ndarray:
    """Check an array read from a file or given by a caller and return it as int32 2-D."""
    where = _where(path)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        kind = "an RGB/multi-channel image" if array.ndim == 3 else f"a {array.ndim}-D array"
        raise LabelError(f"{where}a label must be a 2-D single-channel image, got {kind} of shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise LabelError(f"{where}a label must hold integer ids, got {array.dtype} values")
    if array.size and np.issubdtype(array.dtype, np.signedinteger) and array.min() < 0:
        raise LabelError(f"{where}a label must not hold negative values (min {int(array.min())})")
    if array.size and array.dtype.itemsize >= 4 and array.max() > np.iinfo(np.int32).max:
        raise LabelError(f"{where}id {int(array.max())} is too large for a label")
    return array.astype(np.int32, copy=False)


def read_label(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a label (16-bit PNG, or PNG/TIFF of any integer type) as an ``int32`` 2-D array.

    Raises :class:`LabelError` naming the file when it is missing, corrupt, RGB, or holds float or negative values.
    """
    try:
        array = read_raw(path)
    except ImageReadError as exc:
        raise LabelError(str(exc)) from exc
    return _as_label(np.asarray(array), path)


def label_files(folder: str | os.PathLike[str], suffix: str = "_label") -> dict[str, Path]:
    """The label files ``<name><suffix>.png|.tif|.tiff`` of a folder, by name. Two formats of one name (a stale
    16-bit PNG beside a 32-bit TIFF) are an error naming both: which one is meant cannot be guessed."""
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        stem = path.name[: -len(path.suffix)] if path.suffix else path.name
        if path.suffix.lower() not in LABEL_SUFFIXES or not stem.endswith(suffix) or not path.is_file():
            continue
        if path.name.startswith("."):  # hidden: a temporary file of a write in progress
            continue
        name = stem[: -len(suffix)]
        if name in found:
            raise LabelError(f"{found[name]} and {path}: two label files for {name!r}; remove the stale one")
        found[name] = path
    return found


def label_file(folder: str | os.PathLike[str], name: str, suffix: str = "_label") -> Path | None:
    """The label file of ``name`` in ``folder`` (``<name><suffix>.png``, ``.tif`` or ``.tiff``), or None."""
    return next((p for s in LABEL_SUFFIXES if (p := Path(folder) / f"{name}{suffix}{s}").is_file()), None)


def label_suffix(label: np.ndarray) -> str:
    """The file format a label needs: ``.png`` (16-bit) when its ids fit, else ``.tif`` (32-bit)."""
    array = np.asarray(label)
    return ".png" if not array.size or int(array.max()) <= MAX_LABEL_ID else ".tif"


def write_label(path: str | os.PathLike[str], label: np.ndarray) -> None:
    """Write a label as a PNG or TIFF (chosen by the suffix), atomically: 16-bit, or for a TIFF whose ids exceed
    65535, 32-bit.

    Raises :class:`LabelError` for PNG ids above 65535 (a 16-bit file cannot hold them; :func:`label_suffix`
    says which format a label needs), negative or float values, or another suffix.
    """
    path = Path(path)
    if path.suffix.lower() not in LABEL_SUFFIXES:
        raise LabelError(f"{path}: a label is written as .png, .tif or .tiff, not {path.suffix or 'no suffix'!r}")
    array = _as_label(np.asarray(label), path)
    largest = int(array.max()) if array.size else 0
    if largest > MAX_LABEL_ID and path.suffix.lower() == ".png":
        raise LabelError(
            f"{path}: id {largest} is above {MAX_LABEL_ID}, the largest a 16-bit PNG label can hold; write it as "
            ".tif (32-bit), or relabel the nuclei with consecutive ids (nucleiseg.labels.encode)"
        )
    write_image(path, array.astype(np.uint16 if largest <= MAX_LABEL_ID else np.uint32))


def validate_label(
    label: np.ndarray,
    path: str | os.PathLike[str] | None = None,
    image_shape: tuple[int, ...] | None = None,
) -> list[str]:
    """Check a label; return notes and warnings, raise :class:`LabelError` on an error.

    Errors (raised, message names ``path``): not 2-D, float or negative values, size different from
    ``image_shape`` (the tile's ``(H, W)`` or ``(H, W, 3)``).
    Warnings (returned and emitted with :func:`warnings.warn`): ids whose pixels form several disconnected
    pieces (8-connectivity), with the number of pieces.
    Notes (returned only): an empty label, which is allowed (a tile without nuclei).
    """
    where = _where(path)
    array = _as_label(np.asarray(label), path)
    if image_shape is not None and tuple(array.shape) != tuple(image_shape[:2]):
        raise LabelError(
            f"{where}label size {array.shape[0]}x{array.shape[1]} differs from the image size "
            f"{image_shape[0]}x{image_shape[1]}"
        )
    messages: list[str] = []
    if not array.any():
        messages.append(f"{where}empty label (no nuclei): allowed, the tile counts as all background")
        return messages
    pieces = _pieces_per_id(array)
    split = {i: n for i, n in pieces.items() if n > 1}
    if split:
        shown = ", ".join(f"id {i} ({n} pieces)" for i, n in list(split.items())[:10])
        more = f" and {len(split) - 10} more" if len(split) > 10 else ""
        message = f"{where}{len(split)} id(s) split into several disconnected pieces: {shown}{more}"
        warnings.warn(message, UserWarning, stacklevel=2)
        messages.append(message)
    return messages


def _pieces_per_id(label: np.ndarray) -> dict[int, int]:
    """Number of 8-connected pieces of every id (one pass over the image, not one per id)."""
    from skimage.measure import label as connected_components

    components = connected_components(label, background=0, connectivity=2)
    fg = label > 0
    pairs = np.unique(np.stack([label[fg], components[fg]]), axis=1)
    ids, counts = np.unique(pairs[0], return_counts=True)
    return {int(i): int(n) for i, n in zip(ids, counts, strict=True)}


# ----------------------------------------------------------------------------------------------------------
# Classes
# ----------------------------------------------------------------------------------------------------------


def classes_of(label: np.ndarray) -> dict[int, int]:
    """The class (0 tumor, 1 lymphocyte, 2 stroma) of every nucleus id present in ``label``, ascending ids."""
    ids = _present_ids(_as_label(np.asarray(label), None))
    return {int(i): int(i % 3) for i in ids}


def class_view(label: np.ndarray, c: int) -> np.ndarray:
    """``label`` keeping only the nuclei of class ``c`` (their ids unchanged); every other pixel is 0."""
    c = class_index(c)
    label = np.asarray(label)
    return np.where((label > 0) & (label % 3 == c), label, 0).astype(label.dtype, copy=False)


def _present_ids(instance_map: np.ndarray) -> np.ndarray:
    """Sorted positive ids present in a non-negative integer image."""
    if instance_map.size == 0:
        return np.zeros(0, dtype=np.int64)
    top = int(instance_map.max())
    if top <= 4 * instance_map.size + 65536:  # counting is O(n); sorting only for huge sparse ids
        counts = np.bincount(instance_map.ravel(), minlength=top + 1)
        ids = np.flatnonzero(counts)
    else:
        ids = np.unique(instance_map)
    return ids[ids > 0].astype(np.int64)


def encode(
    instance_map: np.ndarray,
    class_of_instance: Mapping[int, int],
    *,
    missing: Literal["error", "drop"] = "error",
) -> np.ndarray:
    """Turn an instance map and a class per instance into a label in the paper's encoding.

    Instances are visited in ascending order of their input id; the k-th tumor nucleus (k = 0, 1, ...) gets
    id ``3k + 3``, the k-th lymphocyte ``3k + 1``, the k-th stroma nucleus ``3k + 2``. Classes are indices
    (0, 1, 2) or names (:func:`class_index`). Entries of the mapping for ids absent from the map are ignored.

    ``missing``: what to do with instances that have no class in the mapping: ``"error"`` (default) raises
    :class:`LabelError` listing their ids; ``"drop"`` turns them into background.

    Returns an ``int32`` label. More than 21,845 nuclei of one class give ids above 65535, which
    :func:`write_label` refuses.
    """
    if missing not in ("error", "drop"):
        raise ValueError(f"missing must be 'error' or 'drop', got {missing!r}")
    inst = _as_label(np.asarray(instance_map), None)
    ids = _present_ids(inst)
    new_ids = np.zeros(len(ids), dtype=np.int64)
    next_rank = [0, 0, 0]
    unmapped: list[int] = []
    for k, i in enumerate(ids.tolist()):
        if i not in class_of_instance:
            unmapped.append(i)
            continue
        try:
            c = class_index(class_of_instance[i])
        except ValueError as exc:
            raise LabelError(f"instance {i}: {exc}") from exc
        new_ids[k] = 3 * next_rank[c] + (3 if c == 0 else c)
        next_rank[c] += 1
    if unmapped and missing == "error":
        shown = ", ".join(map(str, unmapped[:20])) + (f" and {len(unmapped) - 20} more" if len(unmapped) > 20 else "")
        raise LabelError(f"{len(unmapped)} instance(s) have no class: ids {shown}")
    return _relabel(inst, ids, new_ids).astype(np.int32)


def _relabel(instance_map: np.ndarray, ids: np.ndarray, new_ids: np.ndarray) -> np.ndarray:
    """Map every pixel of id ``ids[k]`` to ``new_ids[k]`` (other pixels to 0)."""
    if len(ids) == 0:
        return np.zeros(instance_map.shape, dtype=np.int64)
    top = int(ids[-1])
    if top <= 4 * instance_map.size + 65536:
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[ids] = new_ids
        return lut[instance_map]
    pos = np.clip(np.searchsorted(ids, instance_map), 0, len(ids) - 1)
    return np.where(ids[pos] == instance_map, new_ids[pos], 0)


def relabel_sequential(instance_map: np.ndarray) -> np.ndarray:
    """Give the instances ids 1..K in ascending order of their current ids (0 stays background)."""
    inst = _as_label(np.asarray(instance_map), None)
    ids = _present_ids(inst)
    return _relabel(inst, ids, np.arange(1, len(ids) + 1)).astype(np.int32)


# ----------------------------------------------------------------------------------------------------------
# Training targets
# ----------------------------------------------------------------------------------------------------------


def targets(label: np.ndarray) -> np.ndarray:
    """The 5-class training target of a label, exactly as the reference code builds it.

    1. For every nucleus n, ring(n) = dilation(n) AND NOT erosion(n), both with the 3x3 cross. Pixels beyond
       the image edge count as part of the nucleus for the erosion, so a nucleus cut by the tile edge gets no
       contour along it.
    2. Inside = nucleus pixels in no nucleus's ring; it keeps the nucleus's class.
    3. Contour = pixels that are not inside and lie within ``skimage.morphology.disk(2)`` of an inside pixel.
    4. Values: 0 background, 1 tumor inside, 2 lymphocyte inside, 3 stroma inside, 4 contour (``uint8``).

    Computed without a loop over nuclei: a pixel lies in some ring exactly when one of its in-image
    4-neighbours holds a different value and one of the two is a nucleus (if both were background they would
    be equal), so inside = nucleus pixels whose 4-neighbours all hold the same id.
    """
    lab = np.asarray(label)
    if lab.ndim != 2:
        raise LabelError(f"label: targets need a 2-D label, got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise LabelError(f"label: targets need integer ids, got {lab.dtype}")
    import cv2

    # Pixels with a 4-neighbour of another value; the edge of the image does not count.
    edge = np.zeros(lab.shape, dtype=bool)
    vertical = lab[1:, :] != lab[:-1, :]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    horizontal = lab[:, 1:] != lab[:, :-1]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    inside = (lab > 0) & ~edge

    out = np.zeros(lab.shape, dtype=np.uint8)
    out[inside] = (lab[inside] % 3).astype(np.uint8) + 1  # class 0/1/2 -> 1/2/3
    if lab.size:
        # Zero padding: pixels beyond the edge are never inside, as in the reference's dilation.
        near_inside = cv2.dilate(inside.view(np.uint8), _DISK2, borderType=cv2.BORDER_CONSTANT, borderValue=0)
        out[(near_inside > 0) & ~inside] = TARGET_CONTOUR
    return out


__all__ = [
    "CLASS_NAMES",
    "MAX_LABEL_ID",
    "TARGET_CONTOUR",
    "TARGET_NAMES",
    "LabelError",
    "class_index",
    "class_view",
    "classes_of",
    "encode",
    "label_file",
    "label_files",
    "label_suffix",
    "read_label",
    "relabel_sequential",
    "targets",
    "validate_label",
    "write_label",
]
