"""The checkpoints of a condense run: listing, checking, rotating and cleaning `checkpoints/checkpoint-N`.

A checkpoint is written under a staging name and renamed into place when complete (CondenseTrainer), and an old
one is renamed to a `.trash-` name before it is deleted, so an interrupted save or rotation leaves only
dot-names behind and `clean` removes them. A checkpoint whose files were cut short afterwards (a full disk, a
copy that stopped) is found by `problem`, and resuming falls back to the newest one without a problem.
"""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

STATE_FILE = "attnsparse_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
_LEFTOVERS = (".staging-", ".trash-")


def _step(path: Path) -> int | None:
    suffix = path.name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (staging directories are never listed)."""
    if not root.is_dir():
        return []
    found = [(step, path) for path in root.iterdir()
             if (step := _step(path)) is not None and (path / "trainer_state.json").is_file()]
    return [path for _, path in sorted(found)]


def rotate(root: Path, keep: int | None) -> None:
    """Delete all but the newest `keep` checkpoints (None: keep all), each renamed aside first."""
    if keep is not None:
        for path in checkpoints(root)[:-keep]:
            _discard(path)
    clean(root)


def clean(root: Path) -> list[Path]:
    """Remove what an interrupted save or rotation left: staging and trash directories, and `checkpoint-N`
    directories without trainer_state.json (written last inside a checkpoint, so they are not checkpoints)."""
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        leftover = path.name.startswith(_LEFTOVERS)
        partial = _step(path) is not None and not (path / "trainer_state.json").is_file()
        if path.is_dir() and (leftover or partial):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _discard(path: Path) -> None:
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (a missing or cut-short file), or None when it looks whole:
    trainer_state.json and attnsparse_state.json parse, every safetensors file is as long as its header says,
    every torch zip file (optimizer, scheduler, RNG state) has its central directory."""
    for name in ("trainer_state.json", STATE_FILE):
        try:
            json.loads((checkpoint / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return f"{name} is missing or unreadable"
    for path in sorted(checkpoint.rglob("*")):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors" and not _whole_safetensors(path):
            return f"{path.relative_to(checkpoint)} is truncated"
        if path.suffix in (".pt", ".pth", ".bin") and _looks_zip(path) and not zipfile.is_zipfile(path):
            return f"{path.relative_to(checkpoint)} is truncated"
    return None


def _whole_safetensors(path: Path) -> bool:
    """A safetensors file is an 8-byte header length, a JSON header, then exactly the bytes it lists."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return False
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    return path.stat().st_size == 8 + length + max(ends, default=0)


def _looks_zip(path: Path) -> bool:
    """torch.save writes zip archives; one that starts like a zip but has no readable end was cut short."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def load_state(checkpoint: Path) -> dict[str, Any]:
    """attnsparse's own state in a checkpoint (the step and the constrained-λ controller), {} when absent."""
    path = checkpoint / STATE_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))
