"""Outputs of a segmented image: an outline overlay, QuPath GeoJSON, and a per-nucleus measurement table.

Coordinates
    Polygons and centroids are in full-resolution pixel units with the origin at the top-left *corner* of the
    image, QuPath's convention: pixel ``(row r, column c)`` is the square ``[c, c+1] x [r, r+1]``, so its centre
    is ``(c + 0.5, r + 0.5)``. A nucleus's polygon follows its pixel edges exactly (its area equals the pixel
    count), and is traced around the outside of the nucleus (holes are filled; a nucleus in several pieces
    keeps its largest piece).
GeoJSON (``to_geojson``)
    A ``FeatureCollection`` with one ``Feature`` per nucleus: ``geometry`` a ``Polygon`` (one closed ring,
    first position repeated last, counter-clockwise in x/y as RFC 7946 asks); ``id`` a UUID (what QuPath writes
    and reads), stable for a given image name and nucleus id; ``properties``: ``objectType: "detection"``,
    ``classification: {name, color}`` (Tumor red, Lymphocyte green, Stroma blue, ``[r, g, b]`` ints), and
    ``measurements`` (a name -> number dict, which QuPath shows in its measurement table), including the
    nucleus's ``Label id`` in the label image.
Table (``nuclei_table``)
    One row per nucleus: ``id`` (label id), ``class`` (tumor / lymphocyte / stroma), ``area`` and ``perimeter``
    (pixels; perimeter as ``skimage.measure.perimeter``), ``centroid_x``, ``centroid_y``, ``eccentricity``,
    ``solidity``, ``major_axis_length``, ``minor_axis_length`` (of the ellipse with the same second moments), and
    ``hematoxylin_mean``: the mean haematoxylin optical density of the nucleus's pixels after colour
    deconvolution (``skimage.color.rgb2hed`` channel 0, Ruifrok & Johnston's H&E-DAB vectors).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

# Outline / class colours (overlay and QuPath classification), indexed by class = id % 3.
CLASS_COLORS: tuple[tuple[int, int, int], ...] = ((255, 0, 0), (0, 255, 0), (0, 0, 255))
QUPATH_NAMES: tuple[str, str, str] = ("Tumor", "Lymphocyte", "Stroma")
TABLE_COLUMNS = (
    "id",
    "class",
    "area",
    "perimeter",
    "centroid_x",
    "centroid_y",
    "eccentricity",
    "solidity",
    "major_axis_length",
    "minor_axis_length",
    "hematoxylin_mean",
)
_NAMESPACE = uuid.UUID("5d3b0c9e-7a43-4b6f-9a0e-1c2f3e4d5a6b")  # for stable feature UUIDs
_STRIP_ROWS = 1024


def _check_label(label: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"expected a 2-D integer label, got {label.dtype} {label.shape}")
    if label.size and label.min() < 0:
        raise ValueError("a label must not hold negative ids")
    if image is not None and np.asarray(image).shape[:2] != label.shape:
        raise ValueError(f"label {label.shape} and image {np.asarray(image).shape[:2]} differ in size")
    return label


def outlines(label: np.ndarray) -> np.ndarray:
    """Boolean map of each nucleus's inner boundary: its pixels with a 4-neighbour of another value
    (the image border does not count)."""
    label = _check_label(label)
    edge = np.zeros(label.shape, dtype=bool)
    vertical = label[1:] != label[:-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    horizontal = label[:, 1:] != label[:, :-1]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge &= label > 0
    return edge


def overlay(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The image with every nucleus outlined (1 pixel, inside it): red tumor, green lymphocyte, blue stroma."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image, got {image.dtype} {image.shape}")
    label = _check_label(label, image)
    out = image.copy()
    edge = outlines(label)
    palette = np.asarray(CLASS_COLORS, dtype=np.uint8)
    out[edge] = palette[label[edge] % 3]
    return out


# ----------------------------------------------------------------------------------------------------------
# Polygons
# ----------------------------------------------------------------------------------------------------------


def _simplify_ring(points: np.ndarray) -> np.ndarray:
    """Drop repeated and collinear vertices of a closed ring given without its closing point."""
    keep = np.any(points != np.roll(points, 1, axis=0), axis=1)
    points = points[keep]
    if len(points) < 3:
        return points
    prev, nxt = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    cross = (points[:, 0] - prev[:, 0]) * (nxt[:, 1] - points[:, 1]) - (points[:, 1] - prev[:, 1]) * (
        nxt[:, 0] - points[:, 0]
    )
    return points[cross != 0]


def _ring_area(ring: np.ndarray) -> float:
    """Signed shoelace area of a closed ring (positive: counter-clockwise in x/y)."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def mask_polygon(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> np.ndarray | None:
    """The outer pixel-edge outline of the largest 8-connected piece of a boolean mask, as a closed ring of
    integer ``[x, y]`` corner coordinates (shape ``(n, 2)``, first point repeated last), shifted by
    ``offset = (row, col)``; None for an empty mask.

    The mask is upsampled 2x so that OpenCV's contour of the boundary sub-pixels can be mapped to the pixel
    corners they touch: sub-pixel ``u`` lies next to corner ``(u + 1) // 2``.
    """
    import cv2

    if not mask.any():
        return None
    up = np.zeros((2 * mask.shape[0] + 2, 2 * mask.shape[1] + 2), dtype=np.uint8)
    up[1:-1, 1:-1] = np.repeat(np.repeat(mask.astype(np.uint8), 2, axis=0), 2, axis=1)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=cv2.contourArea) if len(contours) > 1 else contours[0]
    sub = contour[:, 0, :].astype(np.int64) - 1  # (x, y) in the upsampled mask, without the 1-pixel frame
    corners = (sub + 1) // 2
    corners[:, 0] += offset[1]
    corners[:, 1] += offset[0]
    ring = _simplify_ring(corners)
    ring = np.vstack([ring, ring[:1]])
    if _ring_area(ring) < 0:
        ring = ring[::-1]
    return ring


