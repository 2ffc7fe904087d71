"""Helpers shared by benchmark scripts: where results go and what to record with them."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from attnsparse.core.runs import atomic_write_json, environment

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared" / "data"
WIKITEXT_TEST = SHARED / "wikitext-2" / "test.txt"
WIKITEXT_VALID = SHARED / "wikitext-2" / "valid.txt"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write benchmarks/results/NAME.json with the command, machine and versions beside the numbers."""
    path = RESULTS / f"{name}.json"
    record = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "environment": environment(),
        **result,
    }
    atomic_write_json(path, record)
    return path
