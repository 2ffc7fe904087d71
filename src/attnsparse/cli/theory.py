"""`attnsparse theory`: the Gaussian theory lab as a typer command (registered by attnsparse.cli.app).

Register with ``app.command("theory")(theory_command)``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer

from attnsparse.cli._common import DEVICE_HELP as _DEVICE
from attnsparse.specs import split_list

T = TypeVar("T")

_DEFAULT_N = "128,256,512,1024,2048,4096,8192,16384"
DEVICE_HELP = _DEVICE + " No --dtype: the lab computes in float64 on purpose (tails near ε and log-log fits)."


def parse_list(text: str, cast: Callable[[str], T], option: str) -> list[T]:
    """Comma-separated values (`specs.split_list`); an empty option gives [] (e.g. `--sigma ""`: no such scenario)."""
    return split_list(text, option, cast) if text.strip() else []


def _int(text: str) -> int:
    value = float(text)
    if not value.is_integer():
        raise ValueError(f"{text} is not an integer")
    return int(value)


def theory_command(
    out: Path = typer.Option(..., "--out", help="Run directory (theory.json, CSV, PNGs, theory.html)."),  # noqa: B008
    n: str = typer.Option(_DEFAULT_N, "--n", help="Row lengths n, comma-separated (each > 1, at least two)."),
    d: int = typer.Option(64, "--d", help="Input dimension d of X."),
    d_head: int = typer.Option(None, "--d-head", help="Query/key dimension d_h (default: d)."),
    sigma_x: str = typer.Option("1,1.5", "--sigma-x", help="Input scales σ_x of X ~ N(0, σ_x²) (pipeline, fixed)."),
    w_scale: float = typer.Option(1.0, "--w-scale", help="W_Q, W_K entries ~ N(0, w_scale²/d)."),
    w_norm: float = typer.Option(None, "--w-norm", help="Rescale W_Q, W_K to this spectral norm instead."),
    sigma: str = typer.Option("1,2,3", "--sigma", help="Score stds σ of i.i.d. Gaussian rows (fixed scale)."),
    growth: str = typer.Option("0.25,0.5,0.75,1.5", "--growth",
                               help="c values of the growing regime, score std √(2c·log n) ('' for none)."),
    eps: float = typer.Option(0.05, "--eps", help="Tail mass ε: k is measured at coverage 1−ε."),
    entry_eps: float = typer.Option(None, "--entry-eps", help="Entry threshold of (ε,k)-sparsity (default: --eps)."),
    exponents: str = typer.Option("0.25,0.5,0.75", "--C", help="Exponents C of the fixed rules k = ⌈n^C⌉."),
    k_const: int = typer.Option(16, "--k-const", help="The constant-k rule."),
    rows: int = typer.Option(512, "--rows", help="Rows measured per n and scenario."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    profile: Path = typer.Option(None, "--profile", help="A measure profile.json to overlay real heads."),  # noqa: B008
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous theory run in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
) -> None:
    """Simulate attention on Gaussian inputs and test the sparsity theory's statements."""
    from attnsparse.cli._common import run_or_exit
    from attnsparse.theory.lab import TheoryConfig
    from attnsparse.theory.run import run_theory

    def body() -> object:
        cfg = TheoryConfig(
            n=parse_list(n, _int, "--n"), d=d, d_head=d_head, sigma_x=parse_list(sigma_x, float, "--sigma-x"),
            w_scale=w_scale, w_norm=w_norm, sigmas=parse_list(sigma, float, "--sigma"),
            growth=parse_list(growth, float, "--growth"), eps=eps, entry_eps=entry_eps,
            C=parse_list(exponents, float, "--C"), k_const=k_const, rows=rows, seed=seed,
            profile=str(profile) if profile is not None else None, device=device)
        return run_theory(cfg, out, overwrite=overwrite, progress=progress)

    result = run_or_exit(body)
    _print_summary(result)


def _print_summary(result: object) -> None:
    """The claims table, one line each, and where the results are."""
    for claim in result.claims:  # type: ignore[attr-defined]
        typer.echo(f"[{claim['verdict']}] {claim['claim']} — {claim['scaling']}")
    typer.echo(f"results: {result.out}/theory.json, report: {result.out}/theory.html")  # type: ignore[attr-defined]
