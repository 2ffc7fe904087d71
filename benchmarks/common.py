"""Helpers shared by benchmark scripts: where results go and what to record with them."""

from __future__ import annotations

import json
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


def earlier_dense_perplexity(path: str, ctx: int, windows: int, data: str) -> float:
    """The dense perplexity an earlier prefill or gate result measured on the same windows (same ctx, window count
    and text), so a sweep of sparse policies need not repeat the dense pass; exits with one line otherwise."""
    earlier = json.loads(Path(path).read_text())
    settings = earlier.get("settings", earlier)
    seen = (settings.get("ctx"), settings.get("windows"), earlier.get("data_path", str(WIKITEXT_TEST)))
    if seen != (ctx, windows, data):
        raise SystemExit(f"--dense-from {path}: ctx {seen[0]}, {seen[1]} windows of {seen[2]} there; this run has "
                         f"ctx {ctx}, {windows} windows of {data}")
    rows = earlier["perplexity"]
    dense = rows["dense"] if isinstance(rows, dict) else next(row for row in rows if row["label"] == "dense")
    return float(dense["perplexity"])
