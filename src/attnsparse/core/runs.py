"""Run directories: one protocol for every command (RunDir), atomic writes, and reproducibility records."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from attnsparse.errors import AttnsparseError

RUN_MARKER = "config.json"
RUNNING, STOPPED, FINISHED = "running", "stopped", "finished"  # stopped: ended early on an error it names
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


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what the run directory kept and how to continue."""


@dataclass(frozen=True)
class RunRecord:
    """What a run directory's config.json says: the run's kind, its status and its settings."""

    kind: str | None
    status: str  # RUNNING (in progress, or interrupted), STOPPED or FINISHED
    config: dict[str, Any]

    @property
    def finished(self) -> bool:
        return self.status == FINISHED


def read_run(directory: str | Path) -> RunRecord | None:
    """The record of the run in `directory`, or None when it holds no readable config.json."""
    marker = Path(directory) / RUN_MARKER
    try:
        stored = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(stored, dict):
        return None
    kind = stored.get("kind") if isinstance(stored.get("kind"), str) else None
    config = stored.get("config") if isinstance(stored.get("config"), dict) else {}
    status = stored.get("status")
    if status not in (RUNNING, STOPPED, FINISHED):
        status = _status_without_field(Path(directory), kind, config)
    return RunRecord(kind, status, config)


def _status_without_field(directory: Path, kind: str | None, config: dict[str, Any]) -> str:
    """Runs written before config.json carried `status`: condense kept it in its config, the others are finished
    when the file they wrote last exists."""
    if kind == "condense":
        return config.get("status") if config.get("status") in (STOPPED, FINISHED) else RUNNING
    last = _LAST_FILE.get(kind or "")
    return FINISHED if last is not None and (directory / last).is_file() else RUNNING


_LAST_FILE = {"measure": "report.html", "evaluate": "results.json", "theory": "theory.json", "run": "report.html"}


class RunDir:
    """The one run-directory protocol every command follows.

    `check` (or `inspect`) reads only: the path must be a directory or creatable, writable, and empty or a
    previous run of the same kind. Every other input is validated next, then `start` writes config.json with
    status running, the command writes its results, and `finish` rewrites config.json with status finished. A
    reader (`read_run`) so tells a finished run from an interrupted (or stopped) one; an unfinished run is replaced
    by the next run of its kind, a finished one only with --overwrite.
    """

    def __init__(self, path: str | Path, kind: str) -> None:
        self.path = Path(path)
        self.kind = kind
        self.previous: RunRecord | None = None
        self._config: dict[str, Any] = {}
        self._environment: dict[str, Any] = {}

    def inspect(self) -> RunRecord | None:
        """Refuse an unusable path (a file, an unwritable place, a foreign directory); return the previous run of
        this kind in it, or None when the directory is absent or empty. Writes nothing."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise AttnsparseError(f"output path {out} exists and is not a directory; choose another --out")
        _check_writable(out)
        self.previous = None
        if out.is_dir() and any(out.iterdir()):
            previous = read_run(out)
            if previous is None or previous.kind != self.kind:
                raise AttnsparseError(
                    f"output directory {out} exists and is not a previous '{self.kind}' run; "
                    "choose an empty or new --out"
                )
            self.previous = previous
        return self.previous

    def check(self, overwrite: bool = False) -> RunDir:
        """`inspect`, and refuse a finished run unless `overwrite` (an interrupted one is simply replaced)."""
        previous = self.inspect()
        if previous is not None and previous.finished and not overwrite:
            raise AttnsparseError(
                f"output directory {self.path} holds a finished '{self.kind}' run; pass --overwrite to replace it"
            )
        return self

    def start(self, config: dict[str, Any], *, clear: bool = True) -> Path:
        """Create the directory (emptied first when `clear`: it held only a previous run of this kind, see
        `inspect`) and write config.json with status running."""
        self.path.mkdir(parents=True, exist_ok=True)
        if clear:
            for entry in self.path.iterdir():
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        self._config = config
        self._environment = environment()
        self._write(RUNNING)
        return self.path

    def finish(self, config: dict[str, Any] | None = None) -> Path:
        """Rewrite config.json with status finished (and `config`, when the run adds to its settings)."""
        if config is not None:
            self._config = config
        return self._write(FINISHED)

    def stop(self, config: dict[str, Any] | None = None) -> Path:
        """Rewrite config.json with status stopped: the run ended early on an error (and says why in `config`)."""
        if config is not None:
            self._config = config
        return self._write(STOPPED)

    def interrupted(self, kept: str | None = None) -> RunInterrupted:
        """The one-line message for Ctrl-C during this run: what the directory keeps and how to go on."""
        kept = kept or (f"{self.path} keeps the unfinished '{self.kind}' run (status running); run the same "
                        "command again to start it over")
        return RunInterrupted(f"interrupted: {kept}")

    @contextmanager
    def guard(self, kept: Callable[[], str] | None = None) -> Iterator[None]:
        """Turn Ctrl-C inside the block into `interrupted(...)`, leaving config.json at status running; `kept`
        (what the directory keeps) overrides the message of a run nested inside, e.g. a pipeline's stage."""
        try:
            yield
        except KeyboardInterrupt as interrupt:
            if isinstance(interrupt, RunInterrupted) and kept is None:
                raise
            raise self.interrupted(kept() if kept is not None else None) from None

    def _write(self, status: str) -> Path:
        path = self.path / RUN_MARKER
        atomic_write_json(path, {"kind": self.kind, "status": status, "config": self._config,
                                 "environment": self._environment})
        return path


def _check_writable(out: Path) -> None:
    """Refuse an --out that cannot be created or written (a parent that is a file, a read-only or full
    filesystem, no permission) before any work: create and remove a probe file in its nearest existing ancestor."""
    target = out if out.is_dir() else out.parent
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        raise AttnsparseError(f"cannot create output directory {out}: {target} is a file, not a directory; "
                              "choose another --out")
    try:
        fd, probe = tempfile.mkstemp(dir=target, prefix=".attnsparse-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise AttnsparseError(f"cannot write output directory {out}: {target} is not writable ({reason}); "
                              "choose another --out") from None


def check_writable_file(path: str | Path) -> Path:
    """Refuse an output file that is a directory or whose folder cannot be written, before any work."""
    path = Path(path)
    if path.is_dir():
        raise AttnsparseError(f"{path} is a directory; give a file name to write")
    _check_writable(path.parent if str(path.parent) else Path("."))
    return path


def cache_root() -> Path:
    """Where converted models and compiled kernels live: $ATTNSPARSE_CACHE, else ~/.cache/attnsparse."""
    return Path(os.environ.get("ATTNSPARSE_CACHE", Path.home() / ".cache" / "attnsparse"))
