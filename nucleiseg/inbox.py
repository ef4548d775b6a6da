"""The annotations inbox: corrected tiles that land in a folder, staged, checked and merged into the dataset.

Definitions
-----------
inbox
    A folder (params ``data.inbox``) where corrected annotations are dropped. Only its top-level files that do
    not start with a dot are read; its dot-folders hold what was done with earlier arrivals (below).
submission
    The inbox files of one tile ``<name>``: its annotation, either a QuPath GeoJSON export ``<name>.geojson`` /
    ``<name>.geojson.gz`` (kind ``qupath``) or a label in the project's encoding ``<name>_label.png|.tif``
    with an optional ignore map ``<name>_other.png|.tif`` (kind ``labels``); and its H&E image ``<name>.<ext>``
    (any of :data:`nucleiseg.io.IMAGE_SUFFIXES`). The image may be left out when the dataset already holds the
    tile: a pathologist who corrects a tile of the training set drops only its annotation.
waiting
    An image with no annotation, or an annotation whose image is neither in the inbox nor in the dataset. It is
    left where it is (its other half may still be on its way) and reported.
unrecognised
    A file that is neither an image, a GeoJSON, a label nor an ignore map: left where it is, and reported.
staging
    Every submission written as a dataset tile (``<name>.<ext>``, ``<name>_label.png``, ``<name>_other.png``)
    into a fresh folder: label submissions as they are, QuPath submissions rasterised by
    :func:`nucleiseg.qupath.read_qupath_geojson` at the size of their image.
candidate
    The dataset as it would be after the merge: every file of the dataset folder except those of the tiles
    being replaced, plus the staged tiles, as hard links (copies across filesystems). It is what the Great
    Expectations suite checks, so dataset-level expectations (duplicates, the number of tiles) see the result.
merge
    Each staged tile replaces its earlier version in the dataset folder as a whole: the previous files of
    ``<name>`` are first copied to ``replaced/`` of the run's archive, then the staged files are written
    atomically (the label before the image, as the importers do), then the previous files the new version does
    not overwrite (an old ignore map, an image of another format) are removed.
archive
    The inbox files a run consumed are moved to ``<inbox>/.done/<stamp>/`` (with ``record.json``, what the run
    did); a refused set goes to ``<inbox>/.refused/<stamp>/`` with ``REASON.txt``. A file whose content changed
    between the scan and the move (dropped again during the run) is left in the inbox for the next run.

Nothing here knows about Prefect, DVC or MLflow: :mod:`pipelines.retrain` composes these steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nucleiseg.io import IMAGE_SUFFIXES, atomic_path, read_image, write_text_atomic
from nucleiseg.labels import CLASS_NAMES, LABEL_SUFFIXES, classes_of, label_suffix, read_label, write_label

if TYPE_CHECKING:
    from nucleiseg.qupath import ImportReport

GEOJSON_SUFFIXES = (".geojson", ".geojson.gz")
DONE = ".done"
REFUSED = ".refused"
LABEL_SUFFIX = "_label"


class InboxError(ValueError):
    """A submission cannot be staged (malformed GeoJSON, an unreadable image, two annotations of one tile).
    The message names the file."""


@dataclass
class Submission:
    """The inbox files of one tile (see the module docstring)."""

    name: str
    kind: str  # qupath | labels
    annotation: Path  # the GeoJSON or the label
    other: Path | None = None  # the ignore map of a labels submission
    image: Path | None = None  # None: the dataset's image of the tile is used

    @property
    def files(self) -> list[Path]:
        """The inbox files this submission consumes."""
        return [p for p in (self.image, self.annotation, self.other) if p is not None]


@dataclass
class InboxScan:
    """What an inbox holds: submissions, files waiting for their other half, files not recognised, and the
    SHA-256 of every file seen (so that a file changed during the run is not archived unprocessed)."""

    inbox: Path
    submissions: list[Submission] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    unrecognised: list[str] = field(default_factory=list)
    errors: list[tuple[list[Path], str]] = field(default_factory=list)  # files that cannot form a submission, why
    digests: dict[str, str] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        """The files of the set: every submission's, and those of the errors."""
        return [*(p for s in self.submissions for p in s.files), *(p for files, _ in self.errors for p in files)]


