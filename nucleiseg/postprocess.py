"""Post-processing: from the network's 5 maps to a nuclei label in the paper's encoding.

The steps of the reference code (``test.py`` in github.com/huiqu18/NucleiSegClas), vectorised:

1. **Argmax** of the 5 maps (0 background, 1/2/3 inside tumor / lymphocyte / stroma, 4 contour); contour
   pixels count as background from here on.
2. **Nuclei** are the connected components of the inside pixels (classes 1-3 together), 8-connected as in
   the reference's ``skimage.measure.label``. Touching nuclei are kept apart by the contour class between them.
3. **Class** of a nucleus: the majority vote of its pixels' classes (one ``bincount`` over all nuclei); a tie
   goes to the first class in the order tumor, lymphocyte, stroma (``numpy.argmax``, as the reference).
4. **Small objects**: nuclei of fewer than ``min_area`` pixels are removed. The reference removes them per
   class mask; since every nucleus has a single class and nuclei never touch, that is the same as per nucleus
   (the reference's ``remove_small_objects`` measures 4-connected pieces; here the whole nucleus is measured).
5. **Ids** in the paper's encoding (``id % 3`` = class) with :func:`nucleiseg.labels.encode`: the k-th nucleus
   of a class in raster order of its first pixel gets ``3k + 3`` (tumor), ``3k + 1`` (lymphocyte) or ``3k + 2``
   (stroma), the numbering the reference's per-class labelling produces.
6. **Dilation** by a disk of ``radius`` (``skimage.morphology.disk``: offsets with dy² + dx² <= radius²), into
   background only. The reference dilates the label as a grey image, which lets a larger id grow over a
   touching neighbour; here nuclei never overwrite each other: a background pixel within the radius of one or
   more nuclei joins the nearest (Euclidean offset), and among equally near nuclei the largest id (the
   reference's grey-dilation choice). Where nuclei are more than ``2 * radius`` apart it equals the reference.

That is ``method="paper", classify="vote"``, the default. Two options go beyond the paper (they need the
probability maps, not just their argmax):

- ``classify="probability"``: step 3 takes, for each nucleus, the class whose inside probability summed
  over the nucleus's pixels is largest (the mean softmax, which keeps the network's confidence that a vote
  throws away: a stroma nucleus whose pixels lean 45/55 between stroma and lymphocyte is not decided by
  which side wins more pixels by a hair).
- ``method="watershed"`` (:func:`watershed_instances`), a marker-controlled watershed on the network's own
  maps, for touching nuclei whose contour the network only half predicts. With ``inside = p1 + p2 + p3``
  (the probability of being inside a nucleus, whatever its class) and ``contour = p4``:

  * nucleus pixels: ``inside > mask_threshold`` (classes pooled, so a pixel torn between two classes is not
    lost to background as in the 5-way argmax);
  * markers: the connected components of ``inside - contour > marker_threshold`` (the confident cores,
    which a half-predicted contour still cuts apart) with at least ``marker_min_area`` pixels;
  * flooding: ``skimage.segmentation.watershed`` on the negated distance to the nearest non-nucleus pixel,
    from the markers, limited to nucleus pixels, so that the cut between two cores falls on the neck;
    nucleus pixels that no marker reaches keep their own connected component;
  * then steps 3-6 as above (class, ``min_area``, ids, dilation by ``radius``).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

INSIDE_CLASSES = (1, 2, 3)  # map values of the inside of tumor, lymphocyte, stroma nuclei
_STRIP_ROWS = 1024  # rows per block in the dilation, to bound temporary memory on huge images


def class_map(pred: np.ndarray) -> np.ndarray:
    """The 5-class map ``(H, W)`` uint8: ``pred`` itself when it is already one, else the argmax of
    ``(5, H, W)`` maps (probabilities or logits)."""
    pred = np.asarray(pred)
    if pred.ndim == 3:
        if pred.shape[0] != 5:
            raise ValueError(f"expected 5 maps (5, H, W), got shape {pred.shape}")
        return np.argmax(pred, axis=0).astype(np.uint8)
    if pred.ndim != 2 or not np.issubdtype(pred.dtype, np.integer):
        raise ValueError(f"expected (5, H, W) maps or an (H, W) integer class map, got {pred.dtype} {pred.shape}")
    if pred.size and (pred.min() < 0 or pred.max() > 4):
        raise ValueError(f"class map values must be 0-4, got {pred.min()}..{pred.max()}")
    return pred.astype(np.uint8, copy=False)


def _components(classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 2-3: 8-connected components of the inside pixels (``int32``, 0 elsewhere), and per component
    number (index 0: background) its area and its majority class (0 tumor, 1 lymphocyte, 2 stroma)."""
    from scipy import ndimage

    inside = (classes >= 1) & (classes <= 3)
    components, _ = ndimage.label(inside, structure=np.ones((3, 3), dtype=bool), output=np.int32)
    del inside
    area, nucleus_class = _instance_classes(components, classes, "vote")
    return components, area, nucleus_class


