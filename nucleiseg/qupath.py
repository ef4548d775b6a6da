"""QuPath GeoJSON and the label encoding: the class map, the reader, and the folder importer.

Definitions
-----------
QuPath GeoJSON
    What QuPath writes with *File > Export objects as GeoJSON* (and reads with *File > Import objects*): a
    ``FeatureCollection``, a bare list of features, or a single feature, as ``.geojson`` or gzip-compressed
    ``.geojson.gz``. Each feature has a ``geometry`` and ``properties`` with the object type (``objectType``;
    QuPath 0.2 wrote ``object_type``, and earlier files put ``PathDetectionObject`` etc. in the feature's
    ``id``) and a ``classification``: ``{"name": "Tumor", "color": [r, g, b]}`` (QuPath 0.4+),
    ``{"names": ["Tumor", "Positive"], ...}`` for a derived class, ``{"name": ..., "colorRGB": int}`` with an
    optional ``parentClass`` (before 0.4), or a plain string ``"Tumor: Positive"``. A ``cell`` keeps its
    nucleus in ``nucleusGeometry`` beside the cell's ``geometry``. A hierarchy export nests objects in
    ``properties.childObjects``; they are read too. (Formats as in QuPath's ``GsonTools`` and
    ``QuPathTypeAdapters``.)
nucleus objects
    Features of type ``annotation``, ``detection`` and ``cell`` (and of no or an unrecognised type, which
    QuPath itself reads as annotations). The nucleus of a cell is its ``nucleusGeometry``; a cell without one
    is skipped (its ``geometry`` is the whole cell, not the nucleus). ``tile``, TMA-core and ``root`` objects,
    and geometries that enclose no area (points, lines), are skipped and counted.
Coordinates
    QuPath's: full-resolution pixels, origin at the top-left *corner* of the image. Pixel ``(x, y)`` (column,
    row) is the square ``[x, x+1] x [y, y+1]``. For a region of a slide whose top-left pixel is slide pixel
    ``origin = (x0, y0)``, image pixel ``(x, y)`` is slide square ``[x0+x, x0+x+1] x [y0+y, y0+y+1]``; the
    GeoJSON is in slide pixels, and objects partly outside the region keep only their pixels inside it.
Rasterisation
    A pixel belongs to an object when its centre ``(x + 0.5, y + 0.5)`` lies inside the object's (repaired)
    polygon; holes exclude, every part of a MultiPolygon includes. A centre exactly on an edge follows
    Java2D's insideness rule, which QuPath's own rendering and labelled-image export use: it is inside when
    the area immediately to its right is (immediately below, on a horizontal edge), so polygons that share an
    edge never both claim, nor both miss, the pixels along it. Computed with shapely 2 (``contains_xy`` on the
    pixel centres of each object's bounding box).
Invalid geometry
    A polygon that is not valid in the OGC sense (a bow-tie ring crossing itself, a hole outside its shell) is
    repaired with ``shapely.make_valid`` (keeping its area parts) and counted in the report, with a note naming
    the feature and what was wrong.
Overlaps
    A pixel claimed by several nucleus objects goes to the **smallest** of them (by polygon area; of equal
    areas, the later in the file). A small nucleus drawn over a large one stays whole instead of being
    swallowed, and the result does not depend on the order of the objects. Ignore-class objects take part in
    the same rule, so the label and the ``_other`` map never share a pixel. The report counts the pixels
    claimed more than once and the objects that lost pixels; an object left with no pixel (outside the image,
    thinner than a pixel, or wholly under smaller objects) is counted as ``empty``.
Ids
    Nuclei are numbered in file order (children after their parent), and :func:`nucleiseg.labels.encode`
    gives the k-th tumor nucleus id ``3k + 3``, the k-th lymphocyte ``3k + 1``, the k-th stroma nucleus
    ``3k + 2``. A label whose ids already run so (every label nucleiseg writes or imports), exported with
    :func:`nucleiseg.export.to_geojson`, comes back with the same ids. An ``id`` measurement in the file is
    not used: edits in QuPath make it stale.
Class map
    A versioned YAML file (``class_map.yaml`` at the repository root; its comments describe the format)
    mapping QuPath class names to ``tumor``, ``lymphocyte``, ``stroma``, ``ignore`` (written to the
    ``_other`` map, ignored in training and evaluation) or ``skip`` (not a nucleus: not drawn). Names match
    case-insensitively; a derived class ``"A: B"`` is looked up whole, then by ``A``. ``unknown`` says what a
    name the map lacks does (``error``: the file fails with one message listing every unknown name;
    ``ignore``), ``unclassified`` what an object without a class does. The first name listed for each of the
    three classes is the name the GeoJSON export writes, so names round-trip.
Errors
    A file that cannot be read, a malformed feature, non-finite coordinates, or unknown class names (under
    ``unknown: error``) raise :class:`QuPathError` with one line naming the file and the feature (its index
    in the file; ``3/1`` is child 1 of feature 3). Nothing of such a file is written.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nucleiseg.labels import CLASS_NAMES

TARGETS: tuple[str, ...] = (*CLASS_NAMES, "ignore", "skip")
"""What a QuPath class can map to: the three classes of the encoding, ``ignore`` (the ``_other`` map) or
``skip`` (not drawn)."""
IGNORE, SKIP, ERROR = "ignore", "skip", "error"
GEOJSON_SUFFIXES = (".geojson", ".geojson.gz")

# QuPath reads a feature of no or an unrecognised type as an annotation; these types are not nuclei.
_NOT_NUCLEI = {"tile": "tile object", "tmacore": "TMA core", "tma_core": "TMA core", "root": "root object"}
# Before QuPath 0.3 the object type was the feature's "id".
_LEGACY_TYPES = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tmaCore",
    "PathRootObject": "root",
}
# Java2D's insideness for a centre on an edge: test a point just right of it instead and, for a horizontal
# edge, where moving right stays on the edge, just below it (a much smaller step, so it decides only then).
_EDGE_NUDGE = (1e-6, 1e-9)


class QuPathError(ValueError):
    """A QuPath GeoJSON file or class map cannot be used. The one-line message names the file (and feature)."""


# ----------------------------------------------------------------------------------------------------------
# The class map
# ----------------------------------------------------------------------------------------------------------


def _fold(name: str) -> str:
    """A class name as the map compares it: case-folded, runs of spaces made one, ends stripped."""
    return " ".join(str(name).split()).casefold()


@dataclass(frozen=True)
class ClassMap:
    """QuPath class names to targets (:data:`TARGETS`); see "Class map" in the module docstring."""

    targets: Mapping[str, str]
    """Folded class name -> target."""
    export_names: tuple[str, str, str]
    """The name the export writes for tumor, lymphocyte and stroma."""
    unknown: str = ERROR
    """``error`` or ``ignore``: what a class name missing from :attr:`targets` does."""
    unclassified: str = IGNORE
    """A target or ``error``: what an object without a class does."""
    source: str = "<class map>"

    def target_of(self, names: Sequence[str]) -> str | None:
        """The target of a QuPath class given as its parts (``["Tumor", "Positive"]``; empty: unclassified);
        None when no name is in the map (the caller applies :attr:`unknown`)."""
        if not names:
            return self.unclassified
        whole = _fold(": ".join(names))
        if whole in self.targets:
            return self.targets[whole]
        return self.targets.get(_fold(names[0]))


def class_map_from_dict(data: Any, source: str = "<class map>") -> ClassMap:
    """Validate the contents of a class map file (see ``class_map.yaml``) and build the :class:`ClassMap`."""
    if not isinstance(data, Mapping):
        raise QuPathError(f"{source}: a class map is a mapping with 'classes', got {type(data).__name__}")
    extra = set(data) - {"version", "unknown", "unclassified", "classes"}
    if extra:
        raise QuPathError(f"{source}: unknown key(s) {', '.join(sorted(map(str, extra)))}")
    if data.get("version", 1) != 1:
        raise QuPathError(f"{source}: version {data.get('version')!r} is not supported (expected 1)")
    unknown = data.get("unknown", ERROR)
    if unknown not in (ERROR, IGNORE):
        raise QuPathError(f"{source}: unknown must be 'error' or 'ignore', got {unknown!r}")
    unclassified = data.get("unclassified", IGNORE)
    if unclassified not in (*TARGETS, ERROR):
        raise QuPathError(f"{source}: unclassified must be one of {', '.join((*TARGETS, ERROR))}, got {unclassified!r}")
    classes = data.get("classes")
    if not isinstance(classes, Mapping):
        raise QuPathError(f"{source}: 'classes' must map targets ({', '.join(TARGETS)}) to lists of QuPath names")
    targets: dict[str, str] = {}
    for target, names in classes.items():
        if target not in TARGETS:
            raise QuPathError(f"{source}: classes.{target}: not a target (expected one of {', '.join(TARGETS)})")
        if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
            raise QuPathError(f"{source}: classes.{target}: expected a list of non-empty class names")
        for name in names:
            folded = _fold(name)
            if targets.get(folded, target) != target:
                raise QuPathError(f"{source}: class name {name!r} is listed under {targets[folded]} and {target}")
            targets[folded] = target
    missing = [c for c in CLASS_NAMES if not classes.get(c)]
    if missing:
        raise QuPathError(f"{source}: classes.{missing[0]}: list at least one name (the first is what export writes)")
    tumor, lymphocyte, stroma = (str(classes[c][0]).strip() for c in CLASS_NAMES)
    return ClassMap(targets, (tumor, lymphocyte, stroma), unknown, unclassified, source)


def load_class_map(path: str | os.PathLike[str]) -> ClassMap:
    """Read and validate a class map YAML file (``class_map.yaml``); :class:`QuPathError` names the file and key."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QuPathError(f"{path}: cannot read the class map ({exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise QuPathError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    return class_map_from_dict(data, str(path))


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ImportReport:
    """What reading one QuPath GeoJSON file found (definitions in the module docstring)."""

    source: str
    features: int = 0
    """Features read, nested children included."""
    nuclei: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASS_NAMES, 0))
    """Nuclei written to the label, per class."""
    other: int = 0
    """Nuclei written to the ``_other`` map (ignore class)."""
    unclassified: int = 0
    """Objects without a classification (they follow the class map's ``unclassified``)."""
    unknown_ignored: int = 0
    """Objects whose class name is not in the map, sent to ``_other`` under ``unknown: ignore``."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Objects not drawn, by reason."""
    repaired: int = 0
    """Invalid geometries repaired with ``shapely.make_valid``."""
    overlap_pixels: int = 0
    """Pixels inside more than one object (each went to the smallest)."""
    overlapped_objects: int = 0
    """Objects that lost pixels to a smaller overlapping object."""
    empty: int = 0
    """Objects left with no pixel (outside the image, thinner than a pixel, or under smaller objects)."""
    notes: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "features": self.features,
            "nuclei": dict(self.nuclei),
            "other": self.other,
            "unclassified": self.unclassified,
            "unknown_ignored": self.unknown_ignored,
            "skipped": dict(self.skipped),
            "repaired": self.repaired,
            "overlap_pixels": self.overlap_pixels,
            "overlapped_objects": self.overlapped_objects,
            "empty": self.empty,
            "notes": list(self.notes),
        }

    def as_text(self) -> str:
        """One line: the nuclei per class, then only the counts that are not zero."""
        parts = [", ".join(f"{n} {c}" for c, n in self.nuclei.items()) + f", {self.other} other"]
        for label, n in (
            ("unclassified", self.unclassified),
            ("of unknown class ignored", self.unknown_ignored),
            ("repaired", self.repaired),
            ("overlapping pixels", self.overlap_pixels),
            ("objects cut by overlaps", self.overlapped_objects),
            ("empty objects", self.empty),
        ):
            if n:
                parts.append(f"{n} {label}")
        parts += [f"{n} skipped ({reason})" for reason, n in self.skipped.items()]
        return "; ".join(parts)


