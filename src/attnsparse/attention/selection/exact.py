"""`exact[:chunk=C]`: the true block masses, from the call's full dense attention — the oracle estimator.

Each query's softmax over the keys it may see is summed over each key block; a query block's mass is the mean
over its queries (and, like every estimator, over the group's heads). It is the quantity every other estimator
guesses and the learned gate is trained on, so selecting with it measures what the selection rule itself costs
at a block size and density, apart from estimation error. Cost: a dense attention (in chunks of C queries), so it
is a diagnostic, never faster than dense.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from attnsparse.attention.selection.base import ESTIMATORS, BlockGrid, ChunkedEstimator, group_mean_log

DEFAULT_CHUNK = 512


@ESTIMATORS.register("exact", usage="exact[:chunk=C] (queries per chunk of the dense pass, default 512)",
                     help="oracle: true block masses from dense attention (diagnostic: costs a dense attention)")
class ExactMass(ChunkedEstimator):
    default_chunk: ClassVar[int] = DEFAULT_CHUNK
    name: ClassVar[str] = "exact"

    def log_mass(self, query: torch.Tensor, key: torch.Tensor, grid: BlockGrid, *, scaling: float,
                 layer_idx: int) -> torch.Tensor:
        groups = query.shape[1] // key.shape[1]
        keys = key.float().repeat_interleave(groups, dim=1)  # (B, H, K, D)
        n, size = grid.keys, grid.key_block
        key_index = torch.arange(n, device=query.device)
        sums = query.new_zeros(*query.shape[:2], grid.query_blocks, grid.key_blocks, dtype=torch.float32)
        for start in range(0, grid.queries, self.chunk):
            positions = torch.arange(start, min(start + self.chunk, grid.queries), device=query.device) + grid.offset
            scores = (query[:, :, start:start + len(positions)].float() @ keys.transpose(-1, -2)) * scaling
            probs = torch.softmax(scores.masked_fill(key_index > positions[:, None], float("-inf")), dim=-1)
            probs = F.pad(probs, (0, grid.key_blocks * size - n))
            per_block = probs.view(*probs.shape[:3], grid.key_blocks, size).sum(-1)  # (B, H, c, Kb)
            sums.index_add_(2, grid.query_block_of(positions), per_block)
        counts, _ = grid.counts(query.device)
        return group_mean_log((sums / counts[:, None]).log(), groups, grid.causal(query.device))
