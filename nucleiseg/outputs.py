"""Output safety: where a command may write, and what it may replace.

Every ``nucleiseg`` command that writes goes through this module, before any work, so that a wrong path
gives a one-line error instead of destroyed data.

Definitions
-----------
input
    A file or folder the command reads (a dataset folder, images, a split file).
apart
    An output folder is *apart* from an input when it neither is the input, nor contains it, nor lies inside
    it (paths compared after resolving symbolic links). An output folder that is not apart from every input
    is refused, whatever ``force`` says: writing there could replace the data being read (a prediction over a
    ground-truth label) or feed the outputs back in as inputs. A single output file is refused when it is an
    input or lies inside an input folder.
owned file
    A file a ``nucleiseg`` command wrote: listed, with its SHA-256, in the record of its folder
    (:data:`RECORD_NAME`), and unchanged since. A command replaces only owned files and files that do not exist;
    replacing anything else needs ``force`` (``--force``). A file restored from elsewhere (``cp``, ``dvc
    checkout`` of another version) is not owned until a command writes it again.
owned folder
    A folder a command replaces as a whole (``validate``, ``prepare``): it may be replaced when it does not
    exist, is empty, or holds the record of an earlier run of that command (or, for folders made before records
    existed, that command's signature files); anything else needs ``force``. An existing *file* where a folder
    is expected is always refused.
checked basename
    An output name taken from data (an image stem, a split entry) must be one plain path component: not
    empty, not ``.`` or ``..``, without ``/``, ``\\`` or NUL, so that it cannot point outside its folder.

The record is a small JSON file, ``{"format": 1, "folder": <command or null>, "files": {name: sha256}}``,
updated under an exclusive lock on the folder (``flock``), so threads and processes writing into the same
folder do not lose each other's entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from nucleiseg.io import atomic_dir, remove_stale_temporaries, write_json_atomic

RECORD_NAME = ".nucleiseg-outputs.json"
RECORD_FORMAT = 1
# Files that identify an owned folder written before records existed (per command).
LEGACY_SIGNATURES: dict[str, tuple[str, ...]] = {
    "validate": ("report.json", "validation_result.json"),
    "prepare": ("prepare.json", "splits.json"),
}
_BAD_NAME = re.compile(r"[/\\\x00]")
_SHOWN = 5  # offending paths named in one error


class OutputError(ValueError):
    """An output path is refused (it would destroy data, or cannot be written); the message names it."""


# ----------------------------------------------------------------------------------------------------
# Names and paths


def check_name(name: str, where: str = "") -> str:
    """Return ``name`` if it is a checked basename (see the module docstring); raise :class:`OutputError`."""
    prefix = f"{where}: " if where else ""
    if not isinstance(name, str) or name in ("", ".", "..") or _BAD_NAME.search(name):
        raise OutputError(f"{prefix}{name!r} is not a plain file name (one path component, no '/', '\\' or NUL)")
    return name


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().resolve()


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _names(paths: Sequence[Path]) -> str:
    more = f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else ""
    return ", ".join(str(p) for p in paths[:_SHOWN]) + more


def check_apart(out_dir: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse an output folder that is, contains or lies inside an input (see "apart")."""
    out = _resolved(out_dir)
    for item in inputs:
        source = _resolved(item)
        if out == source:
            raise OutputError(f"{out_dir}: the output folder is the input {item}; choose another folder")
        if _within(out, source):
            raise OutputError(f"{out_dir}: the output folder lies inside the input {item}; choose a folder outside it")
        if _within(source, out):
            raise OutputError(f"{out_dir}: the output folder contains the input {item}; choose a folder apart from it")


