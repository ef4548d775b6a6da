"""QuPath GeoJSON in and out (nucleiseg.qupath, nucleiseg.export): the class map, exact round trips on
synthetic and real CoNSeP labels, a hand-written QuPath file, the folder import and its command."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from typer.testing import CliRunner

from nucleiseg.export import nucleus_feature, nucleus_geometries, to_geojson
from nucleiseg.io import read_image, write_image
from nucleiseg.labels import classes_of, encode, read_label, write_label
from nucleiseg.palette import QUPATH_NAMES
from nucleiseg.qupath import (
    QuPathError,
    class_map_from_dict,
    import_qupath,
    load_class_map,
    read_qupath_geojson,
)

REPO = Path(__file__).resolve().parents[1]
CLASS_MAP = load_class_map(REPO / "class_map.yaml")


def write_geojson(path: Path, data: object) -> Path:
    text = json.dumps(data)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def round_trip(tmp_path: Path, label: np.ndarray, name: str = "tile", **export) -> tuple[np.ndarray, np.ndarray, dict]:
    geo = to_geojson(label, image_name=name, **export)
    path = write_geojson(tmp_path / f"{name}.geojson", json.loads(json.dumps(geo)))
    got, other, report = read_qupath_geojson(path, label.shape, CLASS_MAP, origin=export.get("origin", (0, 0)))
    return got, other, report.to_dict()


# ----------------------------------------------------------------------------------------------------------
# The class map
# ----------------------------------------------------------------------------------------------------------


def test_the_repository_class_map_reads_back_what_the_export_writes():
    assert CLASS_MAP.export_names == QUPATH_NAMES
    assert [CLASS_MAP.target_of([n]) for n in QUPATH_NAMES] == ["tumor", "lymphocyte", "stroma"]
    # CoNSeP, PanNuke and QuPath's default names; case and spacing do not matter; derived classes.
    expected = {
        "Epithelial": "tumor",
        "neoplastic": "tumor",
        "Immune cells": "lymphocyte",
        "Inflammatory": "lymphocyte",
        "  FIBROBLAST ": "stroma",
        "Connective": "stroma",
        "Other": "ignore",
        "Necrosis": "ignore",
        "Region*": "skip",
    }
    assert {n: CLASS_MAP.target_of([n]) for n in expected} == expected
    assert CLASS_MAP.target_of(["Tumor", "Positive"]) == "tumor"
    assert CLASS_MAP.target_of(["Positive"]) is None  # unknown: the caller applies `unknown`
    assert CLASS_MAP.target_of([]) == CLASS_MAP.unclassified == "ignore"
    assert CLASS_MAP.unknown == "error"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"classes": {"tumor": ["A"], "lymphocyte": ["B"], "stroma": ["a"]}}, "listed under tumor and stroma"),
        ({"classes": {"tumour": ["A"]}}, "classes.tumour: not a target"),
        ({"unknown": "drop", "classes": {}}, "unknown must be 'error' or 'ignore'"),
        ({"classes": {"tumor": ["A"], "lymphocyte": ["B"]}}, "classes.stroma: list at least one name"),
        ({"classes": {"tumor": "Tumor"}}, "classes.tumor: expected a list"),
        ({"version": 2, "classes": {}}, "version 2 is not supported"),
        ({"clases": {}}, "unknown key(s) clases"),
    ],
)
def test_a_bad_class_map_is_refused_naming_the_file_and_key(tmp_path, data, message):
    import yaml

    path = tmp_path / "class_map.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(QuPathError) as raised:
        load_class_map(path)
    assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value)
    assert "\n" not in str(raised.value)


# ----------------------------------------------------------------------------------------------------------
# Round trips: label -> export -> import gives the same label
# ----------------------------------------------------------------------------------------------------------


def holes_and_pieces() -> np.ndarray:
    """Nuclei that a one-ring outline cannot hold: a ring with a nucleus in its hole, a nucleus in two pieces,
    pixels touching only at a corner, a C whose ends meet at a corner (a hole touching its shell)."""
    label = np.zeros((40, 50), np.int32)
    label[2:12, 2:12] = 3
    label[5:9, 5:9] = 0
    label[6:8, 6:8] = 1  # a lymphocyte inside the tumor nucleus's hole
    label[20:24, 2:6] = 2
    label[30:33, 10:14] = 2  # the same stroma nucleus, a second piece
    label[15, 20] = label[16, 21] = label[17, 22] = 6  # a diagonal of pixels touching at corners
    label[25:30, 30:36] = 4
    label[26:29, 31:35] = 0
    label[29, 33] = 0  # the C's opening
    label[28, 33] = 4  # ... whose ends now touch the outside at corners only
    label[0, 45:50] = 9  # along the image border
    return label


def test_export_geometry_is_exactly_the_pixels_of_each_nucleus():
    import shapely

    label = holes_and_pieces()
    geometries = nucleus_geometries(label)
    assert set(geometries) == set(np.unique(label[label > 0]).tolist())
    ys, xs = np.mgrid[: label.shape[0], : label.shape[1]]
    for nucleus_id, geometry in geometries.items():
        assert geometry.is_valid
        assert geometry.area == (label == nucleus_id).sum()
        # Matplotlib, not shapely: pixel centres inside the rings (even-odd) are the nucleus's pixels.
        inside = np.zeros(label.shape, bool)
        for polygon in shapely.get_parts(geometry):
            for ring in [polygon.exterior, *polygon.interiors]:
                inside ^= (
                    MplPath(np.asarray(ring.coords))
                    .contains_points(np.column_stack([xs.ravel() + 0.5, ys.ravel() + 0.5]))
                    .reshape(label.shape)
                )
        assert np.array_equal(inside, label == nucleus_id), nucleus_id
    assert geometries[3].geom_type == "Polygon" and len(geometries[3].interiors) == 1
    assert geometries[2].geom_type == "MultiPolygon" and len(geometries[2].geoms) == 2
    assert geometries[6].geom_type == "MultiPolygon" and len(geometries[6].geoms) == 3
    # No repeated or collinear vertices: a rectangle is 4 corners, a 4x4 ring 4 + 4.
    assert shapely.get_num_coordinates(geometries[1]) == 5
    assert shapely.get_num_coordinates(geometries[3]) == 10
    # RFC 7946 orientation: exterior counter-clockwise, holes clockwise (in x/y).
    assert geometries[3].exterior.is_ccw and not geometries[3].interiors[0].is_ccw


@pytest.mark.parametrize("object_type", ["detection", "annotation"])
def test_round_trip_of_holes_pieces_and_corners_is_exact(tmp_path, object_type):
    label = holes_and_pieces()
    got, other, report = round_trip(tmp_path, label, object_type=object_type)
    assert np.array_equal(got, label)
    assert not other.any()
    assert report["repaired"] == report["overlap_pixels"] == report["empty"] == 0


def test_round_trip_of_synthetic_tiles_is_exact_with_a_slide_origin(tmp_path):
    from nucleiseg.synth import synth_tile

    for seed in range(3):
        _, label = synth_tile(seed, 256)
        label = encode(label, classes_of(label))  # ids in the encoding's order (what synth writes)
        got, other, report = round_trip(tmp_path, label, origin=(40_000, 12_345))
        assert np.array_equal(got, label), seed
        assert not other.any() and report["repaired"] == 0 and report["overlap_pixels"] == 0
        per_class = [len(np.unique(label[(label > 0) & (label % 3 == c)])) for c in range(3)]
        assert list(report["nuclei"].values()) == per_class and min(per_class) > 0


def test_round_trip_of_real_consep_tiles_is_exact_with_their_other_nuclei(tmp_path, consep_dir):
    for name in ("train_1", "train_4", "train_13", "train_27"):
        label = read_label(consep_dir / f"{name}_label.png")
        other_path = consep_dir / f"{name}_other.png"
        other = read_label(other_path) if other_path.is_file() else np.zeros_like(label)
        geo = to_geojson(label, image_name=name, origin=(2048, 4096), object_type="annotation")
        # The "other" nuclei as QuPath objects of class Other (ignored in training).
        geo["features"] += [
            nucleus_feature(json.loads(json.dumps(_geometry(g))), 3 * i, {}, name, class_names=("Other",) * 3)
            for i, g in nucleus_geometries(other, origin=(2048, 4096)).items()
        ]
        path = write_geojson(tmp_path / f"{name}.geojson.gz", geo)
        got, got_other, report = read_qupath_geojson(path, label.shape, CLASS_MAP, origin=(2048, 4096))
        assert np.array_equal(got, label), name  # every nucleus id, its class, every pixel
        assert np.array_equal(got_other, other), name
        assert report.other == len(np.unique(other)) - 1 and report.overlap_pixels == 0


def test_export_names_come_from_the_class_map_and_centroids_follow_the_origin(tmp_path):
    from nucleiseg.measure import nuclei_table

    label = holes_and_pieces()
    own = class_map_from_dict({"classes": {"tumor": ["Tumour cell"], "lymphocyte": ["TIL"], "stroma": ["CAF"]}})
    image = np.full((*label.shape, 3), 128, np.uint8)
    table = nuclei_table(label, image, mpp=0.25)
    geo = to_geojson(label, table, "t", origin=(300, 200), object_type="annotation", class_map=own)
    names = {f["properties"]["classification"]["name"] for f in geo["features"]}
    assert names == {"Tumour cell", "TIL", "CAF"}
    assert {f["properties"]["objectType"] for f in geo["features"]} == {"annotation"}
    by_id = table.set_index("id")
    for f in geo["features"]:
        m = f["properties"]["measurements"]
        assert m["centroid_x_px"] == pytest.approx(by_id.loc[m["id"], "centroid_x_px"] + 300)
        assert m["centroid_y_px"] == pytest.approx(by_id.loc[m["id"], "centroid_y_px"] + 200)
    path = write_geojson(tmp_path / "t.geojson", geo)
    assert np.array_equal(read_qupath_geojson(path, label.shape, own, origin=(300, 200))[0], label)
    with pytest.raises(QuPathError, match=r"3 class name\(s\) not in the class map"):
        read_qupath_geojson(path, label.shape, CLASS_MAP, origin=(300, 200))


def _geometry(geometry):
    from nucleiseg.export import geojson_geometry

    return geojson_geometry(geometry)


# ----------------------------------------------------------------------------------------------------------
# A hand-written QuPath file
# ----------------------------------------------------------------------------------------------------------


def square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(geometry: dict, properties: dict | None = None, **extra) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": properties or {}, **extra}


def polygon(*rings) -> dict:
    return {"type": "Polygon", "coordinates": list(rings)}


def qupath_file(ox: int = 0, oy: int = 0) -> list[dict]:
    """A QuPath export with every form the reader must understand, shifted by a region origin ``(ox, oy)``."""

    def sq(x0, y0, x1, y1):
        return square(x0 + ox, y0 + oy, x1 + ox, y1 + oy)

    def props(kind: str | None, classification: object = None) -> dict:
        found = {} if kind is None else {"objectType": kind}
        return found if classification is None else {**found, "classification": classification}

    tumor = {"name": "Tumor", "color": [200, 0, 0]}
    bow_tie = [[20, 20], [30, 30], [30, 20], [20, 30], [20, 20]]
    return [
        # 0: an annotation with a hole (QuPath 0.4+ classification)
        feature(polygon(sq(2, 2, 12, 12), sq(5, 5, 9, 9)), props("annotation", tumor)),
        # 1: a detection MultiPolygon of a derived class (Stroma: Positive)
        feature(
            {"type": "MultiPolygon", "coordinates": [[sq(20, 2, 24, 6)], [sq(30, 2, 33, 5)]]},
            props("detection", {"names": ["Stroma", "Positive"], "color": [0, 1, 2]}),
        ),
        # 2: a cell: only its nucleusGeometry is the nucleus
        feature(
            polygon(sq(40, 0, 50, 10)),
            props("cell", {"name": "Immune cells", "color": [1, 2, 3]}),
            nucleusGeometry=polygon(sq(43, 3, 46, 6)),
        ),
        # 3: a bow-tie ring crossing itself at (25, 25): repaired into two triangles
        feature(
            polygon([[x + ox, y + oy] for x, y in bow_tie]),
            props("detection", {"name": "Lymphocyte", "color": [0, 0, 0]}),
        ),
        # 4: QuPath 0.2: object_type, classification with colorRGB
        feature(
            polygon(sq(2, 20, 6, 24)),
            {"object_type": "detection", "classification": {"name": "Epithelial", "colorRGB": -65536}},
        ),
        # 5, 6: overlapping nuclei: the smaller (6) keeps the 2 x 4 pixels they share
        feature(polygon(sq(2, 30, 8, 36)), props("detection", tumor)),
        feature(polygon(sq(6, 32, 10, 36)), props("detection", "Stroma")),
        # 7: an "other" nucleus (ignore) and 8: an unclassified one (ignore by the map)
        feature(polygon(sq(40, 20, 43, 23)), props("detection", {"name": "Other", "color": [9, 9, 9]})),
        feature(polygon(sq(45, 20, 47, 22)), props("annotation")),
        # 9: a region drawn around everything (skip), 10: a point, 11: a tile (not nuclei)
        feature(polygon(sq(0, 0, 50, 40)), props("annotation", {"name": "Region*", "color": [1, 1, 1]})),
        feature({"type": "Point", "coordinates": [10 + ox, 10 + oy]}, props("annotation", tumor)),
        feature(polygon(sq(0, 0, 10, 10)), props("tile")),
        # 12, 13: edges through pixel centres (Java2D's rule); 12 is typed the pre-0.3 way, by its id
        feature(polygon(sq(12.5, 30.5, 15.5, 33.5)), props(None, "Tumor"), id="PathDetectionObject"),
        feature(polygon(sq(15.5, 30.5, 18.5, 33.5)), props("detection", tumor)),
        # 14: outside the image (region): empty
        feature(polygon(sq(60, 60, 70, 70)), props("detection", tumor)),
    ]


def expected_maps() -> tuple[np.ndarray, np.ndarray]:
    """The label and ``_other`` map of :func:`qupath_file`, drawn by hand (file order: tumor 0, 4, 5, 12, 13;
    stroma 1, 6; lymphocyte 2, 3)."""
    label = np.zeros((40, 50), np.int32)
    label[2:12, 2:12] = 3
    label[5:9, 5:9] = 0
    label[2:6, 20:24] = label[2:5, 30:33] = 2
    label[3:6, 43:46] = 1
    # The bow-tie's two triangles; centres on the diagonals x = y and x + y = 50 belong to the triangle on
    # their right (Java2D's rule): the right one.
    cy, cx = np.mgrid[20:30, 20:30] + 0.5
    left = (cx > 20) & (cy > cx) & (cy < 50 - cx)
    right = (cx < 30) & (cy <= cx) & (cy >= 50 - cx)
    label[20:30, 20:30][left | right] = 4
    label[20:24, 2:6] = 6
    label[30:36, 2:8] = 9
    label[32:36, 6:10] = 5  # the smaller object wins the shared pixels
    label[30:33, 12:15] = 12  # [12.5, 15.5]: centres 12.5 (left edge: in), 13.5, 14.5; 15.5 (right edge: out)
    label[30:33, 15:18] = 15  # the neighbour takes column 15: no gap, no overlap
    other = np.zeros_like(label)
    other[20:23, 40:43] = 1
    other[20:22, 45:47] = 2
    return label, other


@pytest.mark.parametrize("form", ["collection", "bare list.gz", "collection.gz"])
def test_a_hand_written_qupath_file_imports_as_drawn(tmp_path, form):
    data: object = qupath_file(ox=1000, oy=500)
    if form.startswith("collection"):
        data = {"type": "FeatureCollection", "features": data}
    path = write_geojson(tmp_path / ("x.geojson.gz" if form.endswith(".gz") else "x.geojson"), data)
    label, other, report = read_qupath_geojson(path, (40, 50), CLASS_MAP, origin=(1000, 500))
    want_label, want_other = expected_maps()
    assert np.array_equal(label, want_label)
    assert np.array_equal(other, want_other)
    assert report.features == 15
    assert report.nuclei == {"tumor": 5, "lymphocyte": 2, "stroma": 2}  # nucleus 14 lies outside: empty
    assert (report.other, report.unclassified, report.empty) == (2, 1, 1)
    assert report.repaired == 1 and "feature 3: invalid geometry (Self-intersection" in report.notes[0]
    assert (report.overlap_pixels, report.overlapped_objects) == (8, 1)
    assert report.skipped == {
        "class Region* (skip)": 1,
        "no area: point, line or empty geometry": 1,
        "tile object": 1,
    }


def test_the_overlap_rule_does_not_depend_on_the_order_of_the_objects(tmp_path):
    features = qupath_file()
    reordered = list(reversed(features))
    label_a, _, _ = read_qupath_geojson(write_geojson(tmp_path / "a.geojson", features), (40, 50), CLASS_MAP)
    label_b, _, _ = read_qupath_geojson(write_geojson(tmp_path / "b.geojson", reordered), (40, 50), CLASS_MAP)
    assert np.array_equal(label_a > 0, label_b > 0)
    assert np.array_equal(label_a % 3, label_b % 3)  # same pixels, same classes; ids follow the file order


def test_unknown_class_names_are_one_error_listing_them_all_or_go_to_other(tmp_path):
    features = qupath_file()
    features[5]["properties"]["classification"] = {"name": "Mitosis", "color": [0, 0, 0]}
    features[7]["properties"]["classification"] = "Positive"
    features[13]["properties"]["classification"] = {"name": "Mitosis", "color": [0, 0, 0]}
    path = write_geojson(tmp_path / "x.geojson", features)
    with pytest.raises(QuPathError) as raised:
        read_qupath_geojson(path, (40, 50), CLASS_MAP)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{path}: 2 class name(s) not in the class map")
    assert "'Mitosis' (features 5, 13)" in message and "'Positive' (feature 7)" in message
    classes = {"tumor": ["Tumor"], "lymphocyte": ["Lymphocyte", "Immune cells"], "stroma": ["Stroma"]}
    lenient = class_map_from_dict(
        {"unknown": "ignore", "classes": {**classes, "ignore": ["Other"], "skip": ["Region*"]}}
    )
    label, other, report = read_qupath_geojson(path, (40, 50), lenient)
    # Mitosis (5, 13), Positive (7) and Epithelial (4), which this map lacks; 8 is unclassified.
    assert report.unknown_ignored == 4 and report.other == 5
    assert other[31, 3] > 0 and label[31, 3] == 0  # the nucleus of class Mitosis is in the _other map


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (lambda f: f[4].update(geometry=polygon([[0, 0], [1, "x"], [2, 2], [0, 0]])), "feature 4: malformed Polygon"),
        (lambda f: f[2].update(nucleusGeometry="circle"), "feature 2: geometry must be a GeoJSON geometry"),
        (lambda f: f[6]["geometry"]["coordinates"][0][1].__setitem__(0, float("nan")), "feature 6: geometry has non"),
        (lambda f: f.__setitem__(3, "not a feature"), "feature 3: expected an object"),
        (lambda f: f[0]["properties"].update(classification=7), "feature 0: classification must be"),
    ],
)  # fmt: skip
def test_a_malformed_feature_fails_the_file_naming_the_feature(tmp_path, broken, message):
    features = copy.deepcopy(qupath_file())
    broken(features)
    path = tmp_path / "x.geojson"
    path.write_text(json.dumps(features))  # NaN written as JSON's NaN extension, as Java's Gson may
    with pytest.raises(QuPathError) as raised:
        read_qupath_geojson(path, (40, 50), CLASS_MAP)
    assert str(raised.value).startswith(f"{path}: {message}") and "\n" not in str(raised.value)


def test_children_of_a_hierarchy_export_are_read(tmp_path):
    parent = feature(polygon(square(0, 0, 50, 40)), {"objectType": "annotation", "classification": "Region*"})
    parent["properties"]["childObjects"] = qupath_file()[:3]
    label, _, report = read_qupath_geojson(write_geojson(tmp_path / "h.geojson", [parent]), (40, 50), CLASS_MAP)
    want, _ = expected_maps()
    assert report.features == 4 and report.nuclei == {"tumor": 1, "lymphocyte": 1, "stroma": 1}
    assert np.array_equal(label > 0, np.isin(want, [3, 2, 1]))


# ----------------------------------------------------------------------------------------------------------
# The folder import and its command
# ----------------------------------------------------------------------------------------------------------


def source_folder(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    write_image(src / "a.png", image)
    write_geojson(src / "a.geojson", {"type": "FeatureCollection", "features": qupath_file()})
    write_image(src / "b.tif", image)
    write_geojson(src / "b.geojson.gz", qupath_file()[:2])
    write_image(src / "c.png", image)
    bad = qupath_file()
    bad[1]["properties"]["classification"] = "Mitosis"
    write_geojson(src / "c.geojson", bad)
    write_geojson(src / "d.geojson", qupath_file())  # no image
    write_image(src / "e.png", image)  # no GeoJSON: not a QuPath tile
    write_label(src / "e_label.png", np.zeros((40, 50), np.int32))
    return src


def test_import_qupath_writes_each_tile_and_a_bad_file_fails_alone(tmp_path):
    src, out = source_folder(tmp_path), tmp_path / "out"
    results = import_qupath(src, out, CLASS_MAP)
    by_name = {r.name: r for r in results}
    assert list(by_name) == ["a", "b", "c", "d"]
    assert by_name["a"].ok and by_name["b"].ok
    assert by_name["c"].error == (
        f"{src / 'c.geojson'}: 1 class name(s) not in the class map {CLASS_MAP.source}: 'Mitosis' (feature 1); "
        "add them to the map, or set unknown: ignore"
    )
    assert by_name["d"].error.startswith(f"{src / 'd.geojson'}: no image d.<png")
    want_label, want_other = expected_maps()
    assert np.array_equal(read_label(out / "a_label.png"), want_label)
    assert np.array_equal(read_label(out / "a_other.png"), want_other)
    assert np.array_equal(read_image(out / "a.png"), read_image(src / "a.png"))
    assert np.array_equal(read_label(out / "b_label.png"), np.where(np.isin(want_label, [3, 2]), want_label, 0))
    assert not (out / "b_other.png").exists()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "a.png", "a_label.png", "a_other.png", "b.png", "b_label.png",
    ]  # fmt: skip
    assert {p.name for p in by_name["a"].outputs} == {"a.png", "a_label.png", "a_other.png"}
    assert by_name["a"].report.to_dict()["nuclei"] == {"tumor": 5, "lymphocyte": 2, "stroma": 2}
    # Run again: what nucleiseg wrote is replaced; a file it did not write is refused, before any work.
    assert [r.ok for r in import_qupath(src, out, CLASS_MAP)] == [True, True, False, False]
    (out / "b_other.png").write_bytes(b"the user's")
    with pytest.raises(QuPathError, match=r"b_other\.png: already exist"):
        import_qupath(src, out, CLASS_MAP)
    assert (out / "b_other.png").read_bytes() == b"the user's"
    with pytest.raises(QuPathError, match="lies inside the input"):
        import_qupath(src, src / "out", CLASS_MAP)


def test_import_qupath_command(tmp_path):
    from nucleiseg.cli import app

    src, out = source_folder(tmp_path), tmp_path / "out"
    result = CliRunner().invoke(
        app, ["import", "qupath", str(src), str(out), "--class-map", str(REPO / "class_map.yaml")]
    )
    assert result.exit_code == 1, result.output
    assert "a: 5 tumor, 2 lymphocyte, 2 stroma, 2 other" in result.output
    assert "'Mitosis' (feature 1)" in result.output and "2 of 4 file(s) could not be imported" in result.output
    assert (out / "a_label.png").is_file() and (out / "b_label.png").is_file()
    for bad in ("c", "d"):
        (src / f"{bad}.geojson").unlink()
    origin = CliRunner().invoke(app, ["import", "qupath", str(src), str(tmp_path / "o2"), "--origin", "100,0"])
    assert origin.exit_code == 0, origin.output  # the default class map: class_map.yaml in the working folder
    assert "a: 0 tumor, 0 lymphocyte, 0 stroma, 0 other; 1 unclassified; 1 repaired; 12 empty objects;" in origin.output
    refused = CliRunner().invoke(app, ["import", "consep", str(src), str(tmp_path / "o3"), "--origin", "1,2"])
    assert refused.exit_code == 2 and "--origin" in refused.output


def test_predicted_annotations_come_back_as_the_predicted_label(tmp_path: Path, tiny_checkpoint: Path):
    """`predict --qupath-objects annotation` writes objects a pathologist can edit in QuPath, and importing the file
    untouched gives back exactly the predicted label (the start of the correct-and-retrain loop)."""
    from nucleiseg.cli import app
    from nucleiseg.synth import synth_tile

    image, _ = synth_tile(5, 96)
    src = tmp_path / "tiles"
    src.mkdir()
    write_image(src / "tile.png", image)
    out = tmp_path / "pred"
    result = CliRunner().invoke(
        app,
        ["predict", str(tiny_checkpoint), str(src), "--out", str(out), "--qupath-objects", "annotation",
         "--set", "post.method=paper", "--set", "post.min_area=0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    predicted = read_label(out / "tile_label.png")
    assert predicted.max() > 0  # a random network still draws some nuclei to carry through
    features = json.loads((out / "tile.geojson").read_text())["features"]
    assert {f["properties"]["objectType"] for f in features} == {"annotation"}

    inbox = tmp_path / "corrected"
    inbox.mkdir()
    write_image(inbox / "tile.png", image)
    (inbox / "tile.geojson").write_text((out / "tile.geojson").read_text())
    [imported] = import_qupath(inbox, tmp_path / "imported", CLASS_MAP)
    assert imported.ok, imported.error
    assert np.array_equal(read_label(tmp_path / "imported" / "tile_label.png"), predicted)

    refused = CliRunner().invoke(
        app, ["predict", str(tiny_checkpoint), str(src), "--out", str(tmp_path / "x"), "--qupath-objects", "cell"]
    )
    assert refused.exit_code == 2 and "--qupath-objects 'cell'" in refused.output