@dataclass
class StagedTile:
    """One submission written to the staging folder: its files there, and what the import said."""

    name: str
    kind: str
    files: list[str]  # names in the staging folder, label first, image last
    sources: list[str]  # inbox file names
    image_from_dataset: bool  # the image was the dataset's, not the inbox's
    replaces: bool  # the dataset already holds a tile of this name
    nuclei: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)  # the QuPath import report


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _split(name: str) -> tuple[str, str]:
    """``(stem, suffix)`` with the double suffix ``.geojson.gz`` kept whole."""
    lower = name.lower()
    for suffix in (*GEOJSON_SUFFIXES, *IMAGE_SUFFIXES):
        if lower.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def tile_files(folder: str | os.PathLike[str], name: str, ignore_suffix: str = "_other") -> list[Path]:
    """The files of tile ``name`` in a dataset folder: its image (any format), its label and its ignore map."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = {f"{name}{s}" for s in IMAGE_SUFFIXES}
    wanted |= {f"{name}{extra}{s}" for extra in (LABEL_SUFFIX, ignore_suffix) for s in LABEL_SUFFIXES}
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower() in {w.lower() for w in wanted})


def _dataset_image(data_dir: Path, name: str) -> Path | None:
    return next((p for s in IMAGE_SUFFIXES if (p := data_dir / f"{name}{s}").is_file()), None)


def scan_inbox(
    inbox: str | os.PathLike[str], data_dir: str | os.PathLike[str], ignore_suffix: str = "_other"
) -> InboxScan:
    """Group the inbox's top-level files into submissions (module docstring); a missing inbox is empty."""
    inbox, data_dir = Path(inbox), Path(data_dir)
    scan = InboxScan(inbox=inbox)
    if not inbox.is_dir():
        return scan
    images: dict[str, Path] = {}
    geojsons: dict[str, list[Path]] = {}
    labels: dict[str, Path] = {}
    others: dict[str, Path] = {}
    for path in sorted(inbox.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue  # archives, and the temporaries of a copy in progress
        scan.digests[path.name] = _sha256(path)
        stem, suffix = _split(path.name)
        if suffix in GEOJSON_SUFFIXES:
            geojsons.setdefault(stem, []).append(path)
        elif suffix in LABEL_SUFFIXES and stem.endswith(LABEL_SUFFIX):
            labels[stem[: -len(LABEL_SUFFIX)]] = path
        elif suffix in LABEL_SUFFIXES and stem.endswith(ignore_suffix):
            others[stem[: -len(ignore_suffix)]] = path
        elif suffix in IMAGE_SUFFIXES:
            images[stem] = path
        else:
            scan.unrecognised.append(path.name)
    for name in sorted({*images, *geojsons, *labels, *others}):
        found = [*geojsons.get(name, []), *([labels[name]] if name in labels else [])]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            files = [*found, *(p for p in (images.get(name), others.get(name)) if p is not None)]
            scan.errors.append((files, f"{inbox / name}: {len(found)} annotations of one tile ({names}); keep one"))
            continue
        if not found:
            scan.waiting += [p.name for p in (images.get(name), others.get(name)) if p is not None]
            continue
        annotation = found[0]
        if name in others and annotation.suffix.lower() not in LABEL_SUFFIXES:
            message = (
                f"{others[name]}: an ignore map beside a QuPath GeoJSON; the import writes it from the GeoJSON's "
                "objects of no class"
            )
            files = [annotation, others[name], *([images[name]] if name in images else [])]
            scan.errors.append((files, message))
            continue
        image = images.get(name)
        if image is None and _dataset_image(data_dir, name) is None:
            scan.waiting.append(annotation.name)  # its image may still be on its way
            continue
        kind = "labels" if annotation.suffix.lower() in LABEL_SUFFIXES else "qupath"
        scan.submissions.append(Submission(name, kind, annotation, others.get(name), image))
    return scan


# (path, (height, width)) -> (label, other, report): nucleiseg.qupath.read_qupath_geojson with a class map
QupathReader = Callable[[Path, tuple[int, int]], tuple[np.ndarray, np.ndarray, "ImportReport"]]


def _nuclei_per_class(label: np.ndarray) -> dict[str, int]:
    counts = np.bincount(list(classes_of(np.asarray(label)).values()), minlength=len(CLASS_NAMES))
    return {name: int(n) for name, n in zip(CLASS_NAMES, counts, strict=True)}


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def stage_submission(
    submission: Submission,
    data_dir: str | os.PathLike[str],
    staging_dir: str | os.PathLike[str],
    read_qupath: QupathReader | None = None,
    ignore_suffix: str = "_other",
) -> StagedTile:
    """Write one submission as a dataset tile into ``staging_dir`` (see the module docstring).

    ``read_qupath(path, (height, width)) -> (label, other, report)`` rasterises a QuPath GeoJSON (the pipeline
    passes :func:`nucleiseg.qupath.read_qupath_geojson` with the project's class map). Raises
    :class:`InboxError` naming the file when the image cannot be read or the annotation cannot be imported.
    Label submissions are copied as they are: the validation suite judges them, and names what is wrong.
    """
    data_dir, staging_dir = Path(data_dir), Path(staging_dir)
    staging_dir.mkdir(parents=True, exist_ok=True)
    image_src = submission.image or _dataset_image(data_dir, submission.name)
    if image_src is None:
        raise InboxError(f"{submission.annotation}: no image {submission.name}.<png|tif|...> in the inbox or dataset")
    image_dst = staging_dir / image_src.name
    staged = StagedTile(
        name=submission.name,
        kind=submission.kind,
        files=[],
        sources=[p.name for p in submission.files],
        image_from_dataset=submission.image is None,
        replaces=bool(tile_files(data_dir, submission.name, ignore_suffix)),
    )
    if submission.kind == "labels":
        label_dst = staging_dir / submission.annotation.name
        _copy_atomic(submission.annotation, label_dst)
        staged.files.append(label_dst.name)
        if submission.other is not None:
            _copy_atomic(submission.other, staging_dir / submission.other.name)
            staged.files.append(submission.other.name)
        try:
            staged.nuclei = _nuclei_per_class(read_label(label_dst))
        except ValueError:
            pass  # an unreadable label is the validation suite's to report, with the file's name
    else:
        if read_qupath is None:
            raise InboxError(f"{submission.annotation}: QuPath GeoJSON needs a reader (nucleiseg.qupath)")
        try:
            height, width = read_image(image_src).shape[:2]
        except ValueError as exc:
            raise InboxError(f"{image_src}: {exc}") from exc
        try:
            label, other, report = read_qupath(submission.annotation, (height, width))
        except Exception as exc:  # any failure of the import is this file's: name it, keep the reason
            message = str(exc)
            if submission.annotation.name not in message:
                message = f"{submission.annotation}: {message}"
            raise InboxError(message) from exc
        label_dst = staging_dir / f"{submission.name}{LABEL_SUFFIX}{label_suffix(label)}"
        write_label(label_dst, label)
        staged.files.append(label_dst.name)
        if other is not None and other.any():
            other_dst = staging_dir / f"{submission.name}{ignore_suffix}{label_suffix(other)}"
            write_label(other_dst, other)
            staged.files.append(other_dst.name)
        staged.nuclei = _nuclei_per_class(label)
        staged.notes = report.to_dict()
    _copy_atomic(image_src, image_dst)  # the image's bytes as they are: nothing re-encoded
    staged.files.append(image_dst.name)  # last: a tile is complete once its image is in place
    return staged


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def build_candidate(
    data_dir: str | os.PathLike[str],
    staging_dir: str | os.PathLike[str],
    staged: Sequence[StagedTile],
    candidate_dir: str | os.PathLike[str],
    ignore_suffix: str = "_other",
) -> Path:
    """The dataset as the merge would leave it (module docstring), as links in ``candidate_dir``."""
    data_dir, staging_dir, candidate_dir = Path(data_dir), Path(staging_dir), Path(candidate_dir)
    candidate_dir.mkdir(parents=True, exist_ok=True)
    replaced = {p.name for tile in staged for p in tile_files(data_dir, tile.name, ignore_suffix)}
    if data_dir.is_dir():
        for path in sorted(data_dir.iterdir()):
            if path.is_file() and not path.name.startswith(".") and path.name not in replaced:
                _link_or_copy(path, candidate_dir / path.name)
    for tile in staged:
        for name in tile.files:
            _link_or_copy(staging_dir / name, candidate_dir / name)
    return candidate_dir


def merge_staged(
    data_dir: str | os.PathLike[str],
    staging_dir: str | os.PathLike[str],
    staged: Sequence[StagedTile],
    replaced_dir: str | os.PathLike[str],
    ignore_suffix: str = "_other",
) -> dict[str, list[str]]:
    """Merge the staged tiles into the dataset folder (module docstring); returns ``{"added": [names],
    "replaced": [names], "removed": [files of earlier versions not overwritten]}``."""
    data_dir, staging_dir, replaced_dir = Path(data_dir), Path(staging_dir), Path(replaced_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, list[str]] = {"added": [], "replaced": [], "removed": []}
    for tile in staged:
        previous = tile_files(data_dir, tile.name, ignore_suffix)
        for path in previous:  # kept beside the run's record, as well as in the DVC cache
            replaced_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, replaced_dir / path.name)
        for name in tile.files:  # label first, image last
            _copy_atomic(staging_dir / name, data_dir / name)
        for path in previous:
            if path.name not in tile.files:
                path.unlink()
                outcome["removed"].append(path.name)
        outcome["replaced" if previous else "added"].append(tile.name)
    return outcome


