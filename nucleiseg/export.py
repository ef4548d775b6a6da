"""Outputs of a segmented image: an outline overlay, QuPath GeoJSON, and a per-nucleus measurement table.

Coordinates
    Polygons and centroids are in full-resolution pixel units with the origin at the top-left *corner* of the
    image, QuPath's convention: pixel ``(row r, column c)`` is the square ``[c, c+1] x [r, r+1]``, so its centre
    is ``(c + 0.5, r + 0.5)``. ``origin = (x0, y0)`` places an image cut from a slide at its place there: every
    coordinate is shifted by it (slide level-0 pixels of the image's top-left corner).
Geometry
    The GeoJSON geometry of a nucleus (:func:`nucleus_geometries`) is exactly its pixels: the union of its
    pixel squares, so a pixel's centre lies inside it exactly when the pixel belongs to the nucleus (QuPath's
    rule, and :mod:`nucleiseg.qupath`'s, which reads it back to the same label). A nucleus with a hole is a
    ``Polygon`` with an inner ring; a nucleus in several pieces (pixels that touch only at a corner count as
    separate pieces) is a ``MultiPolygon``. Rings are closed, without repeated or collinear vertices,
    counter-clockwise outside and clockwise around holes in x/y (RFC 7946). :func:`mask_polygon` and
    :func:`nucleus_polygons` give the simpler outline the slide table stores: one ring around the outside of
    the largest 8-connected piece, holes filled.
GeoJSON (``to_geojson``)
    A ``FeatureCollection`` with one ``Feature`` per nucleus: ``geometry`` as above; ``id`` a UUID (what QuPath
    writes and reads), stable for a given image name and nucleus id; ``properties``: ``objectType``
    (``"detection"``, the default: many, light, read-only in QuPath; or ``"annotation"``, which QuPath lets a
    pathologist edit), ``classification: {name, color}`` (the name of the class in the class map,
    ``class_map.yaml``, so an import reads it back to the same class: :mod:`nucleiseg.qupath`; the class
    colours of :mod:`nucleiseg.palette`, ``[r, g, b]`` ints), and
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


def nucleus_geometries(label: np.ndarray, origin: tuple[int, int] = (0, 0)) -> dict[int, Any]:
    """``{id: shapely Polygon or MultiPolygon}``: every nucleus of ``label`` exactly as its pixels (module
    docstring, "Geometry"), shifted by ``origin = (x0, y0)``.

    Built from the runs of equal ids along each row: the union of a nucleus's run rectangles (integer
    corners, so the union is exact), with the vertices that the runs leave along straight edges removed.
    """
    import shapely

    label = _check_label(label)
    height, width = label.shape
    if not label.any():
        return {}
    padded = np.zeros((height, width + 2), dtype=label.dtype)
    padded[:, 1:-1] = label
    rows, xs = np.nonzero(padded[:, 1:] != padded[:, :-1])  # x where a run starts or the previous one ends
    consecutive = np.flatnonzero(rows[:-1] == rows[1:])
    row, start, stop = rows[consecutive], xs[consecutive], xs[consecutive + 1]
    ids = label[row, start]
    keep = ids > 0
    row, start, stop, ids = row[keep], start[keep], stop[keep], ids[keep]
    x0, y0 = origin
    boxes = shapely.box(start + x0, row + y0, stop + x0, row + 1 + y0)
    order = np.argsort(ids, kind="stable")
    present, first = np.unique(ids[order], return_index=True)
    unions = np.array([shapely.union_all(boxes[run]) for run in np.split(order, first[1:])], dtype=object)
    # Tolerance 0 drops only the vertices lying on a straight edge; the pixel set is unchanged.
    exact = shapely.orient_polygons(shapely.simplify(unions, 0.0), exterior_cw=False)
    return dict(zip(present.tolist(), exact.tolist(), strict=True))


def _ring_coords(ring: Any) -> list[list[float]]:
    """A closed ring's positions, starting (and ending) at its top-left vertex: the smallest (y, x)."""
    coords = np.asarray(ring.coords)[:-1, :2]
    first = np.lexsort((coords[:, 0], coords[:, 1]))[0]
    coords = np.roll(coords, -first, axis=0)
    coords = np.vstack([coords, coords[:1]])
    integral = np.all(coords == np.round(coords))
    return coords.astype(np.int64).tolist() if integral else coords.tolist()


def geojson_geometry(geometry: Any) -> dict[str, Any]:
    """A shapely Polygon or MultiPolygon as a GeoJSON geometry dict (integer coordinates stay integers)."""
    import shapely

    polygons = [
        [_ring_coords(p.exterior), *(_ring_coords(r) for r in p.interiors)] for p in shapely.get_parts(geometry)
    ]
    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


OBJECT_TYPES = ("detection", "annotation")


