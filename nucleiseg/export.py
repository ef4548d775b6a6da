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
    ``classification: {name, color}`` (the class colours of :mod:`nucleiseg.palette`, ``[r, g, b]`` ints), and
    ``measurements`` (a name -> number dict, which QuPath shows in its measurement table): the numeric columns
    of the nucleus's row in the per-nucleus table, under the same names and in the same units
    (:mod:`nucleiseg.measure`: ``id``, ``area_um2``, ``perimeter_um``, ``hematoxylin_od_mean``, ...).
Table
    ``<name>_nuclei.csv`` is :func:`nucleiseg.measure.nuclei_table` (real units, the stain the model was trained
    with).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from nucleiseg.palette import CLASS_COLORS, QUPATH_NAMES

_NAMESPACE = uuid.UUID("5d3b0c9e-7a43-4b6f-9a0e-1c2f3e4d5a6b")  # for stable feature UUIDs


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
    """The image with every nucleus outlined (1 pixel, inside it) in its class colour (:mod:`nucleiseg.palette`)."""
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


def _measurements(table: Any) -> dict[int, dict[str, float]]:
    """``{id: {column: value}}`` of a nuclei table's numeric columns (NaN left out: JSON has no NaN)."""
    if table is None or not len(table):
        return {}
    from pandas.api.types import is_numeric_dtype

    numeric = [c for c in table.columns if c != "id" and is_numeric_dtype(table[c])]
    values = table[numeric].to_numpy(dtype=np.float64)
    rows: dict[int, dict[str, float]] = {}
    for nucleus_id, row in zip(table["id"].tolist(), values.tolist(), strict=True):
        rows[int(nucleus_id)] = {c: v for c, v in zip(numeric, row, strict=True) if np.isfinite(v)}
    return rows


def to_geojson(label: np.ndarray, table: Any = None, image_name: str = "") -> dict[str, Any]:
    """QuPath-compatible GeoJSON ``FeatureCollection`` of the nuclei (structure in the module docstring).

    ``table`` (:func:`nucleiseg.measure.nuclei_table` of the same label) supplies the measurements, under its
    column names; without it only ``id`` is given. ``image_name`` seeds the features' stable UUIDs.
    """
    label = _check_label(label)
    rows = _measurements(table)
    features = [
        detection_feature(ring.tolist(), nucleus_id, rows.get(nucleus_id, {}), image_name)
        for nucleus_id, ring in nucleus_polygons(label).items()
    ]
    return {"type": "FeatureCollection", "features": features}


def detection_feature(
    ring: list[list[float]], nucleus_id: int, measurements: dict[str, float], image_name: str = ""
) -> dict[str, Any]:
    """One nucleus as a QuPath detection ``Feature`` (structure in the module docstring): its closed ``ring`` of
    ``[x, y]`` positions, class ``nucleus_id % 3``, and ``measurements`` after its ``id``."""
    c = nucleus_id % 3
    return {
        "type": "Feature",
        "id": str(uuid.uuid5(_NAMESPACE, f"{image_name}/{nucleus_id}")),
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "objectType": "detection",
            "classification": {"name": QUPATH_NAMES[c], "color": list(CLASS_COLORS[c])},
            "measurements": {"id": nucleus_id, **measurements},
        },
    }


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def output_paths(out_dir: str | os.PathLike[str], name: str, label_suffix: str = ".png") -> dict[str, Path]:
    """Where :func:`write_outputs` puts the four outputs of image ``name``; the label is ``.png``, or ``.tif``
    when its ids need 32 bits (:func:`nucleiseg.labels.label_suffix`)."""
    out_dir = Path(out_dir)
    return {
        "label": out_dir / f"{name}_label{label_suffix}",
        "overlay": out_dir / f"{name}_overlay.png",
        "geojson": out_dir / f"{name}.geojson",
        "nuclei": out_dir / f"{name}_nuclei.csv",
    }


def output_files(out_dir: str | os.PathLike[str], name: str) -> list[Path]:
    """Every file :func:`write_outputs` may write for image ``name`` (the label in either format): what to check
    before writing (:mod:`nucleiseg.outputs`)."""
    return [*output_paths(out_dir, name).values(), output_paths(out_dir, name, ".tif")["label"]]


def write_outputs(
    out_dir: str | os.PathLike[str],
    name: str,
    image: np.ndarray,
    label: np.ndarray,
    *,
    mpp: float | None = None,
    probs: np.ndarray | None = None,
    stain_matrix: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write ``<name>_label.png`` (16-bit; ``<name>_label.tif``, 32-bit, when the ids exceed 65535),
    ``<name>_overlay.png``, ``<name>.geojson`` and ``<name>_nuclei.csv``.

    The table and the GeoJSON measurements are :func:`nucleiseg.measure.nuclei_table` with ``mpp``
    (micrometres per pixel; None: :data:`nucleiseg.measure.DEFAULT_MPP`), ``probs`` (the softmax maps, for
    ``class_probability``) and ``stain_matrix`` (the model's; None: Ruifrok & Johnston's).
    All four are computed first and written to temporary files that are renamed into place only once every
    one of them is complete, so a failure (a full disk) leaves earlier outputs of the same name untouched.
    Returns the paths.
    """
    from nucleiseg.io import atomic_path, write_image
    from nucleiseg.labels import label_suffix, write_label
    from nucleiseg.measure import DEFAULT_MPP, nuclei_table

    image = np.asarray(image)
    label = _check_label(label, image)
    paths = output_paths(out_dir, name, label_suffix(label))
    table = nuclei_table(
        label, image, mpp=DEFAULT_MPP if mpp is None else mpp, probs=probs, stain_matrix=stain_matrix, image_name=name
    )
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
    "detection_feature",
    "mask_polygon",
    "nucleus_polygons",
    "outlines",
    "output_files",
    "output_paths",
    "overlay",
    "to_geojson",
    "write_outputs",
]