def nucleus_polygons(label: np.ndarray) -> dict[int, np.ndarray]:
    """``{id: ring}`` for every nucleus of ``label`` (see :func:`mask_polygon`), one crop per nucleus."""
    from scipy import ndimage

    label = _check_label(label)
    polygons: dict[int, np.ndarray] = {}
    if not label.any():
        return polygons
    for index, box in enumerate(ndimage.find_objects(label), start=1):
        if box is None:
            continue
        ring = mask_polygon(label[box] == index, (box[0].start, box[1].start))
        if ring is not None:
            polygons[index] = ring
    return polygons


# ----------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------


def _pixel_sums(label: np.ndarray, image: np.ndarray) -> dict[str, np.ndarray]:
    """Per-id sums (index = id) over the nucleus's pixels of 1, row, col, row², col², row*col and the
    haematoxylin channel of ``skimage.color.rgb2hed``, on row blocks so that no full-size float image is held."""
    from skimage.color import rgb2hed

    top = int(label.max()) if label.size else 0
    keys = ("n", "r", "c", "rr", "cc", "rc", "h")
    sums = {k: np.zeros(top + 1, dtype=np.float64) for k in keys}
    cols = np.arange(label.shape[1], dtype=np.float64)
    for y0 in range(0, label.shape[0], _STRIP_ROWS):
        lab = label[y0 : y0 + _STRIP_ROWS]
        fg = lab > 0
        if not fg.any():
            continue
        ids = lab[fg]
        r = np.broadcast_to(np.arange(y0, y0 + lab.shape[0], dtype=np.float64)[:, None], lab.shape)[fg]
        c = np.broadcast_to(cols[None, :], lab.shape)[fg]
        h = rgb2hed(image[y0 : y0 + _STRIP_ROWS])[..., 0][fg]
        for key, weights in (("n", None), ("r", r), ("c", c), ("rr", r * r), ("cc", c * c), ("rc", r * c), ("h", h)):
            sums[key] += np.bincount(ids, weights=weights, minlength=top + 1)
    return sums