def to_geojson(
    label: np.ndarray,
    table: Any = None,
    image_name: str = "",
    *,
    origin: tuple[int, int] = (0, 0),
    object_type: str = "detection",
    class_map: Any = None,
) -> dict[str, Any]:
    """QuPath-compatible GeoJSON ``FeatureCollection`` of the nuclei (structure in the module docstring).

    ``table`` (:func:`nucleiseg.measure.nuclei_table` of the same label) supplies the measurements, under its
    column names; without it only ``id`` is given. ``image_name`` seeds the features' stable UUIDs.
    ``origin``: ``(x0, y0)``, where the image's top-left corner lies on its slide (level-0 pixels); the
    geometry and the ``centroid_x_px`` / ``centroid_y_px`` measurements are shifted by it.
    ``object_type``: ``"detection"`` or ``"annotation"`` (editable in QuPath). ``class_map``: a
    :class:`nucleiseg.qupath.ClassMap` whose names are written (None: :data:`QUPATH_NAMES`, the names of
    ``class_map.yaml``).
    """
    label = _check_label(label)
    rows = _measurements(table)
    if origin != (0, 0):  # the centroids in pixels are then slide pixels too, like the geometry
        for row in rows.values():
            for key, shift in (("centroid_x_px", origin[0]), ("centroid_y_px", origin[1])):
                if key in row:
                    row[key] += shift
    names = QUPATH_NAMES if class_map is None else class_map.export_names
    features = [
        nucleus_feature(
            geojson_geometry(geometry),
            nucleus_id,
            rows.get(nucleus_id, {}),
            image_name,
            object_type=object_type,
            class_names=names,
        )
        for nucleus_id, geometry in nucleus_geometries(label, origin).items()
    ]
    return {"type": "FeatureCollection", "features": features}


def nucleus_feature(
    geometry: dict[str, Any],
    nucleus_id: int,
    measurements: dict[str, float],
    image_name: str = "",
    *,
    object_type: str = "detection",
    class_names: tuple[str, str, str] = QUPATH_NAMES,
) -> dict[str, Any]:
    """One nucleus as a QuPath ``Feature`` (structure in the module docstring): its GeoJSON ``geometry``, type
    ``object_type`` (``detection`` or ``annotation``), class ``nucleus_id % 3`` named by ``class_names``, and
    ``measurements`` after its ``id``."""
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {', '.join(OBJECT_TYPES)}, got {object_type!r}")
    c = nucleus_id % 3
    return {
        "type": "Feature",
        "id": str(uuid.uuid5(_NAMESPACE, f"{image_name}/{nucleus_id}")),
        "geometry": geometry,
        "properties": {
            "objectType": object_type,
            "classification": {"name": class_names[c], "color": list(CLASS_COLORS[c])},
            "measurements": {"id": nucleus_id, **measurements},
        },
    }


def detection_feature(
    ring: list[list[float]], nucleus_id: int, measurements: dict[str, float], image_name: str = ""
) -> dict[str, Any]:
    """One nucleus as a QuPath detection ``Feature`` with a one-ring ``Polygon`` (closed ``ring`` of ``[x, y]``
    positions): :func:`nucleus_feature`, as the slide export writes it."""
    return nucleus_feature({"type": "Polygon", "coordinates": [ring]}, nucleus_id, measurements, image_name)


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
    geojson_objects: str = "detection",
) -> dict[str, Path]:
    """Write ``<name>_label.png`` (16-bit; ``<name>_label.tif``, 32-bit, when the ids exceed 65535),
    ``<name>_overlay.png``, ``<name>.geojson`` and ``<name>_nuclei.csv``.

    The table and the GeoJSON measurements are :func:`nucleiseg.measure.nuclei_table` with ``mpp``
    (micrometres per pixel; None: :data:`nucleiseg.measure.DEFAULT_MPP`), ``probs`` (the softmax maps, for
    ``class_probability``) and ``stain_matrix`` (the model's; None: Ruifrok & Johnston's). ``geojson_objects``:
    the QuPath object type of the nuclei, ``detection`` (light, read-only in QuPath) or ``annotation`` (editable:
    what a pathologist corrects before ``nucleiseg import qupath``).
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
    geojson = json.dumps(to_geojson(label, table, name, object_type=geojson_objects), separators=(",", ":"))
    with contextlib.ExitStack() as stack:
        tmp = {key: stack.enter_context(atomic_path(path)) for key, path in paths.items()}
        write_label(tmp["label"], label)
        write_image(tmp["overlay"], overlay(image, label))
        tmp["geojson"].write_text(geojson + "\n", encoding="utf-8")
        table.to_csv(tmp["nuclei"], index=False, float_format="%.6g")
    return paths


__all__ = [
    "CLASS_COLORS",
    "OBJECT_TYPES",
    "QUPATH_NAMES",
    "detection_feature",
    "geojson_geometry",
    "mask_polygon",
    "nucleus_feature",
    "nucleus_geometries",
    "nucleus_polygons",
    "outlines",
    "output_files",
    "output_paths",
    "overlay",
    "to_geojson",
    "write_outputs",
]