def check_file_apart(path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse an output file that is an input or lies inside an input folder."""
    out = _resolved(path)
    for item in inputs:
        source = _resolved(item)
        if out == source:
            raise OutputError(f"{path}: the output file is the input {item}")
        if _within(out, source):
            raise OutputError(f"{path}: the output file lies inside the input {item}; write it elsewhere")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, as hex."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# ----------------------------------------------------------------------------------------------------
# The record of a folder


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the folder itself (no lock file is left behind)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_record(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The record of ``folder`` (an empty one when there is none or it is unreadable)."""
    try:
        record = json.loads((Path(folder) / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return {"format": RECORD_FORMAT, "folder": None, "files": {}}
    return record


def record_files(folder: str | os.PathLike[str], paths: Iterable[str | os.PathLike[str]]) -> None:
    """Add ``paths`` (files just written in ``folder``) to its record with their current SHA-256."""
    folder = Path(folder)
    hashes = {Path(p).name: file_sha256(p) for p in paths}
    if not hashes:
        return
    with _folder_lock(folder):
        record = read_record(folder)
        record["files"].update(hashes)
        write_json_atomic(folder / RECORD_NAME, record)


def is_owned(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an owned file (listed in its folder's record with its current content)."""
    path = Path(path)
    recorded = read_record(path.parent)["files"].get(path.name)
    return recorded is not None and path.is_file() and file_sha256(path) == recorded


def _probe_writable(folder: Path, shown: str | os.PathLike[str]) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputError(f"{shown}: cannot write in this folder ({exc.strerror or exc})") from None


def _make_folder(folder: Path, shown: str | os.PathLike[str]) -> None:
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{shown}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{shown}: cannot create the folder ({exc.strerror or exc})") from None
    _probe_writable(folder, shown)


# ----------------------------------------------------------------------------------------------------
# Folders filled file by file


class OutputFolder:
    """A folder a command writes named files into (``predict``, ``batch``, ``score``, ``import``).

    Opening it checks, before any work, that it is apart from the inputs, is (or can be made) a writable
    folder, and removes temporary files left by killed runs. :meth:`claim` then refuses names whose existing
    file is not owned (unless ``force``); :meth:`record` marks what the command wrote as owned.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        inputs: Iterable[str | os.PathLike[str]] = (),
        force: bool = False,
    ) -> None:
        self.path = Path(path)
        self.force = force
        check_apart(self.path, inputs)
        _make_folder(self.path, path)
        remove_stale_temporaries(self.path)

    def target(self, name: str) -> Path:
        """The path of output ``name`` (a checked basename)."""
        return self.path / check_name(name, str(self.path))

    def claim(self, names: Iterable[str]) -> list[Path]:
        """The paths of ``names``; raises :class:`OutputError` when any exists and may not be replaced."""
        paths = [self.target(n) for n in names]
        folders = [p for p in paths if p.exists() and not p.is_file()]
        if folders:
            raise OutputError(f"{_names(folders)}: exist(s) and is not a file; nothing was written")
        if not self.force:
            record = read_record(self.path)["files"]
            foreign = [p for p in paths if p.is_file() and record.get(p.name) != file_sha256(p)]
            if foreign:
                raise OutputError(
                    f"{_names(foreign)}: already exist(s) and was not written by nucleiseg (or changed since); "
                    "nothing was written (--force replaces them)"
                )
        return paths

    def record(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        """Mark files just written in this folder as owned."""
        record_files(self.path, paths)


def claim_file(
    path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = (), force: bool = False
) -> Path:
    """Check, before any work, that a single output file (a report) may be written at ``path``.

    Refused: an input or a file inside an input folder, an existing folder, an existing file that is not owned
    (unless ``force``), a folder that cannot be created or written. Call :func:`record_files` after writing.
    """
    path = Path(path)
    check_file_apart(path, inputs)
    if path.exists() and not path.is_file():
        raise OutputError(f"{path}: exists and is not a file")
    if path.is_file() and not force and not is_owned(path):
        raise OutputError(
            f"{path}: already exists and was not written by nucleiseg (or changed since); --force replaces it"
        )
    _make_folder(path.parent, path.parent)
    remove_stale_temporaries(path.parent)
    return path


# ----------------------------------------------------------------------------------------------------
# Folders replaced as a whole


def _owned_folder(folder: Path, command: str) -> bool:
    if read_record(folder).get("folder") == command:
        return True
    signature = LEGACY_SIGNATURES.get(command, ())
    return bool(signature) and all((folder / name).is_file() for name in signature)


def check_replaceable(
    path: str | os.PathLike[str],
    command: str,
    inputs: Iterable[str | os.PathLike[str]] = (),
    force: bool = False,
) -> Path:
    """Check, before any work, that ``command`` may replace the folder ``path`` as a whole (see "owned folder")."""
    folder = Path(path)
    check_apart(folder, inputs)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{path}: exists and is not a folder; nothing was written")
    if folder.is_dir() and not force and any(folder.iterdir()) and not _owned_folder(folder, command):
        raise OutputError(
            f"{path}: a folder that `nucleiseg {command}` did not make; it would be replaced as a whole, so "
            "nothing was written (choose a new folder, or --force replaces it)"
        )
    _make_folder(folder.parent, folder.parent)
    remove_stale_temporaries(folder.parent)  # a killed run's staging folder; a folder it had set aside comes back
    return folder


@contextlib.contextmanager
def replaced_folder(path: str | os.PathLike[str], command: str) -> Iterator[Path]:
    """:func:`nucleiseg.io.atomic_dir` whose new folder carries the record of ``command`` (so a later run of
    the same command may replace it). Call :func:`check_replaceable` first."""
    with atomic_dir(path) as work:
        yield work
        write_json_atomic(work / RECORD_NAME, {"format": RECORD_FORMAT, "folder": command, "files": {}})


__all__ = [
    "LEGACY_SIGNATURES",
    "RECORD_NAME",
    "OutputError",
    "OutputFolder",
    "check_apart",
    "check_file_apart",
    "check_name",
    "check_replaceable",
    "claim_file",
    "file_sha256",
    "is_owned",
    "read_record",
    "record_files",
    "replaced_folder",
]
