"""File input/output shared by the whole library: images read with clear errors, atomic writes.

Every writer here goes through :func:`atomic_path`: the data is written to a temporary file in the
destination folder and renamed over the target only once it is complete, so an interrupted run never
leaves a half-written output in place of a good earlier one.

Temporary names carry the writing process's id (``.<name>.nucleiseg-tmp<pid>-<random>``), so that
:func:`remove_stale_temporaries` can tell the leftovers of a killed run (their process is gone) from the
files of a run still in progress, and remove only those.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
_TEMP = ".nucleiseg-tmp"  # a file or folder being written, swapped in on success
_ASIDE = ".nucleiseg-old"  # the previous folder, moved aside while atomic_dir swaps the new one in
_TEMPORARY = re.compile(r"^\.(?P<name>.+?)\.nucleiseg-(?P<kind>tmp|old)(?P<pid>\d+)-")
_UMASK = os.umask(0)
os.umask(_UMASK)  # read once at import: os.umask can only be read by setting it


class ImageReadError(ValueError):
    """An image file is missing, corrupt or not what was expected. The message names the file."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    The temporary file keeps the target's suffix so that writers which pick a format by extension
    (OpenCV, tifffile, numpy) behave as for the real name. On error the temporary file is removed and
    ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(target.stem, _TEMP), suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh folder beside ``path``; on success it replaces ``path`` as a whole, on error it is removed.

    The previous ``path`` is moved aside (same filesystem, so both renames are atomic) and deleted only once
    the new folder is in place, so a reader sees either the old folder or the new one, never a mix.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name, _TEMP), dir=target.parent))
    try:
        yield work
        os.chmod(work, 0o777 & ~_UMASK)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name, _ASIDE), dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(work, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _temp_prefix(name: str, kind: str) -> str:
    return f".{name}{kind}{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files and folders that killed runs left in ``folder``; return what was removed.

    Only names made by :func:`atomic_path` / :func:`atomic_dir` whose process no longer exists are touched
    (on this machine: process ids are not meaningful across the hosts of a shared filesystem). A previous
    folder that :func:`atomic_dir` had moved aside when its run was killed is moved back if nothing
    replaced it, so a kill between the two renames never loses it.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match is None or _process_alive(int(match["pid"])):
            continue
        if match["kind"] == "old":
            kept = entry / match["name"]
            if kept.exists() and not (folder / match["name"]).exists():
                os.replace(kept, folder / match["name"])
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_npy_atomic(path: str | os.PathLike[str], array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def _decode(path: Path, flags: int) -> np.ndarray:
    import cv2

    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            return np.asarray(tifffile.imread(path))
        except Exception as exc:  # tifffile raises many types for corrupt files
            raise ImageReadError(f"{path}: cannot decode TIFF ({exc})") from exc
    buf = np.fromfile(path, dtype=np.uint8)
    array = cv2.imdecode(buf, flags) if buf.size else None
    if array is None:
        raise ImageReadError(f"{path}: not a readable image (corrupt, truncated or unknown format)")
    return array


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an RGB image as ``uint8`` H x W x 3. Grey images are repeated, alpha is dropped.

    16-bit RGB images are scaled to 8 bits. Raises :class:`ImageReadError` naming the file.
    """
    import cv2

    path = Path(path)
    array = _decode(path, cv2.IMREAD_UNCHANGED)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    elif array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ImageReadError(f"{path}: expected an RGB image, got shape {array.shape}")
    if path.suffix.lower() not in (".tif", ".tiff"):
        # OpenCV decodes to BGR(A); TIFF through tifffile is already RGB(A).
        array = array[..., [2, 1, 0]] if array.shape[2] == 3 else array[..., [2, 1, 0, 3]]
    array = array[..., :3]
    if array.dtype == np.uint16:
        array = (array // 257).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageReadError(f"{path}: unsupported pixel type {array.dtype} for an RGB image")
    return np.ascontiguousarray(array)


def read_raw(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file exactly as stored (any dtype, any channel count; PNG colour as RGB)."""
    import cv2

    path = Path(path)
    array = _decode(path, cv2.IMREAD_UNCHANGED)
    if path.suffix.lower() not in (".tif", ".tiff") and array.ndim == 3 and array.shape[2] >= 3:
        array = array[..., [2, 1, 0, *range(3, array.shape[2])]]
    return array


def write_image(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write an RGB ``uint8`` image or a 2-D ``uint8``/``uint16`` image atomically (format by suffix)."""
    import cv2

    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, array, compression="zlib")
            return
        if array.ndim == 3:
            array = np.ascontiguousarray(array[..., ::-1])  # RGB -> BGR for OpenCV
        if not cv2.imwrite(str(tmp), array):
            raise OSError(f"{path}: OpenCV could not write the image")


def list_images(folder: str | os.PathLike[str], exclude_suffixes: tuple[str, ...] = ("_label", "_other")) -> list[Path]:
    """The RGB tiles of a dataset folder: image files whose stem does not end in a label suffix.

    Hidden files (a leading ``.``, e.g. the temporary files of a write in progress) are not tiles.
    """
    folder = Path(folder)
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not p.stem.endswith(exclude_suffixes)
    )
