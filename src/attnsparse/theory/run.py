"""A theory lab run directory: config.json, theory.json, theory_per_n.csv, the PNGs and theory.html.

The simulation itself is `attnsparse.theory.lab` (no files); this module validates, writes and draws.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path

from attnsparse.core.runs import RunDir, atomic_write_json, atomic_write_text
from attnsparse.theory.lab import (
    KIND,
    RESULTS_FILE,
    TheoryConfig,
    TheoryResult,
    load_profile_overlay,
    run_placement,
    simulate,
    validate,
)


def per_n_csv(result: TheoryResult) -> str:
    """A flat table, one line per (scenario, n), for spreadsheets."""
    buf = io.StringIO()
    rules = list(result.scenarios[0]["per_n"][0]["rules"])
    header = ["scenario", "n", "rows", "sigma_hat_mean", "k_mean", "k_p50", "k_p90", "sim_frac", "pred_frac",
              "pred_frac_finite", "rel_err", "rel_err_finite"] + [f"tail_{r}" for r in rules] + \
             [f"eps_k_sparse_{r}" for r in rules]
    writer = csv.writer(buf)
    writer.writerow(header)
    for sc in result.scenarios:
        for r in sc["per_n"]:
            writer.writerow([sc["name"], r["n"], r["rows"], r["sigma_hat"]["mean"], r["k"]["mean"], r["k"]["p50"],
                             r["k"]["p90"], r["sim_frac"], r["pred_frac"], r["pred_frac_finite"], r["rel_err"],
                             r["rel_err_finite"]] + [r["rules"][x]["tail"]["mean"] for x in rules] +
                            [r["rules"][x]["eps_k_sparse"] for x in rules])
    return buf.getvalue()


def run_theory(cfg: TheoryConfig, out: str | Path, overwrite: bool = False, progress: bool = False,
               plots: bool = True) -> TheoryResult:
    """Run the lab and write the run directory: config.json, theory.json, theory_per_n.csv, PNGs, theory.html."""
    validate(cfg)
    if cfg.profile:
        load_profile_overlay(cfg.profile, cfg.eps)  # fail on a bad profile before touching the out dir
    run = RunDir(out, KIND).check(overwrite)
    out = run.start(asdict(cfg) | run_placement(cfg))
    with run.guard():
        result = simulate(cfg, progress=progress)
        result.out = out
        atomic_write_text(out / "theory_per_n.csv", per_n_csv(result))
        result.files["csv"] = "theory_per_n.csv"
        if plots:
            from attnsparse.theory import plots as theory_plots  # matplotlib only when drawing

            figures = theory_plots.make_figures(result, out)
            result.files.update({k: Path(v).name for k, v in figures.items()})
            report = theory_plots.write_report(result, out / "theory.html", figures)
            result.files["html"] = report.name
        atomic_write_json(out / RESULTS_FILE, result.to_json())
        run.finish()
    return result