_EDGE_MIDPOINTS = np.array([[0.5, 0], [-0.5, 0], [0, 0.5], [0, -0.5]], dtype=np.float32)


def _convex_areas(label: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per id, ``skimage.measure.regionprops``' ``area_convex``: the pixels whose centres lie in (or on) the
    convex hull of the edge midpoints of the nucleus's pixels. Equal to skimage's value, computed from the
    boundary pixels only (OpenCV contour and hull), several times faster than ``convex_hull_image``."""
    import cv2
    from scipy import ndimage
    from skimage.measure import grid_points_in_poly

    boxes = ndimage.find_objects(label)
    areas = np.zeros(len(ids), dtype=np.int64)
    for k, nucleus_id in enumerate(ids.tolist()):
        box = boxes[nucleus_id - 1]
        mask = (label[box] == nucleus_id).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        centres = np.concatenate(contours)[:, 0, :].astype(np.float32)  # boundary pixels, (x, y)
        hull = cv2.convexHull((centres[:, None, :] + _EDGE_MIDPOINTS[None]).reshape(-1, 2))[:, 0, :]
        areas[k] = np.count_nonzero(grid_points_in_poly(mask.shape, hull[:, ::-1], binarize=False))
    return areas


def nuclei_table(label: np.ndarray, image: np.ndarray) -> Any:
    """A :class:`pandas.DataFrame` with one row per nucleus (columns in :data:`TABLE_COLUMNS`, described in
    the module docstring), in ascending id order.

    All figures are ``skimage.measure.regionprops``' (same definitions and values). Area, centroid, the
    inertia-ellipse figures (eccentricity, axis lengths) and the haematoxylin mean come from one vectorised pass
    of per-id sums, the convex area (for solidity) from each nucleus's boundary, the perimeter from
    ``regionprops``.
    """
    import pandas as pd
    from skimage.measure import regionprops_table

    from nucleiseg.labels import CLASS_NAMES

    image = np.asarray(image)
    label = _check_label(label, image)
    if not label.any():
        return pd.DataFrame({c: pd.Series(dtype=object if c == "class" else float) for c in TABLE_COLUMNS})
    sums = _pixel_sums(label, image)
    ids = np.flatnonzero(sums["n"])
    ids = ids[ids > 0]
    n = sums["n"][ids]
    mean_r, mean_c = sums["r"][ids] / n, sums["c"][ids] / n
    # Central second moments / area: the inertia tensor [[var_c, -cov], [-cov, var_r]] of skimage.
    var_r = np.maximum(sums["rr"][ids] / n - mean_r**2, 0)
    var_c = np.maximum(sums["cc"][ids] / n - mean_c**2, 0)
    cov = sums["rc"][ids] / n - mean_r * mean_c
    half_sum, root = (var_r + var_c) / 2, np.sqrt(((var_c - var_r) / 2) ** 2 + cov**2)
    l1, l2 = np.maximum(half_sum + root, 0), np.maximum(half_sum - root, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        eccentricity = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / l1, 0, 1)), 0.0)
    props = regionprops_table(label.astype(np.int32, copy=False), properties=("label", "perimeter"))
    if not np.array_equal(props["label"], ids):
        raise AssertionError("regionprops and the pixel sums disagree on the ids present")  # cannot happen
    solidity = n / _convex_areas(label, ids)
    return pd.DataFrame(
        {
            "id": ids.astype(np.int64),
            "class": [CLASS_NAMES[i % 3] for i in ids],
            "area": n.astype(np.int64),
            "perimeter": props["perimeter"],
            "centroid_x": mean_c + 0.5,
            "centroid_y": mean_r + 0.5,
            "eccentricity": eccentricity,
            "solidity": solidity,
            "major_axis_length": 4 * np.sqrt(l1),
            "minor_axis_length": 4 * np.sqrt(l2),
            "hematoxylin_mean": sums["h"][ids] / n,
        },
        columns=list(TABLE_COLUMNS),
    )


_MEASUREMENT_NAMES = {
    "area": "Area px^2",
    "perimeter": "Perimeter px",
    "eccentricity": "Eccentricity",
    "solidity": "Solidity",
    "major_axis_length": "Major axis px",
    "minor_axis_length": "Minor axis px",
    "hematoxylin_mean": "Hematoxylin OD mean",
}


def to_geojson(label: np.ndarray, table: Any = None, image_name: str = "") -> dict[str, Any]:
    """QuPath-compatible GeoJSON ``FeatureCollection`` of the nuclei (structure in the module docstring).

    ``table`` (from :func:`nuclei_table`) supplies the measurements; without it only ``Label id`` and the
    area are given. ``image_name`` seeds the features' stable UUIDs.
    """
    label = _check_label(label)
    rows: dict[int, dict[str, float]] = {}
    if table is not None and len(table):
        for record in table.to_dict("records"):
            rows[int(record["id"])] = {
                name: float(record[column]) for column, name in _MEASUREMENT_NAMES.items() if column in record
            }
    features = []
    for nucleus_id, ring in nucleus_polygons(label).items():
        c = nucleus_id % 3
        measurements = {"Label id": nucleus_id}
        measurements.update(rows.get(nucleus_id) or {"Area px^2": float(abs(_ring_area(ring)))})
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(_NAMESPACE, f"{image_name}/{nucleus_id}")),
                "geometry": {"type": "Polygon", "coordinates": [ring.tolist()]},
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": QUPATH_NAMES[c], "color": list(CLASS_COLORS[c])},
                    "measurements": measurements,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def output_paths(out_dir: str | os.PathLike[str], name: str) -> dict[str, Path]:
    """Where :func:`write_outputs` puts the four outputs of image ``name``."""
    out_dir = Path(out_dir)
    return {
        "label": out_dir / f"{name}_label.png",
        "overlay": out_dir / f"{name}_overlay.png",
        "geojson": out_dir / f"{name}.geojson",
        "nuclei": out_dir / f"{name}_nuclei.csv",
    }


def write_outputs(out_dir: str | os.PathLike[str], name: str, image: np.ndarray, label: np.ndarray) -> dict[str, Path]:
    """Write ``<name>_label.png`` (16-bit), ``<name>_overlay.png``, ``<name>.geojson`` and ``<name>_nuclei.csv``.

    All four are computed first and written to temporary files that are renamed into place only once every
    one of them is complete, so a failure (e.g. more nuclei than a 16-bit label holds) leaves earlier outputs
    of the same name untouched. Returns the paths.
    """
    from nucleiseg.io import atomic_path, write_image
    from nucleiseg.labels import write_label

    image = np.asarray(image)
    label = _check_label(label, image)
    paths = output_paths(out_dir, name)
    table = nuclei_table(label, image)
    geojson = json.dumps(to_geojson(label, table, name), separators=(",", ":"))
    with contextlib.ExitStack() as stack:
        tmp = {key: stack.enter_context(atomic_path(path)) for key, path in paths.items()}
        write_label(tmp["label"], label)
        write_image(tmp["overlay"], overlay(image, label))
        tmp["geojson"].write_text(geojson + "\n", encoding="utf-8")
        table.to_csv(tmp["nuclei"], index=False, float_format="%.6g")
    return paths


__all__ = [
    "CLASS_COLORS",
    "QUPATH_NAMES",
    "TABLE_COLUMNS",
    "mask_polygon",
    "nuclei_table",
    "nucleus_polygons",
    "outlines",
    "output_paths",
    "overlay",
    "to_geojson",
    "write_outputs",
]