@dataclass
class _Object:
    geometry: Any  # a valid shapely Polygon or MultiPolygon
    target: str  # tumor, lymphocyte, stroma or ignore


def _load_json(path: Path) -> Any:
    """Parse a ``.geojson`` or gzip-compressed file (recognised by its bytes, not its name)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return json.loads(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise QuPathError(f"{path}: cannot read ({exc})") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise QuPathError(f"{path}: not valid JSON ({exc})") from exc


def _features(data: Any, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, feature)`` for every feature, children after their parent (``where``: ``feature 3/1``)."""
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        items = data.get("features")
        if not isinstance(items, list):
            raise QuPathError(f"{path}: a FeatureCollection needs a 'features' list")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        items = [data]
    elif isinstance(data, list):
        items = data
    else:
        raise QuPathError(f"{path}: expected a GeoJSON FeatureCollection, a Feature or a list of features")

    def walk(features: list[Any], prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for index, feature in enumerate(features):
            where = f"{prefix}{index}"
            if not isinstance(feature, dict):
                raise QuPathError(f"{path}: feature {where}: expected an object, got {type(feature).__name__}")
            yield where, feature
            properties = feature.get("properties")
            if isinstance(properties, dict):
                children = properties.get("childObjects", properties.get("children"))
                if isinstance(children, list):
                    yield from walk(children, f"{where}/")

    yield from walk(items, "")


def _object_type(feature: dict[str, Any]) -> str:
    """The object type as QuPath reads it (``annotation``, ``detection``, ``cell``, ...; ``unknown``: none)."""
    properties = feature.get("properties") or {}
    for key in ("objectType", "object_type", "type"):  # QuPath 0.3+, 0.2, and the alias QuPath accepts
        value = properties.get(key) if isinstance(properties, dict) else None
        if isinstance(value, str):
            return _LEGACY_TYPES.get(value, value)
    legacy = feature.get("id")
    return _LEGACY_TYPES.get(legacy, "unknown") if isinstance(legacy, str) else "unknown"


def _class_names(classification: Any, where: str) -> list[str]:
    """The parts of a QuPath classification in any of its forms (module docstring); [] for none."""
    if classification is None:
        return []
    if isinstance(classification, str):
        return [p.strip() for p in classification.split(":") if p.strip()]
    if not isinstance(classification, dict):
        raise QuPathError(f"{where}: classification must be an object or a string, got {classification!r}")
    names = classification.get("names")
    if isinstance(names, list):
        return [str(n).strip() for n in names if str(n).strip()]
    name = classification.get("name")
    parent = classification.get("parentClass")  # before QuPath 0.4: a derived class nests its parent
    parts = _class_names(parent, where) if isinstance(parent, dict) else []
    if isinstance(name, str) and name.strip():
        parts.append(name.strip())
    return parts


def _geometry(value: Any, where: str, report: ImportReport) -> Any | None:
    """A GeoJSON geometry as a valid shapely (Multi)Polygon; None when it encloses no area (counted)."""
    import shapely
    from shapely.geometry import shape

    if not isinstance(value, dict) or "type" not in value:
        raise QuPathError(f"{where}: geometry must be a GeoJSON geometry object, got {value!r:.60}")
    try:
        with np.errstate(invalid="ignore"):  # NaN coordinates: refused just below, with the feature named
            geometry = shape(value)
    except Exception as exc:  # shapely raises several types for malformed coordinates
        raise QuPathError(f"{where}: malformed {value.get('type')} geometry ({exc})") from exc
    coords = shapely.get_coordinates(geometry)
    if not np.isfinite(coords).all():
        raise QuPathError(f"{where}: geometry has non-finite coordinates")
    if not shapely.is_valid(geometry):
        reason = shapely.is_valid_reason(geometry)
        geometry = shapely.make_valid(geometry)
        report.repaired += 1
        report.notes.append(f"{where}: invalid geometry ({reason}) repaired with shapely.make_valid")
    # The area parts, whether the geometry is a (Multi)Polygon, a GeometryCollection, or a repair's mix.
    parts = [q for p in shapely.get_parts(geometry) for q in shapely.get_parts(p) if q.geom_type == "Polygon"]
    parts = [p for p in parts if p.area > 0]
    if not parts:
        report.skip("no area: point, line or empty geometry")
        return None
    return parts[0] if len(parts) == 1 else shapely.union_all(parts)


def _objects(path: Path, class_map: ClassMap, report: ImportReport) -> list[_Object]:
    """The nucleus objects of a file with their targets; raises on malformed features and unknown names."""
    objects: list[_Object] = []
    unknown: dict[str, list[str]] = {}
    for index, feature in _features(_load_json(path), path):
        report.features += 1
        where = f"{path}: feature {index}"
        kind = _object_type(feature)
        if kind.casefold() in _NOT_NUCLEI:
            report.skip(_NOT_NUCLEI[kind.casefold()])
            continue
        properties = feature.get("properties") or {}
        if not isinstance(properties, dict):
            raise QuPathError(f"{where}: properties must be an object")
        names = _class_names(properties.get("classification"), where)
        target = class_map.target_of(names)
        if not names:
            report.unclassified += 1
            if target == ERROR:
                raise QuPathError(f"{where}: object has no classification (the class map's unclassified: error)")
        if target is None:
            if class_map.unknown == ERROR:
                unknown.setdefault(": ".join(names), []).append(index)
                continue
            report.unknown_ignored += 1
            target = IGNORE
        if target == SKIP:
            report.skip(f"class {': '.join(names) or 'none'} (skip)")
            continue
        if kind == "cell":
            value = feature.get("nucleusGeometry")
            if value is None:
                report.skip("cell without nucleusGeometry")
                continue
        else:
            value = feature.get("geometry")
        geometry = _geometry(value, where, report)
        if geometry is not None:
            objects.append(_Object(geometry, target))
    if unknown:
        listed = ", ".join(
            f"{name!r} (feature{'s' if len(at) > 1 else ''} {', '.join(at[:5])}{' ...' if len(at) > 5 else ''})"
            for name, at in unknown.items()
        )
        raise QuPathError(
            f"{path}: {len(unknown)} class name(s) not in the class map {class_map.source}: {listed}; "
            "add them to the map, or set unknown: ignore"
        )
    return objects


def _rasterise(
    objects: Sequence[_Object], shape: tuple[int, int], origin: tuple[float, float], report: ImportReport
) -> np.ndarray:
    """The instance map of ``objects`` (object ``k`` has id ``k + 1``) under the centre and overlap rules."""
    import shapely

    height, width = shape
    x0, y0 = origin
    owner = np.zeros((height, width), dtype=np.int32)
    if not objects:
        return owner
    geometries = np.array([o.geometry for o in objects], dtype=object)
    areas = shapely.area(geometries)
    bounds = shapely.bounds(geometries)
    claimed_twice = np.zeros((height, width), dtype=bool)
    cut: set[int] = set()
    # Larger first, so that each smaller object overwrites what it shares; of equal areas the later wins.
    for k in sorted(range(len(objects)), key=lambda i: (-areas[i], i)):
        minx, miny, maxx, maxy = bounds[k]
        c0, c1 = max(0, math.ceil(minx - x0 - 0.5)), min(width - 1, math.floor(maxx - x0 - 0.5))
        r0, r1 = max(0, math.ceil(miny - y0 - 0.5)), min(height - 1, math.floor(maxy - y0 - 0.5))
        if c0 > c1 or r0 > r1:
            continue
        geometry = geometries[k]
        shapely.prepare(geometry)
        xs, ys = np.meshgrid(np.arange(c0, c1 + 1) + x0 + 0.5, np.arange(r0, r1 + 1) + y0 + 0.5)
        inside = shapely.contains_xy(geometry, xs, ys)
        on_edge = shapely.intersects_xy(geometry, xs, ys) & ~inside
        if on_edge.any():
            nudged = (xs[on_edge] + _EDGE_NUDGE[0], ys[on_edge] + _EDGE_NUDGE[1])
            inside[on_edge] = shapely.contains_xy(geometry, *nudged)
        window = owner[r0 : r1 + 1, c0 : c1 + 1]
        shared = inside & (window > 0)
        if shared.any():
            claimed_twice[r0 : r1 + 1, c0 : c1 + 1] |= shared
            cut.update((np.unique(window[shared]) - 1).tolist())
        window[inside] = k + 1
    report.overlap_pixels = int(claimed_twice.sum())
    report.overlapped_objects = len(cut)
    return owner


def read_qupath_instances(
    path: str | os.PathLike[str],
    shape: tuple[int, int],
    class_map: ClassMap,
    origin: tuple[float, float] = (0, 0),
) -> tuple[np.ndarray, dict[int, int], ImportReport]:
    """The objects of a QuPath GeoJSON file as an instance map and a class per instance.

    Returns ``(instances, class_of, report)``: ``instances`` is ``int32`` of ``shape`` (height, width) with
    object ``k`` of the file's nucleus objects as id ``k + 1`` (ids of objects left without pixels are
    absent); ``class_of`` maps every present id to 0, 1, 2 or :data:`nucleiseg.importers.OTHER` (ignore).
    This is what :func:`nucleiseg.importers.write_tile` takes; :func:`read_qupath_geojson` encodes it.
    """
    from nucleiseg.importers import OTHER

    path = Path(path)
    report = ImportReport(str(path))
    objects = _objects(path, class_map, report)
    instances = _rasterise(objects, (int(shape[0]), int(shape[1])), origin, report)
    counts = np.bincount(instances.ravel(), minlength=len(objects) + 1)
    class_of: dict[int, int] = {}
    for k, obj in enumerate(objects, start=1):
        if counts[k] == 0:
            report.empty += 1
            continue
        if obj.target == IGNORE:
            class_of[k] = OTHER
            report.other += 1
        else:
            class_of[k] = CLASS_NAMES.index(obj.target)
            report.nuclei[obj.target] += 1
    return instances, class_of, report


def read_qupath_geojson(
    path: str | os.PathLike[str],
    shape: tuple[int, int],
    class_map: ClassMap,
    origin: tuple[float, float] = (0, 0),
) -> tuple[np.ndarray, np.ndarray, ImportReport]:
    """Read a QuPath GeoJSON file (``.geojson`` or ``.geojson.gz``) into the label encoding.

    ``shape``: the image's ``(height, width)``; ``origin``: ``(x, y)`` of the image's top-left pixel in the
    file's coordinates (a region of a slide; ``(0, 0)`` for a whole image). Returns ``(label, other,
    report)``: ``label`` in the encoding of :mod:`nucleiseg.labels` (``int32``; class = id % 3, ids in file
    order, see "Ids"), ``other`` the instance map (ids 1..K) of ignore-class objects, and the
    :class:`ImportReport`. Rasterisation, overlaps and errors: module docstring.
    """
    from nucleiseg.importers import OTHER
    from nucleiseg.labels import encode, relabel_sequential

    instances, class_of, report = read_qupath_instances(path, shape, class_map, origin)
    label = encode(instances, {k: c for k, c in class_of.items() if c != OTHER}, missing="drop")
    other_ids = np.array([k for k, c in class_of.items() if c == OTHER], dtype=np.int64)
    other = relabel_sequential(np.where(np.isin(instances, other_ids), instances, 0))
    return label, other, report


# ----------------------------------------------------------------------------------------------------------
# Importing a folder
# ----------------------------------------------------------------------------------------------------------


@dataclass
class QuPathImportResult:
    """What happened to one ``<name>`` of the source folder: its report and outputs, or its error."""

    name: str
    image: Path | None
    geojson: Path | None
    outputs: list[Path] = field(default_factory=list)
    report: ImportReport | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": None if self.image is None else str(self.image),
            "geojson": None if self.geojson is None else str(self.geojson),
            "ok": self.ok,
            "outputs": [str(p) for p in self.outputs],
            "report": None if self.report is None else self.report.to_dict(),
            "error": self.error,
        }


