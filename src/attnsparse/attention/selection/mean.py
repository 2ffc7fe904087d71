"""`mean`: pooled query . mean key, the block analogue of the decode scorer of the same name.

Each query block's mean query is scored against each key block's mean key (scaled as the model scales scores);
a block's log-mass is that score plus the log of its key count, so a partial last block is not over-weighted.
Cost: Qb x Kb x D per head, negligible beside attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnsparse.attention.selection.base import ESTIMATORS, BlockEstimator, BlockGrid, group_mean_log


@ESTIMATORS.register("mean", usage="mean", help="mean query of the query block . mean key of the key block")
@dataclass(frozen=True)
class MeanKey(BlockEstimator):
    name: ClassVar[str] = "mean"

    def log_mass(self, query: torch.Tensor, key: torch.Tensor, grid: BlockGrid, *, scaling: float,
                 layer_idx: int) -> torch.Tensor:
        groups = query.shape[1] // key.shape[1]
        pooled_q = grid.pool_queries(query)  # (B, H, Qb, D)
        pooled_k = grid.pool_keys(key).repeat_interleave(groups, dim=1)  # (B, H, Kb, D)
        _, key_counts = grid.counts(query.device)
        logits = (pooled_q @ pooled_k.transpose(-1, -2)) * scaling + key_counts.log()
        return group_mean_log(logits, groups, grid.causal(query.device))
