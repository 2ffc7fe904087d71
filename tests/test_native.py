"""Compiled kernels: built once into the cache, and a clean numpy/torch fallback when they cannot be built."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from attnsparse.core import native
from tests.conftest import cpu_flags


def test_switched_off_or_no_working_compiler_gives_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNSPARSE_CACHE", str(tmp_path))
    monkeypatch.setenv("ATTNSPARSE_NATIVE", "0")
    assert native.load.__wrapped__("rowstats") is None
    monkeypatch.setenv("ATTNSPARSE_NATIVE", "1")
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="numpy path"):
        assert native.load.__wrapped__("rowstats") is None
    assert not list((tmp_path / "native").glob("*.so"))  # nothing half-written is left to load


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_built_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNSPARSE_CACHE", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    assert native.load.__wrapped__("blockattn") is not None
    built = list((tmp_path / "native").glob("blockattn-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert native.load.__wrapped__("blockattn") is not None
    assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_compiler_without_openmp_still_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that rejects -fopenmp gets the single-threaded build, not the numpy fallback."""
    wrapper = tmp_path / "cc-no-openmp"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec cc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("ATTNSPARSE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(wrapper))
    assert native.load.__wrapped__("blockattn") is not None
    assert len(list((tmp_path / "native").glob("blockattn-*.so"))) == 1


@pytest.mark.skipif(not Path("/proc/self/maps").exists() or shutil.which("cc") is None, reason="Linux with cc only")
def test_kernels_share_torchs_openmp_runtime() -> None:
    """The kernels' threads are torch's: loading them maps no second libgomp into the process."""
    import torch

    torch.ones(4096).sum()
    assert native.load("blockattn") is not None
    maps = Path("/proc/self/maps").read_text().splitlines()
    runtimes = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(runtimes) <= 1, runtimes


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_portable_build_has_its_own_cache_entry_and_no_vector_paths(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """ATTNSPARSE_NATIVE_PORTABLE=1 builds without the CPU's extensions, so `kernel_build` tests run both paths."""
    monkeypatch.setenv("ATTNSPARSE_CACHE", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    paths = {}
    for build in ("0", "1"):
        monkeypatch.setenv("ATTNSPARSE_NATIVE_PORTABLE", build)
        native.forget()
        paths[build] = native.function("blockattn", "vector_paths", "")()
    native.forget()
    assert len(list((tmp_path / "native").glob("blockattn-*.so"))) == 2
    assert paths["1"] == 0
    if {"avx2", "fma", "f16c"} <= cpu_flags():
        assert paths["0"] == 7  # this machine's build takes the AVX2/FMA/F16C paths


def test_kernel_build_fixture_switches_the_build(kernel_build: str) -> None:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    vector = native.function("blockattn", "vector_paths", "")()
    assert vector == 0 if kernel_build == "portable" else vector == 7 or not {"avx2", "fma", "f16c"} <= cpu_flags()


def test_build_cache_key_tells_apart_hosts_that_share_a_model_name() -> None:
    """A -march=native build keyed on a generic model name alone would load on a host without its extensions."""
    model = "model name\t: Intel(R) Xeon(R) Processor\n"
    with_512 = native._cpu_model(model + "flags\t\t: fpu sse avx2 fma avx512f avx512bw\n")
    without = native._cpu_model(model + "flags\t\t: fpu sse avx2 fma\n")
    assert with_512 != without and "Xeon" in with_512 and "avx512f" in with_512
    assert "asimd" in native._cpu_model("Features\t: fp asimd sve\n")  # arm64 names its flags "Features"
