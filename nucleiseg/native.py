"""Small C kernels, compiled on first use with the machine's C compiler and loaded with ctypes.

A kernel's shared library is cached under ``$NUCLEISEG_CACHE_DIR/native`` (default
``~/.cache/nucleiseg/native``), named by a hash of its source, the compiler, the flags and the CPU's
feature flags (``-march=native``), and written atomically (temp file + rename), so that concurrent
processes and interrupted builds never load a half-written library. Without a working compiler, or with
``NUCLEISEG_NATIVE=0``, :func:`load` returns None after one warning and callers use their torch fallback.

Libraries are built with ``-fopenmp``: loaded after torch (which ships ``libgomp.so.1``), their parallel
loops run in torch's OpenMP thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")


def cache_dir() -> Path:
    root = os.environ.get("NUCLEISEG_CACHE_DIR") or Path.home() / ".cache" / "nucleiseg"
    return Path(root) / "native"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def build(source: Path, compiler: str) -> Path:
    """The cached shared library of ``source``, compiled first when missing; raises on compiler errors."""
    text = source.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(b"\0".join([text, compiler.encode(), version.encode(), " ".join(FLAGS).encode()]))
    key.update(_cpu_flags().encode())
    target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, str(source), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {source}:\n{result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


Signature = tuple[str, object, tuple[object, ...]]  # (function name, ctypes restype, ctypes argtypes)


@functools.cache
def load(source: str | Path, signatures: tuple[Signature, ...] = ()) -> ctypes.CDLL | None:
    """``source`` compiled (or taken from the cache) and loaded, its functions typed by ``signatures``;
    None, with one warning, when that is not possible."""
    source = Path(source)
    if os.environ.get("NUCLEISEG_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        warnings.warn(
            f"no C compiler found (CC={os.environ.get('CC', 'cc')}): {source.name} falls back to slower torch ops",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    try:
        lib = ctypes.CDLL(str(build(source, compiler)))
        for name, restype, argtypes in signatures:
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, list(argtypes)
    except (OSError, RuntimeError, AttributeError) as error:
        message = f"{source.name} could not be built, falling back to torch ops: {error}"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return None
    return lib
