"""`mean[:sub=S]`: pooled query . mean key, the block analogue of the decode scorer of the same name.

Each query block's mean query is scored against each key block's mean key (scaled as the model scales scores);
a block's log-mass is that score plus the log of its key count, so a partial last block is not over-weighted.
Cost: Qb x Kb x D per head, negligible beside attention.

With `sub=S` (S divides the query block) the queries are pooled in sub-blocks of S instead: each sub-block's
softmax over the key blocks it may see (those starting at or before its last query) is its guessed mass, and a
query block's mass is the mean of its sub-blocks' (weighted by their queries). The softmax of one mean query over a block of 64 dilutes what only a
few of its queries look for (an induction target, a copied span); averaging masses keeps it. Cost: (Q/S) x Kb x D.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnsparse.attention.selection.base import ESTIMATORS, BlockEstimator, BlockGrid, group_mean_log
from attnsparse.errors import AttnsparseError
from attnsparse.specs import ParsedSpec, expect_fields


@ESTIMATORS.register("mean", usage="mean[:sub=S] (queries pooled per block, or per sub-block of S)",
                     help="mean query of the query block (or of each sub-block of S, masses averaged) . mean key")
@dataclass(frozen=True)
class MeanKey(BlockEstimator):
    sub: int = 0  # 0: pool the whole query block
    name: ClassVar[str] = "mean"

    def __post_init__(self) -> None:
        if self.sub < 0:
            raise AttnsparseError(f"mean:sub={self.sub}: give a sub-block of >= 1 queries (0 or none: the whole block)")

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> MeanKey:
        expect_fields(spec, 0, keywords=("sub",))
        return cls(int(spec.kwargs.get("sub", 0)))

    @property
    def spec(self) -> str:
        return self.name if not self.sub else f"{self.name}:sub={self.sub}"

    def log_mass(self, query: torch.Tensor, key: torch.Tensor, grid: BlockGrid, *, scaling: float,
                 layer_idx: int) -> torch.Tensor:
        if not self.sub or self.sub == grid.block:
            return _pooled_log_mass(query, key, grid, scaling)
        if grid.block % self.sub:
            raise AttnsparseError(f"mean:sub={self.sub} must divide the query block {grid.block}")
        return _sub_block_log_mass(query, key, grid, scaling, self.sub)


def _sub_block_log_mass(query: torch.Tensor, key: torch.Tensor, grid: BlockGrid, scaling: float,
                        sub: int) -> torch.Tensor:
    """Per kv group log-masses from sub-blocks of `sub` queries: each sub-block's mean query softmaxed over the key
    blocks it may see (mean keys), the softmaxes averaged into the query block, weighted by their queries."""
    groups = query.shape[1] // key.shape[1]
    fine = BlockGrid(sub, grid.queries, grid.keys, 1)  # sub-blocks of queries; the key grid is the coarse one's
    sub_queries, _ = fine.counts(query.device)
    first_position = (torch.arange(fine.query_blocks, device=query.device) + fine.first) * sub
    last_query = (first_position + sub).clamp(max=grid.keys) - 1
    hidden = torch.arange(grid.key_blocks, device=query.device)[None, :] * grid.key_block > last_query[:, None]
    logits = _mean_key_logits(fine.pool_queries(query), key, grid, scaling)  # (B, H, S, Kb)
    probs = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1)
    sums = torch.zeros(*probs.shape[:2], grid.query_blocks, grid.key_blocks, device=query.device)
    sums.index_add_(2, grid.query_block_of(first_position.clamp(min=grid.offset)), probs * sub_queries[:, None])
    queries, _ = grid.counts(query.device)
    return group_mean_log((sums / queries[:, None]).log(), groups, grid.causal(query.device))


def _pooled_log_mass(query: torch.Tensor, key: torch.Tensor, grid: BlockGrid, scaling: float) -> torch.Tensor:
    """Per kv group log-masses from each query block's mean query against each key block's mean key."""
    logits = _mean_key_logits(grid.pool_queries(query), key, grid, scaling)
    return group_mean_log(logits, query.shape[1] // key.shape[1], grid.causal(query.device))


def _mean_key_logits(pooled_q: torch.Tensor, key: torch.Tensor, grid: BlockGrid, scaling: float) -> torch.Tensor:
    """scaling x pooled queries (B, H, N, D) . each key block's mean key, plus the log of its key count: (B, H, N, Kb)."""
    pooled_k = grid.pool_keys(key).repeat_interleave(pooled_q.shape[1] // key.shape[1], dim=1)  # (B, H, Kb, D)
    _, key_counts = grid.counts(key.device)
    # scaled on the pooled queries rather than on the (N, Kb) map
    return ((pooled_q * scaling) @ pooled_k.transpose(-1, -2)).add_(key_counts.log())
