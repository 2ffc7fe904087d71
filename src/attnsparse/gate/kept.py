"""How much of the model's attention a block selection keeps: the held-out measure a gate is judged by beside its KL.

For each layer of the recorded windows, an estimate's per-group block masses choose blocks by the prefill rule
(`select_blocks`: sink and local blocks forced, then the best blocks of the whole map up to a density of causal
block pairs); the kept mass is the share of the frozen model's block-pooled attention (per query head, averaged over
heads and query blocks) that falls on the chosen blocks. The oracle (the true block masses, group mean) keeps the
most a selection of that size can. A lower KL does not imply more kept mass; this is what selection spends.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from attnsparse.attention.selection.base import BlockGrid, Density, group_mean_log, select_blocks
from attnsparse.errors import AttnsparseError
from attnsparse.gate.model import BlockGate
from attnsparse.gate.observer import PooledLayer

# (layer, record, grid, groups) -> (B, H / groups, Nq, Nk) block log-masses, the mean over each `groups` heads
Estimate = Callable[[int, PooledLayer, BlockGrid, int], torch.Tensor]


def mean_key_logits(record: PooledLayer, scaling: float) -> torch.Tensor:
    """(B, H, Nq, Nk) logits of the training-free estimate: scaling x (pooled q . mean key), causal (-inf after)."""
    heads, kv_heads, dim = record.pooled_q.shape[1], record.pooled_k.shape[1], record.pooled_q.shape[-1]
    mean_k = record.pooled_k[..., :dim].repeat_interleave(heads // kv_heads, dim=1)
    logits = record.pooled_q @ mean_k.transpose(-1, -2) * scaling
    hidden = torch.arange(logits.shape[-1], device=logits.device)[None, :] > record.query_blocks[:, None]
    return logits.masked_fill(hidden, -math.inf)


def oracle_estimate(layer: int, record: PooledLayer, grid: BlockGrid, groups: int) -> torch.Tensor:
    """The true block masses, averaged over each group's heads: the selection that keeps the most."""
    batch, heads, rows, cols = record.target.shape
    return record.target.view(batch, heads // groups, groups, rows, cols).mean(2).log()


def mean_key_estimate(scaling: float) -> Estimate:
    """The training-free `mean` estimator: scaling x (pooled q . mean key), group mean of the heads' softmax."""

    def estimate(layer: int, record: PooledLayer, grid: BlockGrid, groups: int) -> torch.Tensor:
        return group_mean_log(mean_key_logits(record, scaling), groups, grid.causal(record.target.device))

    return estimate


def gate_estimate(gate: BlockGate) -> Estimate:
    """The gate's distribution, group mean of its heads' softmax (as `gate:path=DIR` computes it in prefill)."""

    def estimate(layer: int, record: PooledLayer, grid: BlockGrid, groups: int) -> torch.Tensor:
        with torch.no_grad():
            logits = gate.logits(layer, record.pooled_q, record.pooled_k, record.query_blocks)
        return group_mean_log(logits, groups, grid.causal(record.target.device))

    return estimate


def kept_mass(estimates: dict[str, Estimate], records: list[PooledLayer], *, block: int, ctx: int, density: float,
              sink: int = 1, local: int = 1, per: str = "group",
              layers: list[int] | None = None) -> dict[str, dict[str, float | list[float]]]:
    """Per estimate: the mean kept mass over layers and each layer's, for windows of `ctx` tokens (whole prefill
    windows: every query block recorded) in blocks of `block`, at `density` of causal block pairs, one selection
    per kv group (`per="group"`) or per query head (`"head"`, as `blocksparse:…:per=head`). `layers` names the
    model layer of each record (default: record i is layer i)."""
    grid = BlockGrid(block, ctx, ctx)
    report: dict[str, dict[str, float | list[float]]] = {}
    indices = list(range(len(records))) if layers is None else layers
    for name, estimate in estimates.items():
        kept = []
        for layer, record in zip(indices, records, strict=True):
            rows, cols = record.target.shape[-2:]
            if rows != grid.query_blocks or cols != grid.key_blocks:
                raise AttnsparseError(f"kept mass needs whole windows of {ctx} tokens in blocks of {block} "
                                      f"({grid.query_blocks} blocks); layer {layer} holds {rows} x {cols}")
            groups = 1 if per == "head" else record.pooled_q.shape[1] // record.pooled_k.shape[1]
            keep = select_blocks(estimate(layer, record, grid, groups), grid, Density(density), sink=sink, local=local)
            kept.append(float((record.target * keep.repeat_interleave(groups, dim=1)).sum(-1).mean()))
        report[name] = {"mean": sum(kept) / len(kept), "layers": kept}
    return report


def gate_report(gate: BlockGate, records: list[PooledLayer], scaling: float, *, block: int, ctx: int,
                density: float, sink: int = 1, local: int = 1) -> dict[str, Any]:
    """Kept mass at `density` by the gate, the mean-key estimate and the oracle, with one selection per kv group
    (`gate`, `mean`, `exact`) and per query head (`gate:per=head`, ...): what `attnsparse gate` reports held out."""
    estimates = {"gate": gate_estimate(gate), "mean": mean_key_estimate(scaling), "exact": oracle_estimate}
    report: dict[str, Any] = {"density": density}
    for per in ("group", "head"):
        kept = kept_mass(estimates, records, block=block, ctx=ctx, density=density, sink=sink, local=local, per=per)
        report |= {(name if per == "group" else f"{name}:per=head"): value for name, value in kept.items()}
    return report
