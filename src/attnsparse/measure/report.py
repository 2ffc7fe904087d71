"""The measure run's summaries: the per-layer table (printed and in the report) and the self-contained HTML report."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from attnsparse.core.report import Section, write_html_report
from attnsparse.measure.profile import Profile, coverage_key


def write_report(path: str | Path, profile: Profile, data: dict[str, Any], run_config: dict[str, Any],
                 figures: dict[str, tuple[Path, str]]) -> Path:
    """report.html: summary, per-layer table, heatmaps, curves, head classes, the per-head table and the config."""
    cfg = profile.config
    key = coverage_key(cfg.fit_delta)
    s = data["summary"]
    c_mean = "n/a" if s["C_mean"] is None else f"{s['C_mean']:.3f}"
    overview = (
        f"<p>Model <code>{html.escape(str(data['model']))}</code>, {data['layers']} layers x {data['heads']} query "
        f"heads ({data['kv_heads']} key/value heads), measured on {data['windows']} windows of {data['ctx']} tokens "
        f"({data['rows_per_head']} attention rows per head).</p>"
        f"<p>Mean k<sub>{key}</sub> over all heads: <b>{s[f'k_{key}_mean']:.1f}</b> keys; mean n<sup>C</sup> "
        f"exponent C: <b>{c_mean}</b>; streaming heads: <b>{s['streaming_heads']}/{s['heads_total']}</b> "
        f"(sink {cfg.sink_tokens} + local {cfg.local_window} tokens hold ≥ {1 - cfg.stream_delta:g} of the mass).</p>"
        "<p>Definitions of every metric: docs/measure.md.</p>"
    )
    header, rows = summary_rows(profile)
    head_header = ["layer", "head", "class", f"k{key} mean", f"k{key} p50", f"k{key} p90", "C", "R²",
                   "entropy", "exp(H)", "sink", "local"]
    head_rows = []
    for entry in data["per_head"]:
        cov = entry["k_at_coverage"][key]
        head_rows.append([
            entry["layer"], entry["head"], entry["class"], round(cov["mean"], 1), cov["p50"], cov["p90"],
            "-" if entry["C"] is None else round(entry["C"], 3), "-" if entry["C_r2"] is None else round(entry["C_r2"], 3),
            round(entry["entropy"], 3), round(entry["effective_support"], 1), round(entry["sink_mass"], 3),
            round(entry["local_mass"], 3),
        ])
    sections = [
        Section("Summary", overview, tables=[(header, rows)]),
        Section("Keys needed per head", figures=[figures["k_heatmap"], figures["C_heatmap"]]),
        Section("Coverage and growth with context", figures=[figures["coverage"], figures["k_vs_position"]]),
        Section("Streaming and retrieval heads", figures=[figures["classes"]]),
        Section("Per-head table", tables=[(head_header, head_rows)]),
        Section("Configuration", f"<pre>{html.escape(json.dumps(run_config, indent=2))}</pre>"),
    ]
    return write_html_report(path, f"Attention sparsity profile: {data['model']}", sections)


def summary_rows(profile: Profile) -> tuple[list[str], list[list[object]]]:
    """Per-layer rows of the final summary: mean k at the fit coverage, mean C (and R²), streaming heads."""
    st = profile.head_stats()
    cfg = profile.config
    d = cfg.fit_index
    key = coverage_key(cfg.fit_delta)
    header = ["layer", f"k{key} mean", f"k{key} p90", "C mean", "R² mean", "entropy", "streaming"]
    rows: list[list[object]] = []
    p90 = 2  # index of 0.9 in profile.QUANTILES
    heads = st["rows"].shape[1]
    for layer in range(st["rows"].shape[0]):
        c = st["C"][layer]
        r2 = st["C_r2"][layer]
        rows.append([
            layer,
            round(float(st["kcov_mean"][layer, :, d].mean()), 1),
            int(st["kcov_quantiles"][layer, :, d, p90].max()),
            _fmt(c),
            _fmt(r2),
            round(float(st["entropy"][layer].mean()), 2),
            f"{int(st['streaming'][layer].sum())}/{heads}",
        ])
    return header, rows


def _fmt(values: Any) -> str:
    finite = values[np.isfinite(values)]
    return f"{float(finite.mean()):.3f}" if finite.size else "-"


def summary_table(profile: Profile) -> str:
    """A plain-text table of `summary_rows` plus one model-wide line."""
    header, rows = summary_rows(profile)
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    s = profile.to_dict()["summary"]
    c_mean = "-" if s["C_mean"] is None else f"{s['C_mean']:.3f}"
    key = coverage_key(profile.config.fit_delta)
    lines.append(
        f"all layers: k{key} mean {s[f'k_{key}_mean']:.1f}, C mean {c_mean}, "
        f"streaming heads {s['streaming_heads']}/{s['heads_total']}"
    )
    return "\n".join(lines)