def _check_probabilities(pred: np.ndarray, what: str) -> np.ndarray:
    pred = np.asarray(pred)
    if pred.ndim != 3 or pred.shape[0] != 5 or not np.issubdtype(pred.dtype, np.floating):
        raise ValueError(f"{what} needs the (5, H, W) probability maps, got {pred.dtype} {pred.shape}")
    return pred


def watershed_instances(
    probs: np.ndarray, mask_threshold: float = 0.5, marker_threshold: float = 0.3, marker_min_area: int = 4
) -> np.ndarray:
    """Instances (``int32``, 0 background, ids 1..n) by the marker-controlled watershed of the module
    docstring, from ``(5, H, W)`` softmax maps."""
    from scipy import ndimage
    from skimage.segmentation import watershed

    probs = _check_probabilities(probs, "the watershed")
    inside = probs[1:4].sum(axis=0, dtype=np.float32)
    contour = probs[4].astype(np.float32, copy=False)
    mask = inside > mask_threshold
    core = (inside - contour > marker_threshold) & mask
    eight = np.ones((3, 3), dtype=bool)
    markers, n = ndimage.label(core, structure=eight, output=np.int32)
    if n and marker_min_area > 1:
        small = np.bincount(markers.ravel(), minlength=n + 1) < marker_min_area
        small[0] = False
        markers[small[markers]] = 0
    distance = ndimage.distance_transform_edt(mask)
    label = watershed(-distance, markers, mask=mask, connectivity=2)
    # Nucleus pixels no marker reached (no confident core): their own components, numbered after the markers.
    rest, n_rest = ndimage.label(mask & (label == 0), structure=eight, output=np.int32)
    if n_rest:
        top = int(label.max())
        label[rest > 0] = rest[rest > 0] + top
    return label.astype(np.int32, copy=False)


def _instance_classes(instances: np.ndarray, pred: np.ndarray, classify: str) -> tuple[np.ndarray, np.ndarray]:
    """Per instance id (index 0: background): area and class (0 tumor, 1 lymphocyte, 2 stroma), by the
    majority of the pixels' argmax classes (``vote``) or by the summed inside probabilities (``probability``).
    """
    n = int(instances.max()) if instances.size else 0
    flat = instances.ravel()
    area = np.bincount(flat, minlength=n + 1)
    fg = flat > 0
    ids = flat[fg]
    if classify == "probability":
        probs = _check_probabilities(pred, "classify='probability'")
        scores = np.stack(
            [np.bincount(ids, weights=probs[c].ravel()[fg], minlength=n + 1) for c in INSIDE_CLASSES], axis=1
        )
    elif classify == "vote":
        classes = class_map(pred).ravel()[fg].astype(np.int64)
        # pixels of an instance whose argmax is not an inside class (contour, background) do not vote
        inside = (classes >= 1) & (classes <= 3)
        key = ids[inside].astype(np.int64) * 3 + classes[inside] - 1
        scores = np.bincount(key, minlength=3 * (n + 1)).reshape(n + 1, 3)
    else:
        raise ValueError(f"classify must be 'vote' or 'probability', got {classify!r}")
    return area, np.argmax(scores, axis=1)


def nuclei_instances(classes: np.ndarray, min_area: int = 20) -> tuple[np.ndarray, dict[int, int]]:
    """Steps 2-4: the instance map (ids = component numbers, removed nuclei set to 0) and the class
    (0 tumor, 1 lymphocyte, 2 stroma) of every kept instance."""
    components, area, nucleus_class = _components(class_map(classes))
    keep = area >= min_area
    keep[0] = False
    lut = np.where(keep, np.arange(len(keep)), 0).astype(np.int32)
    kept = np.flatnonzero(keep)
    return lut[components], dict(zip(kept.tolist(), nucleus_class[kept].tolist(), strict=True))


