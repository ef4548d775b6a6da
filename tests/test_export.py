"""Overlay, QuPath GeoJSON, the per-nucleus table, and writing the four outputs atomically."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pandas as pd
import pytest
from matplotlib.path import Path as MplPath
from scipy import ndimage

from nucleiseg.export import (
    CLASS_COLORS,
    outlines,
    output_paths,
    overlay,
    to_geojson,
    write_outputs,
)
from nucleiseg.measure import TABLE_COLUMNS, nuclei_table


def make_label(shape=(60, 80), seed=0) -> np.ndarray:
    """Random nuclei in the paper's encoding, some touching each other and the image border."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    next_id = [3, 1, 2]
    for _ in range(14):
        cy, cx = rng.integers(-2, shape[0] + 2), rng.integers(-2, shape[1] + 2)
        ry, rx = rng.integers(1, 7, 2)
        c = int(rng.integers(0, 3))
        label[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = next_id[c]
        next_id[c] += 3
    # Keep one connected piece per id (later ellipses may cut earlier ones).
    out = np.zeros_like(label)
    for i in np.unique(label[label > 0]):
        pieces, _ = ndimage.label(label == i, structure=np.ones((3, 3)))
        sizes = np.bincount(pieces.ravel())[1:]
        out[pieces == 1 + int(np.argmax(sizes))] = i
    out[5:8, 70] = 301  # a 1-pixel-wide line nucleus (an id no ellipse uses)
    out[0, 0] = 304  # a single pixel in the corner
    return out


def make_image(shape=(60, 80), seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Overlay
# ----------------------------------------------------------------------------------------------------------


def test_overlay_draws_class_coloured_outlines_inside_each_nucleus_only():
    label, image = make_label(), make_image()
    original = image.copy()
    out = overlay(image, label)
    assert np.array_equal(image, original) and out.dtype == np.uint8 and out.shape == image.shape
    edge = outlines(label)
    assert edge.any() and not edge[label == 0].any()
    for y, x in zip(*np.nonzero(edge), strict=True):
        assert tuple(out[y, x]) == CLASS_COLORS[label[y, x] % 3]
        # a pixel is an outline pixel exactly when a 4-neighbour inside the image differs
        neighbours = [label[y + dy, x + dx] for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))
                      if 0 <= y + dy < label.shape[0] and 0 <= x + dx < label.shape[1]]  # fmt: skip
        assert any(n != label[y, x] for n in neighbours)
    assert np.array_equal(out[~edge], image[~edge])
    interior = (label > 0) & ~edge
    assert interior.any()


# ----------------------------------------------------------------------------------------------------------
# GeoJSON
# ----------------------------------------------------------------------------------------------------------


def check_qupath_geojson(geo: dict, label: np.ndarray) -> None:
    """The structure QuPath reads, and polygons that are exactly the nuclei's pixels."""
    height, width = label.shape
    assert geo["type"] == "FeatureCollection"
    ids = set(np.unique(label[label > 0]).tolist())
    assert len(geo["features"]) == len(ids)
    seen_uuids = set()
    for feature in geo["features"]:
        assert feature["type"] == "Feature"
        seen_uuids.add(str(uuid.UUID(feature["id"])))
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 1
        ring = np.asarray(geometry["coordinates"][0])
        assert ring.ndim == 2 and ring.shape[1] == 2 and len(ring) >= 4
        assert ring[0].tolist() == ring[-1].tolist(), "closed ring"
        assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= width
        assert ring[:, 1].min() >= 0 and ring[:, 1].max() <= height
        props = feature["properties"]
        assert props["objectType"] == "detection"
        nucleus_id = props["measurements"]["id"]
        assert nucleus_id in ids
        name = ("Tumor", "Lymphocyte", "Stroma")[nucleus_id % 3]
        assert props["classification"] == {"name": name, "color": list(CLASS_COLORS[nucleus_id % 3])}
        assert all(isinstance(v, int) for v in props["classification"]["color"])
        assert all(isinstance(v, int | float) for v in props["measurements"].values())
        # Pixel centres inside the polygon are exactly the nucleus's pixels (hole-free nuclei).
        mask = ndimage.binary_fill_holes(label == nucleus_id)
        ys, xs = np.mgrid[:height, :width]
        centres = np.column_stack([xs.ravel() + 0.5, ys.ravel() + 0.5])
        inside = MplPath(ring).contains_points(centres).reshape(label.shape)
        assert np.array_equal(inside, mask), f"polygon of nucleus {nucleus_id}"
        signed = 0.5 * np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1])
        assert signed == mask.sum(), "area of the pixel-edge polygon = pixel count, counter-clockwise"
    assert len(seen_uuids) == len(ids)