def geojson_stem(path: Path) -> str | None:
    """``<name>`` of ``<name>.geojson`` or ``<name>.geojson.gz`` (case-insensitive suffix); None otherwise."""
    lower = path.name.lower()
    for suffix in sorted(GEOJSON_SUFFIXES, key=len, reverse=True):  # .geojson.gz before .geojson
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _pairs(src: Path) -> list[QuPathImportResult]:
    """One unread result per GeoJSON name of ``src``, with its image; an ambiguous or lonely name carries its
    error."""
    from nucleiseg.io import list_images

    images: dict[str, list[Path]] = {}
    for image in list_images(src):
        images.setdefault(image.stem, []).append(image)
    geojsons: dict[str, list[Path]] = {}
    for entry in sorted(src.iterdir()):
        stem = geojson_stem(entry)
        if stem is not None and not entry.name.startswith(".") and entry.is_file():
            geojsons.setdefault(stem, []).append(entry)
    results = []
    for name, found in sorted(geojsons.items()):
        candidates = images.get(name, [])
        result = QuPathImportResult(name, candidates[0] if len(candidates) == 1 else None, found[0])
        if len(found) > 1:
            result.error = f"{found[0]} and {found[1]}: two GeoJSON files for {name!r}; remove the stale one"
        elif len(candidates) > 1:
            result.error = f"{candidates[0]} and {candidates[1]}: two images for {found[0].name}; keep one"
        elif not candidates:
            result.error = f"{found[0]}: no image {name}.<png|tif|tiff|jpg|jpeg|bmp> beside it in {src}"
        results.append(result)
    return results


