"""Run directories: atomic writes, reproducibility records, and refusing to clobber foreign directories."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from attnsparse.errors import AttnsparseError

RUN_MARKER = "config.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so a reader never sees a half-written file (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should read like any other file
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def environment() -> dict[str, Any]:
    """Versions and platform, recorded in every run's config so results can be reproduced."""
    versions = {}
    for name in ("attnsparse", "torch", "transformers", "accelerate", "peft", "datasets", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "argv": sys.argv,
    }


def prepare_run_dir(out: str | Path, kind: str, overwrite: bool = False) -> Path:
    """Create `out` for a run of `kind`; refuse a non-empty directory that is not an earlier `kind` run.

    A directory holding a previous run of the same kind may be reused only with `overwrite=True`.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AttnsparseError(f"output path {out} exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()):
        marker = out / RUN_MARKER
        previous = None
        if marker.is_file():
            try:
                previous = json.loads(marker.read_text()).get("kind")
            except (json.JSONDecodeError, OSError, AttributeError):
                previous = None
        if previous != kind:
            raise AttnsparseError(
                f"output directory {out} exists and is not a previous '{kind}' run; choose an empty or new --out"
            )
        if not overwrite:
            raise AttnsparseError(f"output directory {out} holds a previous '{kind}' run; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_run_config(out: str | Path, kind: str, config: dict[str, Any]) -> Path:
    """Write `config.json` (the run's kind, its settings and the environment) into the run directory."""
    path = Path(out) / RUN_MARKER
    atomic_write_json(path, {"kind": kind, "config": config, "environment": environment()})
    return path


def cache_root() -> Path:
    """Where converted models and compiled kernels live: $ATTNSPARSE_CACHE, else ~/.cache/attnsparse."""
    return Path(os.environ.get("ATTNSPARSE_CACHE", Path.home() / ".cache" / "attnsparse"))
