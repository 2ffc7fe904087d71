"""`gate:path=DIR`: the learned block gate (`attnsparse gate`), SeerAttention's AttnGate, as a prefill estimator.

The gate's softmax over key blocks, computed from the call's pooled queries and [mean | max | min] pooled keys
(attnsparse.gate.model), is per query head; the group's estimate is the mean of its heads' distributions, like
every estimator here (under `blocksparse:…:per=head`, each head's own distribution). The gate is loaded once per
directory; its block size and the model's attention shape must match the policy and the model (one-line errors
otherwise). Cost: Qb x Kb x r per head plus the projections.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from attnsparse.attention.selection.base import ESTIMATORS, BlockEstimator, BlockGrid, group_mean_log
from attnsparse.errors import AttnsparseError
from attnsparse.specs import ParsedSpec, expect_fields


@ESTIMATORS.register("gate", usage="gate:path=DIR (a directory written by `attnsparse gate`)",
                     help="learned block gate: distilled from the frozen model's block-pooled attention")
@dataclass(frozen=True)
class GateEstimator(BlockEstimator):
    path: str
    name: ClassVar[str] = "gate"

    def __post_init__(self) -> None:
        load_gate(self.path)  # a missing or foreign directory fails when the spec is parsed, before any work

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> GateEstimator:
        expect_fields(spec, 0, keywords=("path",))
        if "path" not in spec.kwargs:
            raise AttnsparseError("estimator gate needs its directory: gate:path=DIR (written by `attnsparse gate`)")
        return cls(spec.kwargs["path"])

    @property
    def spec(self) -> str:
        return f"gate:path={self.path}"

    def log_mass(self, query: torch.Tensor, key: torch.Tensor, grid: BlockGrid, *, scaling: float,
                 layer_idx: int) -> torch.Tensor:
        from attnsparse.gate.model import pool_keys

        gate = load_gate(self.path).to(query.device)  # the cached gate moves once, then stays with the queries
        config = gate.config
        config.check_block(grid.block, f"blocksparse with blocks of {grid.block}")
        if grid.key_block != grid.block:
            raise AttnsparseError(f"the gate {self.path} scores square blocks of {grid.block}; give blocksparse one "
                                  f"block size, not {grid.block}x{grid.key_block}")
        per_head = key.shape[1] == config.heads != config.kv_heads  # blocksparse per=head repeats the keys
        if per_head:
            key = key[:, :: config.groups]  # each kv head's keys once: the gate projects them per kv head
        if layer_idx >= config.layers or (query.shape[1], key.shape[1], query.shape[-1]) != (
                config.heads, config.kv_heads, config.head_dim):
            raise AttnsparseError(
                f"the gate {self.path} was trained for {config.layers} layers x {config.heads} heads / "
                f"{config.kv_heads} kv heads x {config.head_dim} dims ({config.model or 'unknown model'}) but layer "
                f"{layer_idx} has {query.shape[1]} / {key.shape[1]} x {query.shape[-1]}; train a gate for this model")
        rows = torch.arange(grid.query_blocks, device=query.device) + grid.first
        with torch.no_grad():  # logits are log-masses up to each row's normaliser, which every reader applies
            logits = gate.logits(layer_idx, grid.pool_queries(query), pool_keys(key, grid.block), rows)
        return group_mean_log(logits, 1 if per_head else config.groups, grid.causal(query.device))


@functools.lru_cache(maxsize=8)
def _load(resolved: str, stamp: float) -> object:
    from attnsparse.gate.model import BlockGate

    return BlockGate.load(resolved)


def load_gate(path: str):
    """The gate in directory `path`, loaded once (again when gate.json changes)."""
    from attnsparse.gate.model import CONFIG_FILE, BlockGate

    directory = Path(path).expanduser().resolve()
    marker = directory / CONFIG_FILE
    if not marker.is_file():
        return BlockGate.load(directory)  # raises its one-line error
    return _load(str(directory), marker.stat().st_mtime)
