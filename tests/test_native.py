"""C kernels compiled on first use: a real compiler, a real cache, and the fallbacks when there is none."""

from __future__ import annotations

import ctypes
import shutil

import pytest

from nucleiseg import native

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")

SOURCE = """
double weighted_sum(const float *x, long n) {
    double total = 0.0;
#pragma omp parallel for reduction(+ : total)
    for (long i = 0; i < n; i++) total += (i + 1) * (double)x[i];
    return total;
}
"""
SIGNATURES = (("weighted_sum", ctypes.c_double, (ctypes.c_void_p, ctypes.c_long)),)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NUCLEISEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NUCLEISEG_NATIVE", raising=False)
    return tmp_path / "cache" / "native"


def test_compiles_once_and_loads_typed_functions(tmp_path, cache):
    source = tmp_path / "kernel.c"
    source.write_text(SOURCE)
    lib = native.load(source, SIGNATURES)
    values = (ctypes.c_float * 3)(1.0, 2.0, 3.0)
    assert lib.weighted_sum(ctypes.addressof(values), 3) == 14.0  # 1*1 + 2*2 + 3*3
    (built,) = cache.glob("kernel-*.so")  # one library, no temp files left behind
    assert sorted(p.name for p in cache.iterdir()) == [built.name]
    stamp = built.stat().st_mtime_ns
    assert native.build(source, shutil.which("cc")) == built  # cached: not rebuilt
    assert built.stat().st_mtime_ns == stamp
    source.write_text(SOURCE + "\n/* changed */\n")  # a changed source gets its own library
    assert native.build(source, shutil.which("cc")) != built


def test_compiler_errors_warn_and_fall_back(tmp_path, cache):
    source = tmp_path / "broken.c"
    source.write_text("this is not C;")
    with pytest.warns(RuntimeWarning, match=r"broken\.c could not be built"):
        assert native.load(source) is None
    assert not list(cache.glob("*"))  # nothing half-written in the cache


def test_without_a_compiler_or_when_disabled(tmp_path, cache, monkeypatch):
    source = tmp_path / "kernel.c"
    source.write_text(SOURCE)
    monkeypatch.setenv("CC", "no-such-compiler")
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert native.load(source, SIGNATURES) is None
    monkeypatch.delenv("CC")
    monkeypatch.setenv("NUCLEISEG_NATIVE", "0")
    other = tmp_path / "other.c"
    other.write_text(SOURCE)
    assert native.load(other, SIGNATURES) is None
