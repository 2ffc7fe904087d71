"""`attnsparse budget`: a per-head key budget at a stated average k, allocated from a measure profile."""

from __future__ import annotations

import typer


def budget_command(
    profile: str = typer.Argument(..., help="profile.json of an `attnsparse measure` run."),
    mean_k: float = typer.Option(16.0, "--mean-k", help="Average keys per (layer, head) row, e.g. 16 = topk:16's cost."),
    min_k: int = typer.Option(1, "--min-k", help="Keys every head keeps at least."),
    out: str = typer.Option(..., "--out", help="Head-budget JSON to write (use it as the policy budget:FILE)."),
) -> None:
    """Spend an average k unevenly: heads whose tail mass falls most with more keys get them (greedy on the profile)."""
    from attnsparse.cli._common import run_or_exit
    from attnsparse.core.runs import atomic_write_json, check_writable_file
    from attnsparse.measure.budget import budget_from_profile
    from attnsparse.measure.profile import ProfileView

    def body() -> None:
        check_writable_file(out)
        view = ProfileView.read_json(profile)
        budget = budget_from_profile(view, mean_k, min_k)
        ctx = view.ctx
        notes = {"profile": str(profile), "model": view.model, "ctx": ctx, "rule": "greedy tail drop",
                 "min_k": min_k, "density_at_ctx": budget.density(ctx)}
        atomic_write_json(out, budget.to_json(notes))
        per_layer = ", ".join(f"{sum(row) / len(row):.0f}" for row in budget.ks)
        typer.echo(f"wrote {out}: mean k {budget.mean_k:.2f}, density {budget.density(ctx):.4f} at ctx {ctx}; "
                   f"mean k per layer: {per_layer}")

    run_or_exit(body)
