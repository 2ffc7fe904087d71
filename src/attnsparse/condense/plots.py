"""Training curves of a condensation run, drawn from its JSONL log."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from attnsparse.core.runs import atomic_write_bytes


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL training log (a torn last line, from a crash, is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_curves(records: list[dict[str, Any]], path: Path, title: str = "condense") -> Path | None:
    """Four panels: loss components, mean top-k mass, λ and k, learning rate (against step)."""
    if not records:
        return None
    from matplotlib.figure import Figure

    steps = [r["step"] for r in records]
    figure = Figure(figsize=(10, 7), dpi=100)
    axes = figure.subplots(2, 2)
    losses = axes[0][0]
    for key in ("loss", "lm", "cond", "kd", "kd_dense"):
        values = [r.get(key) for r in records]
        if any(v not in (None, 0.0) and not _nan(v) for v in values):
            losses.plot(steps, values, label=key)
    losses.set_title("loss components")
    losses.set_yscale("log")
    losses.legend(fontsize=8)
    axes[0][1].plot(steps, [r.get("topk_mass") for r in records], color="tab:green")
    axes[0][1].set_title("mean top-k mass (regularised rows)")
    lam_axis = axes[1][0]
    lam_axis.plot(steps, [r.get("lambda") for r in records], color="tab:red", label="λ")
    lam_axis.set_ylabel("λ")
    k_axis = lam_axis.twinx()
    k_axis.plot(steps, [r.get("k") for r in records], color="tab:purple", linestyle="--", label="k")
    k_axis.set_ylabel("k")
    lam_axis.set_title("λ (solid) and k (dashed)")
    axes[1][1].plot(steps, [r.get("lr") for r in records], color="tab:gray")
    axes[1][1].set_title("learning rate")
    for row in axes:
        for axis in row:
            axis.set_xlabel("step")
            axis.grid(True, alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