def import_qupath(
    src_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    class_map: ClassMap,
    *,
    origin: tuple[float, float] | Mapping[str, tuple[float, float]] = (0, 0),
    force: bool = False,
) -> list[QuPathImportResult]:
    """Import every ``<name>.<image>`` with ``<name>.geojson`` (or ``.geojson.gz``) of ``src_dir`` into
    ``out_dir`` as ``<name>.png``, ``<name>_label.png`` and ``<name>_other.png`` (only when the tile has
    ignore-class nuclei; a stale one is removed), written as :mod:`nucleiseg.importers` writes them
    (atomically, the image last).

    ``origin``: ``(x, y)`` of every image's top-left pixel in its GeoJSON's coordinates, or a mapping from
    ``<name>`` to it (names not in it: ``(0, 0)``). ``out_dir`` is checked before anything is read
    (:class:`nucleiseg.outputs.OutputFolder`: apart from ``src_dir``; tile files already there that
    nucleiseg did not write are replaced only with ``force``): a refusal raises :class:`QuPathError`.

    Returns one :class:`QuPathImportResult` per GeoJSON name, in name order. A file that fails (unreadable,
    malformed, unknown class names, no image) fails alone: its result holds the one-line error and nothing
    of it is written; the others go on. Images without a GeoJSON are not listed.
    """
    from nucleiseg.importers import write_tile
    from nucleiseg.io import ImageReadError, read_image
    from nucleiseg.labels import LabelError
    from nucleiseg.outputs import OutputError, OutputFolder

    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise QuPathError(f"{src}: folder not found")
    results = _pairs(src)
    try:
        folder = OutputFolder(out, [src], force)
        folder.claim(f for r in results for f in (f"{r.name}.png", f"{r.name}_label.png", f"{r.name}_other.png"))
    except OutputError as exc:
        raise QuPathError(str(exc)) from None
    for result in results:
        if result.error is not None:
            continue
        assert result.image is not None and result.geojson is not None
        at = origin.get(result.name, (0, 0)) if isinstance(origin, Mapping) else origin
        try:
            image = read_image(result.image)
            instances, class_of, report = read_qupath_instances(result.geojson, image.shape[:2], class_map, at)
            write_tile(out, result.name, image, instances, class_of)
        except (QuPathError, LabelError, ImageReadError) as exc:
            result.error = str(exc)
            continue
        result.report = report
        result.outputs = [p for f in ("_label.png", "_other.png", ".png") if (p := out / f"{result.name}{f}").is_file()]
        folder.record(result.outputs)
    return results


__all__ = [
    "GEOJSON_SUFFIXES",
    "TARGETS",
    "ClassMap",
    "ImportReport",
    "QuPathError",
    "QuPathImportResult",
    "class_map_from_dict",
    "geojson_stem",
    "import_qupath",
    "load_class_map",
    "read_qupath_geojson",
    "read_qupath_instances",
]
