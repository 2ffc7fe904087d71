"""Compiled kernels: built once into the cache, and a clean numpy/torch fallback when they cannot be built."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from attnsparse import native


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