def disk_offsets(radius: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """The offsets of ``skimage.morphology.disk(radius)`` except the centre, grouped by squared distance
    (ascending)."""
    groups: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            d2 = dy * dy + dx * dx
            if 0 < d2 <= radius * radius:
                groups[d2].append((dy, dx))
    return sorted(groups.items())


def dilate_into_background(label: np.ndarray, radius: int = 1, inplace: bool = False) -> np.ndarray:
    """Grow every nucleus by a disk of ``radius`` into background pixels only (see step 6 of the module
    docstring: nearest nucleus first, ties to the largest id). Returns a new array unless ``inplace``.

    Works on row blocks, keeping the original values of the ``radius`` rows above each block, so temporary
    memory stays small on huge labels (and ``inplace`` needs no second full-size array).
    """
    label = np.asarray(label)
    out = label if inplace else label.copy()
    if radius <= 0 or not out.any():
        return out
    groups = disk_offsets(radius)
    height, width = out.shape
    above = out[:0].copy()  # original (not yet dilated) rows just above the current block
    for y0 in range(0, height, _STRIP_ROWS):
        y1 = min(height, y0 + _STRIP_ROWS)
        h0, h1 = max(0, y0 - radius), min(height, y1 + radius)  # block plus halo
        src = np.concatenate([above, out[y0:h1]])  # original values: rows below y0 are not written yet
        above = out[max(y0, y1 - radius) : y1].copy()
        block = out[y0:y1]
        free = src[y0 - h0 : y1 - h0] == 0
        for _, offsets in groups:
            if not free.any():
                break
            best = np.zeros(block.shape, dtype=out.dtype)
            for dy, dx in offsets:
                # best[y, x] = max(best[y, x], label[y + dy, x + dx]) where the source pixel exists.
                ys0, ys1 = max(y0, -dy), min(y1, height - dy)
                xs0, xs1 = max(0, -dx), min(width, width - dx)
                if ys0 >= ys1 or xs0 >= xs1:
                    continue
                dst = best[ys0 - y0 : ys1 - y0, xs0:xs1]
                np.maximum(dst, src[ys0 + dy - h0 : ys1 + dy - h0, xs0 + dx : xs1 + dx], out=dst)
            fill = free & (best > 0)
            block[fill] = best[fill]
            free &= ~fill
    return out


METHODS = ("paper", "watershed")
CLASSIFY = ("vote", "probability")


def needs_probabilities(method: str = "paper", classify: str = "vote") -> bool:
    """Whether these settings need the ``(5, H, W)`` probability maps rather than their argmax."""
    return method != "paper" or classify != "vote"


def postprocess(
    pred: np.ndarray,
    min_area: int = 20,
    radius: int = 1,
    method: str = "paper",
    classify: str = "vote",
    mask_threshold: float = 0.5,
    marker_threshold: float = 0.3,
    marker_min_area: int = 4,
) -> np.ndarray:
    """Nuclei label (``int32``, paper's encoding) from ``(5, H, W)`` maps or an ``(H, W)`` class map.

    ``min_area``: nuclei with fewer pixels are removed (before dilation). ``radius``: dilation disk radius
    (0: none). ``method``: ``paper`` (connected components of the argmax) or ``watershed``; ``classify``:
    ``vote`` or ``probability``; the thresholds and ``marker_min_area`` set the watershed. The defaults are
    the reference code. See the module docstring for the exact steps.
    """
    from nucleiseg.labels import encode

    if min_area < 0 or radius < 0:
        raise ValueError(f"min_area and radius must be >= 0, got {min_area} and {radius}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if classify not in CLASSIFY:
        raise ValueError(f"classify must be one of {', '.join(CLASSIFY)}, got {classify!r}")
    if method == "paper" and classify == "vote":
        components, area, nucleus_class = _components(class_map(pred))
    else:
        if method == "watershed":
            components = watershed_instances(pred, mask_threshold, marker_threshold, marker_min_area)
        else:
            components, _, _ = _components(class_map(pred))
        area, nucleus_class = _instance_classes(components, pred, classify)
    keep = area >= min_area
    keep[0] = False
    kept = np.flatnonzero(keep)
    # The encoding depends only on the ids and their classes: encode them as a 1 x n "image", then map the
    # full-size components through an int32 look-up table (no int64 full-size temporary).
    lut = np.zeros(len(keep), dtype=np.int32)
    if len(kept):
        lut[kept] = encode(kept[None, :], dict(zip(kept.tolist(), nucleus_class[kept].tolist(), strict=True)))[0]
    label = lut[components]
    del components
    return dilate_into_background(label, radius, inplace=True)


__all__ = [
    "CLASSIFY",
    "METHODS",
    "class_map",
    "dilate_into_background",
    "disk_offsets",
    "needs_probabilities",
    "nuclei_instances",
    "postprocess",
    "watershed_instances",
]
