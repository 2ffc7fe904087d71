"""Compiled kernels: built once into the cache, and a clean numpy/torch fallback when they cannot be built."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from attnsparse.core import native


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