def test_geojson_is_qupath_compatible_and_follows_pixel_edges():
    label, image = make_label(), make_image()
    table = nuclei_table(label, image, mpp=0.5, image_name="tile")
    geo = to_geojson(label, table, image_name="tile")
    check_qupath_geojson(json.loads(json.dumps(geo, allow_nan=False)), label)
    # The measurements are the table's numeric columns, same names, same units, same values.
    numeric = [c for c in TABLE_COLUMNS if c not in ("image", "class", "class_probability")]
    by_id = table.set_index("id")
    for feature in geo["features"]:
        measurements = feature["properties"]["measurements"]
        assert set(measurements) == set(numeric), "NaN class_probability (no probs) is left out"
        row = by_id.loc[measurements["id"]]
        assert all(measurements[c] == pytest.approx(row[c]) for c in numeric if c != "id")
    # Stable UUIDs: same name and id, same UUID; another image name, others.
    assert to_geojson(label, image_name="tile")["features"][0]["id"] == geo["features"][0]["id"]
    assert to_geojson(label, image_name="other")["features"][0]["id"] != geo["features"][0]["id"]


def test_geojson_of_a_single_pixel_and_of_an_empty_label():
    label = np.zeros((5, 5), np.int32)
    label[0, 4] = 3
    geo = to_geojson(label)
    assert geo["features"][0]["geometry"]["coordinates"] == [[[4, 0], [5, 0], [5, 1], [4, 1], [4, 0]]]
    assert to_geojson(np.zeros((5, 5), np.int32)) == {"type": "FeatureCollection", "features": []}


def test_geojson_of_a_real_consep_label(consep_dir):
    from shapely.geometry import shape

    from nucleiseg.labels import read_label

    label = read_label(consep_dir / "train_1_label.png")
    geo = to_geojson(label)
    assert len(geo["features"]) == len(np.unique(label)) - 1
    boxes = ndimage.find_objects(label)
    for feature in geo["features"]:
        geometry = shape(feature["geometry"])
        assert geometry.is_valid and feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
        nucleus_id = feature["properties"]["measurements"]["id"]
        box = boxes[nucleus_id - 1]
        minx, miny, maxx, maxy = geometry.bounds
        assert (minx, miny, maxx, maxy) == (box[1].start, box[0].start, box[1].stop, box[0].stop)
        # The geometry is the nucleus's pixels exactly: every piece, holes left open.
        assert geometry.area == (label == nucleus_id).sum()


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def test_write_outputs_writes_four_readable_files(tmp_path):
    from nucleiseg.io import read_image
    from nucleiseg.labels import read_label

    label, image = make_label(), make_image()
    paths = write_outputs(tmp_path / "out", "tile_1", image, label, mpp=0.25)
    assert paths == output_paths(tmp_path / "out", "tile_1")
    assert {p.name for p in paths.values()} == {
        "tile_1_label.png",
        "tile_1_overlay.png",
        "tile_1.geojson",
        "tile_1_nuclei.csv",
    }
    assert np.array_equal(read_label(paths["label"]), label)
    assert np.array_equal(read_image(paths["overlay"]), overlay(image, label))
    check_qupath_geojson(json.loads(paths["geojson"].read_text()), label)
    csv = pd.read_csv(paths["nuclei"])
    assert tuple(csv.columns) == TABLE_COLUMNS
    expected = nuclei_table(label, image, mpp=0.25, image_name="tile_1")
    assert (csv["image"] == "tile_1").all() and (csv["um_per_px"] == 0.25).all()
    np.testing.assert_allclose(csv["area_um2"], expected["area_um2"], rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths.values())


def test_a_failed_write_leaves_the_previous_outputs_untouched(tmp_path):
    label, image = make_label(), make_image()
    paths = write_outputs(tmp_path, "x", image, label)
    before = {key: p.read_bytes() for key, p in paths.items()}
    blocked = tmp_path / "y_nuclei.csv"
    blocked.mkdir()  # the last output cannot be renamed into place
    with pytest.raises(OSError):
        write_outputs(tmp_path, "y", image, label)
    assert {key: p.read_bytes() for key, p in paths.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in paths.values()), blocked.name])


def test_more_nuclei_than_16_bits_hold_are_written_as_a_32_bit_tiff(tmp_path):
    from nucleiseg.labels import read_label

    label, image = make_label(), make_image()
    too_many = label.copy()
    too_many[label == label.max()] = 70002  # above what a 16-bit label holds
    paths = write_outputs(tmp_path, "x", image, too_many)
    assert paths["label"].name == "x_label.tif"
    np.testing.assert_array_equal(read_label(paths["label"]), too_many)