def run_stamp(now: datetime | None = None) -> str:
    """A folder name for a run's archive: its UTC time to the second, sortable."""
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def archive_folder(inbox: str | os.PathLike[str], kind: str, stamp: str) -> Path:
    """A new folder ``<inbox>/<kind>/<stamp>`` (``-2``, ``-3``... when that stamp is taken)."""
    base = Path(inbox) / kind
    folder, n = base / stamp, 1
    while folder.exists():
        n += 1
        folder = base / f"{stamp}-{n}"
    folder.mkdir(parents=True)
    return folder


def archive_files(scan: InboxScan, files: Iterable[Path], dest: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Move ``files`` (inbox files of ``scan``) into ``dest``; a file whose content changed since the scan, or
    that is gone, stays. Returns ``{"moved": [...], "kept": [...]}`` (names)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, list[str]] = {"moved": [], "kept": []}
    for path in files:
        if path.is_file() and _sha256(path) == scan.digests.get(path.name):
            shutil.move(path, dest / path.name)
            outcome["moved"].append(path.name)
        else:
            outcome["kept"].append(path.name)
    return outcome


def write_record(folder: str | os.PathLike[str], record: dict[str, Any], reason: str | None = None) -> None:
    """``record.json`` in an archive folder, and ``REASON.txt`` (for a refused set) when ``reason`` is given."""
    folder = Path(folder)
    write_text_atomic(folder / "record.json", json.dumps(record, indent=2, default=str) + "\n")
    if reason is not None:
        write_text_atomic(folder / "REASON.txt", reason.rstrip("\n") + "\n")


__all__ = [
    "DONE",
    "GEOJSON_SUFFIXES",
    "REFUSED",
    "InboxError",
    "InboxScan",
    "StagedTile",
    "Submission",
    "archive_files",
    "archive_folder",
    "build_candidate",
    "merge_staged",
    "run_stamp",
    "scan_inbox",
    "stage_submission",
    "tile_files",
    "write_record",
]
