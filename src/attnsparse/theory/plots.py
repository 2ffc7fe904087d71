"""Figures and the HTML report section of the theory lab (matplotlib, Agg backend; small PNGs)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import itertools

import matplotlib.pyplot as plt

from attnsparse.core.report import Section, write_html_report
from attnsparse.theory import stats as ts
from attnsparse.theory.lab import Scenario, TheoryResult, formula_local_C

DPI = 80
FIGURES = ("fraction", "prediction_error", "k_vs_n", "exponents", "tails", "heads")


def _colors(count: int) -> list[Any]:
    cmap = plt.get_cmap("tab10" if count <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(count)]


def _series(sc: dict[str, Any], key: str) -> tuple[list[int], list[float]]:
    ns = [r["n"] for r in sc["per_n"]]
    return ns, [r[key] for r in sc["per_n"]]


def _style(sc: dict[str, Any]) -> dict[str, Any]:
    """Gaussian rows: filled markers and solid lines; X/W pipeline: hollow markers."""
    if sc["source"] == "gaussian":
        return {"marker": "o", "linestyle": "-"}
    return {"marker": "s", "linestyle": "-", "markerfacecolor": "none"}


def _legend_right(ax: Any) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_fraction(result: TheoryResult, path: Path) -> Path:
    """k/n at coverage 1−ε vs n for the fixed-scale scenarios, with the asymptotic and finite-n predictions."""
    fixed = [s for s in result.scenarios if s["scale"] == "fixed"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for sc, color in zip(fixed, _colors(len(fixed))):
        ns, sim = _series(sc, "sim_frac")
        ax.plot(ns, sim, color=color, label=f"{sc['name']} (simulated)", **_style(sc))
        ax.plot(ns, _series(sc, "pred_frac")[1], color=color, linestyle="--", linewidth=1)
        ax.plot(ns, _series(sc, "pred_frac_finite")[1], color=color, linestyle=":", linewidth=1.5)
    ax.plot([], [], color="gray", linestyle="--", label="Φc(σ̂+Φ⁻¹(ε)) (large n)")
    ax.plot([], [], color="gray", linestyle=":", label="quantile row (finite n)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("row length n")
    ax.set_ylabel(f"k/n at coverage {1 - result.config.eps:g}")
    ax.set_title("Fixed score scale: the needed fraction tends to a constant")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_prediction_error(result: TheoryResult, path: Path) -> Path:
    """Relative error of the predictions vs n for every scenario (solid: large-n formula, dotted: finite-n)."""
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    for sc, color in zip(result.scenarios, _colors(len(result.scenarios))):
        ns, err = _series(sc, "rel_err")
        ax.plot(ns, err, color=color, label=sc["name"], **_style(sc))
        ax.plot(ns, _series(sc, "rel_err_finite")[1], color=color, linestyle=":", linewidth=1.2)
    ax.axhspan(-0.1, 0.1, color="green", alpha=0.08, label="±10%")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-1.0, 0.25)
    ax.set_xlabel("row length n")
    ax.set_ylabel("(predicted − simulated) / simulated  k/n")
    ax.set_title("Prediction error (solid: Φc(σ̂+Φ⁻¹ε); dotted: quantile row)")
    _legend_right(ax)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_k_vs_n(result: TheoryResult, path: Path) -> Path:
    """k at coverage vs n (log-log) for every scenario, n^(1−c) guides, and real heads if a profile was given."""
    fig, ax = plt.subplots(figsize=(9.5, 5))
    for sc, color in zip(result.scenarios, _colors(len(result.scenarios))):
        ns = [r["n"] for r in sc["per_n"]]
        ax.plot(ns, [r["k"]["mean"] for r in sc["per_n"]], color=color, label=sc["name"], markersize=4,
                **_style(sc))
        if sc["scale"] == "growing" and sc["source"] == "gaussian":
            k_last, n_last = sc["per_n"][-1]["k"]["mean"], ns[-1]
            guide = [k_last * (n / n_last) ** sc["expected_C"] for n in ns]
            ax.plot(ns, guide, color=color, linestyle=(0, (1, 3)), linewidth=1)
    overlay = result.overlay
    if overlay:
        ctx, lo = overlay["ctx"], overlay.get("fit_min_n", 16)
        grid = [float(lo)] + [2.0**e for e in range(int(math.log2(ctx)) + 1) if lo < 2.0**e < ctx] + [float(ctx)]
        for i, h in enumerate(overlay["heads"]):
            ax.plot(grid, [h["A"] * n ** h["C"] for n in grid], color="black", alpha=0.15, linewidth=0.7,
                    label="real heads: A·n^C over the fitted range" if i == 0 else None)
    ax.plot([], [], color="gray", linestyle=(0, (1, 3)), label="slope 1−c (large-n limit)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("row length n")
    ax.set_ylabel(f"k at coverage {1 - result.config.eps:g}")
    ax.set_title("How many keys carry 1−ε of the mass")
    _legend_right(ax)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_exponents(result: TheoryResult, path: Path) -> Path:
    """Local exponent d log k / d log n: measured (markers) and the formula's own exponent out to n = 10^24."""
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    far = [10.0 ** (e / 4) for e in range(8, 97)]
    for sc, color in zip(result.scenarios, _colors(len(result.scenarios))):
        ns = [r["n"] for r in sc["per_n"]]
        mids = [math.sqrt(a * b) for a, b in itertools.pairwise(ns)]
        ax.plot(mids, sc["local_C"][1:], color=color, linestyle="none", label=sc["name"], markersize=4,
                **{k: v for k, v in _style(sc).items() if k != "linestyle"})
        if sc["source"] == "gaussian" and sc["scale"] == "growing":
            spec = Scenario(sc["source"], sc["scale"], sc["value"])
            ax.plot(far, [formula_local_C(spec, int(n), result.config.eps) for n in far], color=color, linewidth=1)
            ax.axhline(sc["expected_C"], color=color, linestyle=(0, (1, 3)), linewidth=0.8)
    ax.axhline(1.0, color="gray", linestyle=(0, (1, 3)), linewidth=0.8)
    ax.axvspan(result.config.n[0], result.config.n[-1], color="gray", alpha=0.08)
    ax.plot([], [], color="gray", linewidth=1, label="formula's exponent (lines)")
    ax.set_xscale("log")
    ax.set_ylim(-0.6, 1.15)
    ax.set_xlabel("row length n (shaded: simulated range)")
    ax.set_ylabel("local exponent C")
    ax.set_title("C → 1 at a fixed scale; → 1−c for σ = √(2c·log n), but only as 1/√log n")
    _legend_right(ax)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_tails(result: TheoryResult, path: Path) -> Path:
    """Mean tail mass of each fixed rule vs n, one panel per scenario of Gaussian rows."""
    panels = [s for s in result.scenarios if s["source"] == "gaussian"] or result.scenarios
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.6 * rows), squeeze=False, sharey=True)
    rules = list(panels[0]["per_n"][0]["rules"])
    colors = _colors(len(rules))
    for ax, sc in zip(axes.flat, panels):
        ns = [r["n"] for r in sc["per_n"]]
        for rule, color in zip(rules, colors):
            ax.plot(ns, [r["rules"][rule]["tail"]["mean"] for r in sc["per_n"]], color=color, marker=".", label=rule)
        ax.axhline(result.config.eps, color="black", linewidth=0.6, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_title(sc["name"], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes[0][0].set_ylabel("tail mass left")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"Tail mass of fixed keep-k rules (dashed: ε = {result.config.eps:g})", fontsize=10)
    return _save(fig, path)


def gaussian_C_in_range(sc: dict[str, Any], n_max: int) -> float:
    """The scenario's C fitted over lengths ≤ n_max (all lengths if fewer than two qualify)."""
    pts = [(r["n"], r["k"]["mean"]) for r in sc["per_n"] if r["n"] <= n_max]
    if len(pts) < 2:
        return sc["fit"]["C"]
    return ts.fit_exponent([p[0] for p in pts], [p[1] for p in pts]).C


def plot_heads(result: TheoryResult, path: Path) -> Path:
    """Histogram of the real heads' C next to the Gaussian scenarios' C over the same length range."""
    overlay = result.overlay
    fig, ax = plt.subplots(figsize=(9.5, 4))
    cs = [h["C"] for h in overlay["heads"]]
    ax.hist(cs, bins=min(30, max(5, len(cs) // 3)), color="gray", alpha=0.7, label=f"real heads ({len(cs)})")
    for sc, color in zip(result.scenarios, _colors(len(result.scenarios))):
        ax.axvline(gaussian_C_in_range(sc, overlay["ctx"]), color=color, linewidth=1.2,
                   linestyle="-" if sc["source"] == "gaussian" else "--", label=sc["name"])
    ax.set_xlabel(f"C (slope of log k_{overlay['coverage_key']} vs log n, n ≤ {overlay['ctx']})")
    ax.set_ylabel("heads")
    ax.set_title(f"Real heads ({overlay.get('model') or 'profile'}) vs Gaussian scenarios")
    _legend_right(ax)
    return _save(fig, path)


def make_figures(result: TheoryResult, out: Path) -> dict[str, Path]:
    """Write every figure into `out` and return {name: path}."""
    makers = {"fraction": plot_fraction, "prediction_error": plot_prediction_error, "k_vs_n": plot_k_vs_n,
              "exponents": plot_exponents, "tails": plot_tails}
    if result.overlay:
        makers["heads"] = plot_heads
    return {name: fn(result, Path(out) / f"theory_{name}.png") for name, fn in makers.items()}


# ----------------------------------------------------------------------------------------------- report


def _pct(x: float) -> str:
    return f"{x:+.1%}"


def theory_sections(result: TheoryResult, figures: dict[str, Path]) -> list[Section]:
    """Report sections for the lab; usable on their own or inside a larger report."""
    cfg = result.config
    intro = (f"<p>Rows of length n = {html.escape(', '.join(map(str, cfg.n)))}; {cfg.rows} rows per n; "
             f"coverage 1−ε = {1 - cfg.eps:g}; d = {cfg.d}, d_h = {cfg.head_dim}; seed {cfg.seed}. "
             "<b>gaussian</b>: i.i.d. N(0,σ²) scores; <b>pipeline</b>: causal rows of X W_Q (X W_K)ᵀ/√d_h with "
             "X ~ N(0,σ_x²). Predictions use each row's own σ̂.</p>")
    claims = Section("Theory lab: which statements hold, under which scaling", intro,
                     tables=[(["claim", "scaling", "verdict", "evidence"],
                              [[c["claim"], c["scaling"], c["verdict"], c["evidence"]] for c in result.claims])])
    pred_rows = []
    for sc in result.scenarios:
        for r in sc["per_n"]:
            pred_rows.append([sc["name"], r["n"], r["sigma_hat"]["mean"], r["k"]["mean"], r["sim_frac"],
                              r["pred_frac"], _pct(r["rel_err"]), r["pred_frac_finite"], _pct(r["rel_err_finite"]),
                              _pct(r["rel_err_pooled"])])
    prediction = Section(
        "Gaussian prediction k/n → Φc(σ + Φ⁻¹(ε))",
        "<p>Relative error = (predicted − simulated)/simulated mean k/n. The finite-n prediction evaluates the "
        "coverage rule on the row of expected order statistics σ̂·Φ⁻¹(1−(j−½)/n). The pooled column uses one σ "
        "for all rows of a scenario, which is wrong for the pipeline: each query has its own score std.</p>",
        tables=[(["scenario", "n", "σ̂", "k mean", "k/n sim", "k/n pred", "err", "k/n finite", "err finite",
                  "err pooled σ"], pred_rows)],
        figures=[(figures[k], cap) for k, cap in (("fraction", "k/n vs n at a fixed scale"),
                                                  ("prediction_error", "relative error of the predictions"))
                 if k in figures])
    regime_rows = [[sc["name"], sc["fit"]["C"], sc["fit"]["r2"], sc["fit_upper"]["C"], sc["fit_upper_formula"]["C"],
                    sc["fit_upper_finite"]["C"], sc["expected_C"]] for sc in result.scenarios]
    regimes = Section(
        "Regimes: how k grows with n",
        "<p>C = least-squares slope of log(mean k) against log n. 'upper' = over the larger half of the lengths. "
        "The formula columns fit the same slope to n·(predicted k/n).</p>",
        tables=[(["scenario", "C (all n)", "R²", "C (upper)", "C formula (upper)", "C finite-n (upper)",
                  "large-n C"], regime_rows)],
        figures=[(figures[k], cap) for k, cap in (("k_vs_n", "k at coverage vs n"),
                                                  ("exponents", "local exponent vs n"))
                 if k in figures])
    rules = list(result.scenarios[0]["per_n"][0]["rules"])
    rule_rows = [[sc["name"]] + [f"{sc['per_n'][-1]['rules'][r]['tail']['mean']:.3f} / "
                                 f"{sc['per_n'][-1]['rules'][r]['eps_k_sparse']:.0%}" for r in rules]
                 for sc in result.scenarios]
    fixed_rules = Section(
        "Fixed keep-k rules",
        f"<p>At n = {cfg.n[-1]}: mean tail mass left by each rule / fraction of rows that are "
        f"(ε,k)-sparse (at most k entries above ε = {cfg.entry_threshold:g}).</p>",
        tables=[(["scenario"] + rules, rule_rows)],
        figures=[(figures["tails"], "tail mass of fixed rules vs n")] if "tails" in figures else [])
    sections = [claims, prediction, regimes, fixed_rules]
    if result.overlay:
        ov = result.overlay
        summary = ov["C_summary"]
        rows = [[sc["name"], gaussian_C_in_range(sc, ov["ctx"])] for sc in result.scenarios]
        sections.append(Section(
            "Real heads on the same axes",
            f"<p>Profile {html.escape(str(ov['path']))} ({html.escape(str(ov.get('model')))}, ctx {ov['ctx']}, "
            f"{len(ov['heads'])} heads, coverage {html.escape(ov['coverage_key'])}): C mean {summary['mean']:.3f}, "
            f"p10 {summary['p10']:.3f}, p50 {summary['p50']:.3f}, p90 {summary['p90']:.3f}. Each head is drawn as "
            "A·n^C with A set so its mean over positions 1..ctx equals the profile's mean k.</p>",
            tables=[(["Gaussian scenario", f"C over n ≤ {ov['ctx']}"], rows)],
            figures=[(figures["heads"], "C of real heads vs Gaussian scenarios")] if "heads" in figures else []))
    return sections


def write_report(result: TheoryResult, path: Path, figures: dict[str, Path]) -> Path:
    """theory.html: a self-contained page with the lab's tables and figures."""
    return write_html_report(path, "attnsparse theory lab", theory_sections(result, figures))
