"""Training-set preparation: the train/val/test split, training patches, and input channel statistics.

Split
    Annotated images are split *by image* (never patches of one tile on both sides) into ``train``, ``val``
    and ``test``, either from fractions and a seed or from explicit lists. With the classes present in each
    image, the split is *stratified*: among up to ``tries`` seeded shuffles, the first is kept that leaves no
    class missing from any split, or else the one missing the fewest (a class missing from ``train`` counts
    first, since the model could never learn it); with the nuclei counted per class, among those the one whose
    splits hold the fairest shares of every class's nuclei (a tile holding half of all lymphocytes, such as
    CoNSeP's train_18, would otherwise land in a small test split as easily as in train). Images with no
    annotated nucleus of any class (CoNSeP's train_5 holds only "other" nuclei) always go to ``train``: they
    still teach background, but a validation or test image without nuclei has no detection F1 or Dice and
    would only dilute the scores. The result depends only on the set of names and the seed, not on their
    order.
Patches
    As the reference code (github.com/huiqu18/NucleiSegClas, ``split_patches``): ``grid`` x ``grid`` patches
    of ``size`` x ``size`` per image on a uniform grid with overlap; a 1000x1000 tile gives 16 patches of
    250x250 at origins 0, 250, 500, 750. Generalised to any image size: the origins along an axis are evenly
    spaced from 0 to ``H - size`` (rounded), so the first patch touches the top edge and the last the bottom
    one. Where ``grid`` patches cannot cover an axis (``H > grid * size``), more are used (``ceil(H / size)``)
    so that no annotated pixel is left out (the reference's formula would leave gaps there); fewer where
    ``H - size < grid - 1``, so that no two patches coincide. An axis shorter than ``size`` gets a single
    patch padded at the bottom/right: the image with white (255, like bare glass) and the label with
    background (0), so that image and label agree.
Channel statistics
    Mean and standard deviation of each RGB channel, in [0, 1] units, over all pixels of the (stain-
    normalised) training images, used to normalise network inputs. Computed exactly in one streaming pass:
    integer sums per image, combined across images with Chan et al.'s parallel update in float64.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from nucleiseg.io import write_image, write_json_atomic

SPLITS = ("train", "val", "test")
N_CLASSES = 3
IMAGE_FILL = 255  # white glass: what an H&E tile looks like where there is no tissue
LABEL_FILL = 0


# --- splits -----------------------------------------------------------------------------------------


def split_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """Number of images per split: largest remainders, then every split with a positive fraction gets at
    least one image while there are enough (taken from the largest split)."""
    fractions = [float(f) for f in fractions]
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be 3 non-negative numbers (train, val, test), got {fractions}")
    total = sum(fractions)
    exact = [n * f / total for f in fractions]
    sizes = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(SPLITS)), key=lambda k: (-(exact[k] - sizes[k]), k))
    for k in by_remainder[: n - sum(sizes)]:
        sizes[k] += 1
    wanted = [k for k in range(len(SPLITS)) if fractions[k] > 0]
    for k in wanted:
        if sizes[k] == 0:
            donor = max(range(len(SPLITS)), key=lambda j: (sizes[j], -j))
            if sizes[donor] > 1:
                sizes[donor] -= 1
                sizes[k] += 1
    return sizes


def _missing_classes(splits: Mapping[str, list[str]], classes_present: Mapping[str, set[int]]) -> tuple[int, int]:
    """(classes missing from train, (split, class) pairs missing overall), over non-empty splits."""
    missing_train = missing_total = 0
    for split, members in splits.items():
        if not members:
            continue
        present = set().union(*(classes_present[name] for name in members))
        missing = sum(1 for c in range(N_CLASSES) if c not in present)
        missing_total += missing
        if split == "train":
            missing_train = missing
    return missing_train, missing_total


def _imbalance(splits: Mapping[str, list[str]], counts: Mapping[str, Sequence[int]], n: int) -> float:
    """The largest gap, over classes and non-empty splits, between a split's share of a class's nuclei and
    its share of the images (0: every split holds its fraction of every class)."""
    worst = 0.0
    for c in range(N_CLASSES):
        total = sum(counts[name][c] for members in splits.values() for name in members)
        if total == 0:
            continue
        for members in splits.values():
            if members:
                share = sum(counts[name][c] for name in members) / total
                worst = max(worst, abs(share - len(members) / n))
    return worst


def split_dataset(
    names: Sequence[str],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    explicit: Mapping[str, Sequence[str]] | None = None,
    classes_present: Mapping[str, set[int]] | None = None,
    tries: int = 1000,
    class_counts: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, list[str]]:
    """Split image names into ``{"train": [...], "val": [...], "test": [...]}`` by image.

    ``explicit`` lists are used as given, after checking that every name is known and appears once (a
    :class:`ValueError` names the offenders); images in no list are left out with a warning.
    Otherwise the names are shuffled with ``seed`` and cut by ``fractions`` (:func:`split_sizes`); with
    ``classes_present`` (name -> set of class indices 0..2 in its label) the shuffle is chosen to keep every
    class in every split where possible (see the module docstring). Deterministic for a given set of names
    and seed. ``class_counts`` (name -> nuclei per class) implies ``classes_present`` and also balances the
    nuclei: among the shuffles that miss the fewest classes, the one whose splits hold shares of each class's
    nuclei closest to their shares of the images (:func:`_imbalance`) is kept.
    """
    names = list(names)
    if class_counts is not None:
        missing = [n for n in names if n not in class_counts]
        if missing:
            raise ValueError(f"class_counts has no entry for: {', '.join(missing)}")
        counts = {n: [int(k) for k in class_counts[n]] for n in names}
        if any(len(k) != N_CLASSES or min(k) < 0 for k in counts.values()):
            raise ValueError(f"class_counts must give {N_CLASSES} non-negative counts per image")
        classes_present = {n: {c for c in range(N_CLASSES) if counts[n][c] > 0} for n in names}
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"duplicated image names: {', '.join(duplicated)}")
    if explicit is not None:
        return _explicit_split(names, explicit)

    pool = sorted(names)
    sizes = split_sizes(len(pool), fractions)
    rng = np.random.default_rng(seed)

    def cut(order: Sequence[int]) -> dict[str, list[str]]:
        bounds = np.cumsum([0, *sizes])
        return {s: sorted(pool[i] for i in order[bounds[k] : bounds[k + 1]]) for k, s in enumerate(SPLITS)}

    if classes_present is None:
        return cut(rng.permutation(len(pool)))
    unknown = [n for n in pool if n not in classes_present]
    if unknown:
        raise ValueError(f"classes_present has no entry for: {', '.join(unknown)}")
    bad = {n: c for n, c in classes_present.items() if not set(c) <= set(range(N_CLASSES))}
    if bad:
        raise ValueError(f"classes must be 0, 1 or 2; got {bad}")
    present = {n: set(classes_present[n]) for n in pool}
    # Unscoreable images (no nucleus of any class) train; the others fill the rest of each split.
    unscoreable = [n for n in pool if not present[n]]
    if unscoreable and len(unscoreable) < len(pool):
        pool = [n for n in pool if present[n]]
        val, test = sizes[1], sizes[2]
        while val + test > max(len(pool) - 1, 0):  # train keeps at least one scoreable image
            val, test = (val - 1, test) if val > test else (val, test - 1)
        sizes = [len(pool) - val - test, val, test]
    # The best any split can do: a class found in m images can reach at most m of the non-empty splits.
    n_splits = sum(1 for size in sizes if size > 0)
    in_images = [sum(1 for n in pool if c in present[n]) for c in range(N_CLASSES)]
    bound = (sum(1 for m in in_images if m == 0), sum(max(0, n_splits - m) for m in in_images))
    best, best_score = None, None
    for _ in range(max(1, tries)):
        candidate = cut(rng.permutation(len(pool)))
        score = _missing_classes(candidate, present)
        if class_counts is not None:
            score = (*score, _imbalance(candidate, counts, len(pool)))
        if best_score is None or score < best_score:
            best, best_score = candidate, score
        if class_counts is None and score == bound:
            break
    assert best is not None
    if unscoreable and len(unscoreable) < len(present):
        best["train"] = sorted(best["train"] + unscoreable)
    return best


def _explicit_split(names: list[str], explicit: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    unknown_splits = sorted(set(explicit) - set(SPLITS))
    if unknown_splits:
        raise ValueError(f"unknown split name(s) {', '.join(unknown_splits)}; expected train, val, test")
    known = set(names)
    stems = {Path(n).stem: n for n in names}
    splits: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    unknown: list[str] = []
    repeated: list[str] = []
    for split in SPLITS:
        members: list[str] = []
        for raw in explicit.get(split, []) or []:
            # "train_1.png" and "train_1" both name the image train_1.
            name = raw if raw in known else stems.get(Path(raw).stem)
            if name is None:
                unknown.append(f"{raw} ({split})")
            elif name in seen:
                repeated.append(f"{raw} ({seen[name]} and {split})" if seen[name] != split else f"{raw} ({split})")
            else:
                seen[name] = split
                members.append(name)
        splits[split] = members
    if unknown or repeated:
        problems = []
        if unknown:
            problems.append(f"unknown image(s): {', '.join(unknown)}")
        if repeated:
            problems.append(f"image(s) listed more than once: {', '.join(repeated)}")
        raise ValueError("explicit split: " + "; ".join(problems))
    if not splits["train"]:
        raise ValueError("explicit split: the train list is empty")
    left_out = sorted(known - set(seen))
    if left_out:
        warnings.warn(f"explicit split leaves out {len(left_out)} image(s): {', '.join(left_out)}", UserWarning, 2)
    return splits


def write_splits(path: str | os.PathLike[str], splits: Mapping[str, Sequence[str]]) -> None:
    """Write the split as JSON (``{"train": [...], "val": [...], "test": [...]}``), atomically."""
    write_json_atomic(path, {s: list(splits.get(s, [])) for s in SPLITS})


def read_splits(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read a split written by :func:`write_splits`; errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable splits JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(s, []), list) for s in SPLITS):
        raise ValueError(f"{path}: expected {{'train': [...], 'val': [...], 'test': [...]}}")
    return {s: [str(n) for n in data.get(s, [])] for s in SPLITS}


# --- patches ----------------------------------------------------------------------------------------


def _axis_origins(length: int, size: int, grid: int) -> list[int]:
    if length <= size:
        return [0]
    # At least ``grid`` patches, more if needed to cover the axis, never two at the same place.
    n = min(max(grid, math.ceil(length / size)), length - size + 1)  # >= 2 here
    return [round(k * (length - size) / (n - 1)) for k in range(n)]


def grid_patches(image: np.ndarray | tuple[int, ...], size: int = 250, grid: int = 4) -> list[tuple[int, int]]:
    """Top-left ``(y, x)`` origins of the patch grid of an image (an array or its shape), row by row.

    See the module docstring: evenly spaced from 0 to ``H - size`` (0, 250, 500, 750 for 1000 px, 250, 4),
    more than ``grid`` per axis only where needed to cover it, a single origin 0 on an axis shorter than
    ``size``.
    """
    shape = image.shape if isinstance(image, np.ndarray) else tuple(image)
    if len(shape) < 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"expected an image or an (H, W) shape, got {shape}")
    if size < 1 or grid < 1:
        raise ValueError(f"size and grid must be positive, got size={size}, grid={grid}")
    ys = _axis_origins(int(shape[0]), size, grid)
    xs = _axis_origins(int(shape[1]), size, grid)
    return [(y, x) for y in ys for x in xs]


def extract_patches(
    array: np.ndarray, origins: Iterable[tuple[int, int]], size: int = 250, fill: int | float = 0
) -> list[np.ndarray]:
    """Cut ``size`` x ``size`` patches (2-D or H x W x C) at ``origins``; parts beyond the image are
    ``fill`` (only when the image is smaller than ``size``)."""
    h, w = array.shape[:2]
    if h < size or w < size:
        pad = [(0, max(0, size - h)), (0, max(0, size - w))] + [(0, 0)] * (array.ndim - 2)
        array = np.pad(array, pad, mode="constant", constant_values=fill)
    patches = []
    for y, x in origins:
        if y < 0 or x < 0 or y + size > array.shape[0] or x + size > array.shape[1]:
            raise ValueError(f"patch at ({y}, {x}) of size {size} does not fit in an image of {h}x{w}")
        patches.append(np.ascontiguousarray(array[y : y + size, x : x + size]))
    return patches


def write_patches(
    image: np.ndarray,
    label: np.ndarray,
    other: np.ndarray | None,
    out_dir: str | os.PathLike[str],
    name: str,
    size: int = 250,
    grid: int = 4,
) -> list[tuple[Path, Path, Path | None]]:
    """Cut an image, its label and (optionally) its ``_other`` ignore map into grid patches and write them
    as ``<name>_p<k>.png``, ``<name>_p<k>_label.png`` and ``<name>_p<k>_other.png`` (16-bit), atomically.

    Returns ``(image, label, other or None)`` paths per patch, in grid order (k = 0, 1, ...).
    """
    from nucleiseg.labels import write_label

    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: expected an RGB image H x W x 3, got shape {image.shape}")
    for what, array in (("label", label), ("other", other)):
        if array is not None and array.shape != image.shape[:2]:
            raise ValueError(f"{name}: {what} size {array.shape} differs from the image size {image.shape[:2]}")
    out_dir = Path(out_dir)
    origins = grid_patches(image, size, grid)
    image_patches = extract_patches(image, origins, size, IMAGE_FILL)
    label_patches = extract_patches(label, origins, size, LABEL_FILL)
    other_patches = extract_patches(other, origins, size, LABEL_FILL) if other is not None else None
    written: list[tuple[Path, Path, Path | None]] = []
    for k in range(len(origins)):
        image_path = out_dir / f"{name}_p{k}.png"
        label_path = out_dir / f"{name}_p{k}_label.png"
        write_image(image_path, image_patches[k])
        write_label(label_path, label_patches[k])
        other_path = None
        if other_patches is not None:
            other_path = out_dir / f"{name}_p{k}_other.png"
            write_label(other_path, other_patches[k])
        written.append((image_path, label_path, other_path))
    return written


# --- channel statistics -----------------------------------------------------------------------------


def channel_stats(images: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and (population) std of RGB images, in [0, 1] units, in one streaming pass.

    ``uint8`` images are divided by 255; float images are taken as already in [0, 1]. Each image's sums are
    exact (integers for ``uint8``); images are merged with Chan et al.'s pairwise update, which does not
    lose precision the way ``E[x^2] - E[x]^2`` does.
    """
    count = 0
    mean = np.zeros(3)
    m2 = np.zeros(3)  # sum of squared deviations from the mean
    for k, image in enumerate(images):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {k}: expected H x W x 3, got shape {image.shape}")
        pixels = image.reshape(-1, 3)
        n = pixels.shape[0]
        if n == 0:
            continue
        if image.dtype == np.uint8:
            wide = pixels.astype(np.int64)
            # Exact integer sums; n * ss - s^2 in Python integers (it overflows int64 beyond ~10^7 pixels).
            s = [int(v) for v in wide.sum(axis=0)]
            ss = [int(v) for v in np.einsum("ij,ij->j", wide, wide)]
            img_mean = np.array([v / (255.0 * n) for v in s])
            img_m2 = np.array([(n * q - v * v) / (n * 255.0**2) for v, q in zip(s, ss, strict=True)])
        else:
            values = pixels.astype(np.float64)
            img_mean = values.mean(axis=0)
            img_m2 = ((values - img_mean) ** 2).sum(axis=0)
        total = count + n
        delta = img_mean - mean
        mean = mean + delta * (n / total)
        m2 = m2 + img_m2 + delta**2 * (count * n / total)
        count = total
    if count == 0:
        raise ValueError("channel_stats: no pixels (empty list of images)")
    return mean, np.sqrt(m2 / count)


def write_stats(path: str | os.PathLike[str], mean: Sequence[float], std: Sequence[float]) -> None:
    """Write channel statistics as JSON ``{"mean": [r, g, b], "std": [r, g, b]}`` ([0, 1] units), atomically."""
    write_json_atomic(path, {"mean": [float(m) for m in mean], "std": [float(s) for s in std], "units": "[0, 1]"})


def read_stats(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read channel statistics written by :func:`write_stats`; errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        mean = np.asarray(data["mean"], dtype=np.float64)
        std = np.asarray(data["std"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable channel statistics JSON ({exc!r})") from None
    if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
        raise ValueError(f"{path}: expected 3 means and 3 positive stds, got {data}")
    return mean, std
