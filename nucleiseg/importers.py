"""Dataset importers: public nuclei datasets turned into tiles in the paper's label encoding.

Every importer writes, for each tile ``<name>`` of the source, into ``OUT_DIR``:

- ``<name>.png``: the RGB tile (8-bit);
- ``<name>_label.png``: the label (16-bit, :mod:`nucleiseg.labels` encoding: class = id % 3);
- ``<name>_other.png``: only when the source has nuclei of no mapped class, a 16-bit instance map of those
  nuclei (ids 1..K), to be ignored in evaluation. A stale ``_other.png`` from an earlier import of the same
  tile is removed when the tile has none.

Each file is written atomically and the image is written last, so an interrupted import never leaves a tile
that :func:`nucleiseg.io.list_images` would pick up with a missing or half-written label. Before any tile is
read, ``OUT_DIR`` is checked with :mod:`nucleiseg.outputs`: it must be apart from what is read (the folders of
CoNSeP images and labels, PanNuke's two arrays, the source folder), and a tile file already there that
nucleiseg did not write is replaced only with ``force`` (what is written is recorded). A tile that cannot be
read does not stop the others: the importer goes on, then raises :class:`SourceError` listing every failed tile
(each message names the file and the problem), with the summary of what was written attached.

Formats
-------
``consep``
    The official CoNSeP release. ``SRC`` is the dataset root holding ``Train/`` and/or ``Test/``, or one of
    those folders; each holds ``Images/<name>.png`` and ``Labels/<name>.mat`` with ``inst_map`` (H x W,
    instance ids) and ``inst_type`` (type of instance ``i`` at row ``i - 1``). Types 3, 4 (epithelial) ->
    tumor, 2 (inflammatory) -> lymphocyte, 5, 6, 7 (fibroblast, muscle, endothelial) -> stroma,
    1 (other) -> other. Tiles keep their CoNSeP names (``train_1``, ``test_3``).
``pannuke``
    One PanNuke fold. ``SRC`` holds ``images.npy`` (N x 256 x 256 x 3, values 0-255) and ``masks.npy``
    (N x 256 x 256 x 6: neoplastic, inflammatory, connective, dead, epithelial, background; channels 0-4 hold
    instance ids), either directly or in the official layout ``images/<fold>/images.npy`` and
    ``masks/<fold>/masks.npy``. Neoplastic and epithelial -> tumor, inflammatory -> lymphocyte,
    connective -> stroma, dead -> other. Tiles are named ``<fold>_<index>``; the fold is the name of the
    folder holding ``images.npy`` (lower-cased, spaces removed: ``Fold 1`` -> ``fold1``) unless given. The
    arrays are memory-mapped, so a 2,600-image fold is not loaded whole. A pixel claimed by several channels
    goes to the first of them in the order above.
``folder``
    Your own data. ``SRC`` holds, per tile, an RGB image ``<name>.<png|tif|tiff|jpg|jpeg|bmp>``, an instance
    map ``<name>_inst.<png|tif|tiff>`` (0 background, one positive integer id per nucleus; 16-bit PNG, or TIFF
    for larger ids) and the classes either in a per-tile ``<name>.csv`` with the header ``id,class`` or in
    one ``classes.csv`` with the header ``image,id,class`` (``image`` is the tile name without suffix; when
    ``classes.csv`` exists it is the only CSV read). ``class`` is ``tumor``, ``lymphocyte``, ``stroma`` or
    ``other`` (case-insensitive) or an index 0, 1, 2. Every id of the instance map needs a row; rows for ids
    absent from the map are ignored and reported in the summary's notes. Tiles are named ``<name>``.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nucleiseg.io import ImageReadError, list_images, read_image, write_image
from nucleiseg.labels import CLASS_NAMES, LabelError, class_index, encode, read_label, relabel_sequential, write_label
from nucleiseg.outputs import OutputError, OutputFolder

FORMATS = ("consep", "pannuke", "folder")
OTHER = -1  # class value of a nucleus that belongs to no class of the paper
OTHER_NAME = "other"

CONSEP_TYPE_TO_CLASS: dict[int, int] = {1: OTHER, 2: 1, 3: 0, 4: 0, 5: 2, 6: 2, 7: 2}
PANNUKE_CHANNELS = ("neoplastic", "inflammatory", "connective", "dead", "epithelial", "background")
PANNUKE_CHANNEL_TO_CLASS: dict[int, int] = {0: 0, 1: 1, 2: 2, 3: OTHER, 4: 0}
INSTANCE_SUFFIXES = (".png", ".tif", ".tiff")


class SourceError(ValueError):
    """A dataset source is missing, malformed or inconsistent. The message names the file and the problem.

    When some tiles were imported before the error was raised, ``summary`` describes what was written.
    """

    def __init__(self, message: str, summary: ImportSummary | None = None) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass
class ImportSummary:
    """What an import wrote: tiles, nuclei per class, nuclei of no class, and the tiles that failed."""

    format: str
    out_dir: Path
    tiles: list[str] = field(default_factory=list)
    nuclei: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASS_NAMES, 0))
    other: int = 0
    tiles_with_other: int = 0
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, name: str, counts: Mapping[int, int]) -> None:
        self.tiles.append(name)
        for c, class_name in enumerate(CLASS_NAMES):
            self.nuclei[class_name] += counts.get(c, 0)
        self.other += counts.get(OTHER, 0)
        self.tiles_with_other += bool(counts.get(OTHER, 0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "out_dir": str(self.out_dir),
            "tiles": len(self.tiles),
            "nuclei": dict(self.nuclei),
            "other": self.other,
            "tiles_with_other": self.tiles_with_other,
            "notes": list(self.notes),
            "errors": list(self.errors),
        }

    def as_text(self, errors: bool = True) -> str:
        per_class = ", ".join(f"{n} {name}" for name, n in self.nuclei.items())
        lines = [
            f"{self.format}: {len(self.tiles)} tile(s) written to {self.out_dir}",
            f"nuclei: {per_class}; {self.other} other (in _other.png of {self.tiles_with_other} tile(s))",
        ]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"failed: {e}" for e in self.errors] if errors else []
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Shared writing
# ----------------------------------------------------------------------------------------------------------


def write_tile(
    out_dir: Path, name: str, image: np.ndarray, instance_map: np.ndarray, class_of: Mapping[int, int]
) -> dict[int, int]:
    """Write one tile from an instance map and a class (0, 1, 2 or :data:`OTHER`) per instance id.

    Returns the number of nuclei per class (with ``OTHER`` for the nuclei of no class).
    """
    ids = np.unique(instance_map)
    ids = ids[ids > 0].tolist()
    mapped = {i: class_of[i] for i in ids if class_of[i] != OTHER}
    other_ids = np.array([i for i in ids if class_of[i] == OTHER], dtype=np.int64)
    label = encode(instance_map, mapped, missing="drop")
    label_path = out_dir / f"{name}_label.png"
    other_path = out_dir / f"{name}_other.png"
    write_label(label_path, label)
    if len(other_ids):
        other = relabel_sequential(np.where(np.isin(instance_map, other_ids), instance_map, 0))
        write_label(other_path, other)
    elif other_path.exists():
        other_path.unlink()
    write_image(out_dir / f"{name}.png", image)  # last: the tile appears only once its label is in place
    counts: dict[int, int] = {}
    for i in ids:
        counts[class_of[i]] = counts.get(class_of[i], 0) + 1
    return counts


def _tile_files(name: str) -> tuple[str, str, str]:
    """The files :func:`write_tile` may write (or remove) for tile ``name``."""
    return f"{name}.png", f"{name}_label.png", f"{name}_other.png"


def _run(
    fmt: str,
    out_dir: str | os.PathLike[str],
    tiles: Iterator[tuple[str, Callable[[], tuple]]],
    inputs: list[Path],
    force: bool = False,
) -> ImportSummary:
    """Check the output folder against the files and folders read (``inputs``), then load and write every
    tile; collect failures; raise once at the end if any tile failed."""
    out = Path(out_dir)
    summary = ImportSummary(format=fmt, out_dir=out)
    listed = list(tiles)  # names only: the tiles load later, one at a time
    try:
        folder = OutputFolder(out, inputs, force)
        folder.claim(file for name, _ in listed for file in _tile_files(name))
    except OutputError as exc:
        raise SourceError(str(exc)) from None
    for name, load in listed:
        try:
            if name in summary.tiles:
                raise SourceError(f"{name}: two source tiles have this name; the second was not imported")
            image, instance_map, class_of, notes = load()
            if image.shape[:2] != instance_map.shape:
                raise SourceError(
                    f"{name}: image is {image.shape[0]}x{image.shape[1]} but its instance map is "
                    f"{instance_map.shape[0]}x{instance_map.shape[1]}"
                )
            summary.add(name, write_tile(out, name, image, instance_map, class_of))
            folder.record(out / file for file in _tile_files(name) if (out / file).is_file())
            summary.notes.extend(notes)
        except (SourceError, LabelError, ImageReadError) as exc:
            summary.errors.append(str(exc))
    if summary.errors:
        raise SourceError(
            f"{len(summary.errors)} of {len(summary.errors) + len(summary.tiles)} tile(s) could not be imported "
            f"({len(summary.tiles)} written to {out}):\n  " + "\n  ".join(summary.errors),
            summary,
        )
    if not summary.tiles:
        raise SourceError(f"no tiles were found to import ({fmt})", summary)
    return summary


def _integer_ids(array: np.ndarray, where: str, what: str) -> np.ndarray:
    """An array of instance ids stored as float (as in .mat and PanNuke files) checked and cast to int32."""
    array = np.asarray(array)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise SourceError(f"{where}: {what} must hold numbers, got {array.dtype}")
    if array.size:
        if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
            raise SourceError(f"{where}: {what} holds non-integer values")
        if array.min() < 0:
            raise SourceError(f"{where}: {what} holds negative values")
        if array.max() > np.iinfo(np.int32).max:
            raise SourceError(f"{where}: {what} holds ids too large ({array.max():.0f})")
    return array.astype(np.int32)


# ----------------------------------------------------------------------------------------------------------
# CoNSeP
# ----------------------------------------------------------------------------------------------------------


def _consep_splits(src: Path) -> list[Path]:
    if not src.is_dir():
        raise SourceError(f"{src}: CoNSeP folder not found")
    if (src / "Images").is_dir() or (src / "Labels").is_dir():
        splits = [src]
    else:
        splits = [src / s for s in ("Train", "Test") if (src / s).is_dir()]
    if not splits:
        raise SourceError(f"{src}: not a CoNSeP folder (expected Train/ and/or Test/, or Images/ and Labels/)")
    for split in splits:
        for sub in ("Images", "Labels"):
            if not (split / sub).is_dir():
                raise SourceError(f"{split / sub}: folder not found (CoNSeP layout: Images/*.png, Labels/*.mat)")
    return splits


def _load_consep(image_path: Path, mat_path: Path) -> tuple:
    from scipy.io import loadmat

    if not mat_path.is_file():
        raise SourceError(f"{mat_path}: label file not found for image {image_path.name}")
    try:
        mat = loadmat(mat_path)
    except Exception as exc:  # scipy raises several types for corrupt files
        raise SourceError(f"{mat_path}: not a readable .mat file ({exc})") from exc
    for key in ("inst_map", "inst_type"):
        if key not in mat:
            found = ", ".join(sorted(k for k in mat if not k.startswith("__"))) or "nothing"
            raise SourceError(f"{mat_path}: no '{key}' variable (found: {found})")
    inst = _integer_ids(mat["inst_map"], str(mat_path), "inst_map")
    if inst.ndim != 2:
        raise SourceError(f"{mat_path}: inst_map must be 2-D, got shape {inst.shape}")
    types = _integer_ids(np.asarray(mat["inst_type"]).ravel(), str(mat_path), "inst_type")
    image = read_image(image_path)
    if image.shape[:2] != inst.shape:
        raise SourceError(
            f"{mat_path}: inst_map is {inst.shape[0]}x{inst.shape[1]} but {image_path.name} is "
            f"{image.shape[0]}x{image.shape[1]}"
        )
    ids = np.unique(inst)
    ids = ids[ids > 0]
    if len(ids) and ids[-1] > len(types):
        raise SourceError(f"{mat_path}: inst_map has id {ids[-1]} but inst_type lists only {len(types)} types")
    class_of: dict[int, int] = {}
    for i in ids.tolist():
        t = int(types[i - 1])
        if t not in CONSEP_TYPE_TO_CLASS:
            raise SourceError(f"{mat_path}: instance {i} has unknown type {t} (CoNSeP types are 1-7)")
        class_of[i] = CONSEP_TYPE_TO_CLASS[t]
    return image, inst, class_of, []


def import_consep(src: str | os.PathLike[str], out_dir: str | os.PathLike[str], force: bool = False) -> ImportSummary:
    """Import the official CoNSeP layout (see the module docstring) into ``out_dir``."""
    splits = _consep_splits(Path(src))

    def tiles() -> Iterator[tuple[str, Callable[[], tuple]]]:
        for split in splits:
            images = list_images(split / "Images")
            if not images:
                raise SourceError(f"{split / 'Images'}: no images found")
            for image_path in images:
                mat_path = split / "Labels" / f"{image_path.stem}.mat"
                yield image_path.stem, lambda i=image_path, m=mat_path: _load_consep(i, m)

    return _run(
        "consep", out_dir, tiles(), [p for split in splits for p in (split / "Images", split / "Labels")], force
    )


# ----------------------------------------------------------------------------------------------------------
# PanNuke
# ----------------------------------------------------------------------------------------------------------


def _find_npy(src: Path, name: str) -> Path:
    direct = src / f"{name}.npy"
    if direct.is_file():
        return direct
    nested = sorted(src.glob(f"{name}/*/{name}.npy"))  # official layout: images/fold1/images.npy
    if len(nested) == 1:
        return nested[0]
    if len(nested) > 1:
        raise SourceError(f"{src}: several {name}.npy found ({', '.join(map(str, nested))}); point SRC at one fold")
    raise SourceError(f"{direct}: file not found (PanNuke layout: images.npy and masks.npy of one fold)")


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # corrupt header, pickled object arrays, truncated data
        raise SourceError(f"{path}: not a readable .npy array ({exc})") from exc


def _load_pannuke(images: np.ndarray, masks: np.ndarray, k: int, images_path: Path, masks_path: Path) -> tuple:
    where_image = f"{images_path} [image {k}]"
    image = np.asarray(images[k])
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.number) or image.min() < 0 or image.max() > 255:
            raise SourceError(f"{where_image}: values must be 0-255")
        image = np.round(image).astype(np.uint8)
    where_mask = f"{masks_path} [image {k}]"
    mask = _integer_ids(np.asarray(masks[k][..., :5]), where_mask, "instance channels")
    n_channels = mask.shape[2]
    # Ids are unique within a channel only: key an instance by (id, channel).
    inst = np.zeros(mask.shape[:2], dtype=np.int64)
    for ch in range(n_channels):
        ids = mask[..., ch]
        take = (ids > 0) & (inst == 0)  # a pixel claimed twice stays with the first channel
        inst[take] = ids[take].astype(np.int64) * n_channels + ch + 1
    keys = np.unique(inst)
    keys = keys[keys > 0].tolist()
    class_of = {key: PANNUKE_CHANNEL_TO_CLASS[(key - 1) % n_channels] for key in keys}
    return image, _as_int32(_relabel_keys(inst, keys), where_mask), _renumber(class_of, keys), []


def _relabel_keys(inst: np.ndarray, keys: list[int]) -> np.ndarray:
    """Replace the sorted instance keys by 1..K (keeps ids small whatever the source ids were)."""
    lookup = np.searchsorted(np.asarray(keys, dtype=np.int64), inst) + 1
    return np.where(inst > 0, lookup, 0)


def _renumber(class_of: dict[int, int], keys: list[int]) -> dict[int, int]:
    return {k + 1: class_of[key] for k, key in enumerate(keys)}


def _as_int32(array: np.ndarray, where: str) -> np.ndarray:
    if array.size and array.max() > np.iinfo(np.int32).max:
        raise SourceError(f"{where}: too many instances")
    return array.astype(np.int32)


def import_pannuke(
    src: str | os.PathLike[str], out_dir: str | os.PathLike[str], fold: str | None = None, force: bool = False
) -> ImportSummary:
    """Import one PanNuke fold (see the module docstring) into ``out_dir``; tiles are ``<fold>_<index>``.

    ``fold`` names the tiles; by default the name of the folder holding ``images.npy``.
    """
    src = Path(src)
    if not src.is_dir():
        raise SourceError(f"{src}: PanNuke fold folder not found")
    images_path = _find_npy(src, "images")
    masks_path = _find_npy(src, "masks")
    images = _load_npy(images_path)
    masks = _load_npy(masks_path)
    if images.ndim != 4 or images.shape[3] != 3:
        raise SourceError(f"{images_path}: expected N x H x W x 3 RGB images, got shape {images.shape}")
    if masks.ndim != 4 or masks.shape[3] != len(PANNUKE_CHANNELS):
        raise SourceError(
            f"{masks_path}: expected N x H x W x 6 masks ({', '.join(PANNUKE_CHANNELS)}), got shape {masks.shape}"
        )
    if masks.shape[:3] != images.shape[:3]:
        raise SourceError(
            f"{masks_path}: shape {masks.shape[:3]} does not match {images_path.name} shape {images.shape[:3]}"
        )
    fold = fold or re.sub(r"\s+", "", images_path.parent.name).lower()
    if not fold or not re.fullmatch(r"[\w.-]+", fold):
        raise SourceError(f"{src}: cannot use {fold!r} as a fold name; pass fold=")

    def tiles() -> Iterator[tuple[str, Callable[[], tuple]]]:
        for k in range(images.shape[0]):
            yield f"{fold}_{k}", lambda k=k: _load_pannuke(images, masks, k, images_path, masks_path)

    return _run("pannuke", out_dir, tiles(), [images_path, masks_path], force)


# ----------------------------------------------------------------------------------------------------------
# Folder of instance maps + CSV
# ----------------------------------------------------------------------------------------------------------


def _parse_class(value: str, where: str) -> int:
    if value.strip().lower() == OTHER_NAME:
        return OTHER
    try:
        return class_index(value)
    except ValueError as exc:
        raise SourceError(f"{where}: {exc}") from exc


def _read_class_csv(path: Path, with_image: bool) -> dict[str, dict[int, int]]:
    """Rows of a class CSV grouped by image (key ``""`` for a per-tile CSV): id -> class."""
    required = ["image", "id", "class"] if with_image else ["id", "class"]
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            if any(col not in header for col in required):
                raise SourceError(f"{path}: header must have columns {','.join(required)}, got {','.join(header)}")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"{path}: cannot read the CSV ({exc})") from exc
    grouped: dict[str, dict[int, int]] = {}
    for line, raw in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
        where = f"{path} line {line}"
        if not any(row.values()):
            continue
        try:
            nucleus = int(row["id"])
        except ValueError as exc:
            raise SourceError(f"{where}: id {row['id']!r} is not an integer") from exc
        if nucleus <= 0:
            raise SourceError(f"{where}: id must be positive, got {nucleus}")
        c = _parse_class(row["class"], where)
        image = row["image"] if with_image else ""
        if with_image and not image:
            raise SourceError(f"{where}: empty image name")
        classes = grouped.setdefault(image, {})
        if classes.get(nucleus, c) != c:
            raise SourceError(f"{where}: id {nucleus} given two different classes")
        classes[nucleus] = c
    return grouped


def _instance_map_path(src: Path, name: str) -> Path:
    for suffix in INSTANCE_SUFFIXES:
        path = src / f"{name}_inst{suffix}"
        if path.is_file():
            return path
    raise SourceError(f"{src / (name + '_inst.png')}: instance map not found for image {name}")


def _load_folder(image_path: Path, inst_path: Path, classes: dict[int, int], csv_path: Path) -> tuple:
    inst = read_label(inst_path)
    image = read_image(image_path)
    if image.shape[:2] != inst.shape:
        raise SourceError(
            f"{inst_path}: instance map is {inst.shape[0]}x{inst.shape[1]} but {image_path.name} is "
            f"{image.shape[0]}x{image.shape[1]}"
        )
    ids = np.unique(inst)
    ids = ids[ids > 0].tolist()
    unclassified = [i for i in ids if i not in classes]
    if unclassified:
        shown = ", ".join(map(str, unclassified[:20])) + (" ..." if len(unclassified) > 20 else "")
        raise SourceError(f"{csv_path}: no class for {len(unclassified)} id(s) of {inst_path.name}: {shown}")
    notes = []
    absent = set(classes) - set(ids)
    if absent:
        notes.append(f"{csv_path}: {len(absent)} id(s) listed for {image_path.stem} are not in {inst_path.name}")
    return image, inst, {i: classes[i] for i in ids}, notes


def import_folder(src: str | os.PathLike[str], out_dir: str | os.PathLike[str], force: bool = False) -> ImportSummary:
    """Import a folder of RGB tiles, instance maps and class CSVs (see the module docstring) into ``out_dir``."""
    src = Path(src)
    if not src.is_dir():
        raise SourceError(f"{src}: folder not found")
    images = list_images(src, exclude_suffixes=("_label", "_other", "_inst"))
    if not images:
        raise SourceError(f"{src}: no images found (expected <name>.png with <name>_inst.png and class CSV)")
    shared_csv = src / "classes.csv"
    shared = _read_class_csv(shared_csv, with_image=True) if shared_csv.is_file() else None
    if shared is not None:
        unknown = sorted(set(shared) - {p.stem for p in images})
        if unknown:
            raise SourceError(f"{shared_csv}: rows for images not in {src}: {', '.join(unknown[:10])}")

    def load(image_path: Path) -> tuple:
        name = image_path.stem
        if shared is not None:
            csv_path, classes = shared_csv, shared.get(name, {})
        else:
            csv_path = src / f"{name}.csv"
            if not csv_path.is_file():
                raise SourceError(f"{csv_path}: class CSV not found for image {image_path.name} (or use classes.csv)")
            classes = _read_class_csv(csv_path, with_image=False).get("", {})
        return _load_folder(image_path, _instance_map_path(src, name), classes, csv_path)

    def tiles() -> Iterator[tuple[str, Callable[[], tuple]]]:
        for image_path in images:
            yield image_path.stem, lambda p=image_path: load(p)

    return _run("folder", out_dir, tiles(), [src], force)


IMPORTERS: dict[str, Callable[..., ImportSummary]] = {
    "consep": import_consep,
    "pannuke": import_pannuke,
    "folder": import_folder,
}


def import_dataset(fmt: str, src: str | os.PathLike[str], out_dir: str | os.PathLike[str], **options) -> ImportSummary:
    """Run the importer of format ``fmt`` (one of :data:`FORMATS`); ``options``: ``fold`` (pannuke), ``force``."""
    if fmt not in IMPORTERS:
        raise SourceError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    return IMPORTERS[fmt](src, out_dir, **options)


__all__ = [
    "FORMATS",
    "OTHER",
    "ImportSummary",
    "SourceError",
    "import_consep",
    "import_dataset",
    "import_folder",
    "import_pannuke",
    "write_tile",
]
