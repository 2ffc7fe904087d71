"""`vslash[:last=L]`: MInference's vertical-slash estimate (Jiang et al. 2024), mapped onto blocks.

The last L queries of the call attend densely (L x K scores); their mean attention on each key is the vertical
profile and their mean attention at each distance (query position - key position) the slash profile. A query at
position p is then guessed to put vertical[t] + slash[p - t] on key t <= p; a block's mass is that guess summed
over its keys and averaged over its queries (slash sums by prefix sums, so the cost is O(Q x Kb) per head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnsparse.attention.selection.base import ESTIMATORS, BlockEstimator, BlockGrid, group_mean_log
from attnsparse.errors import AttnsparseError
from attnsparse.specs import ParsedSpec, expect_fields

DEFAULT_LAST = 64


@ESTIMATORS.register("vslash", usage="vslash[:last=L] (L >= 1, default 64)",
                     help="MInference: vertical and slash profiles from the last L queries, summed per block")
@dataclass(frozen=True)
class VerticalSlash(BlockEstimator):
    last: int = DEFAULT_LAST
    name: ClassVar[str] = "vslash"

    def __post_init__(self) -> None:
        if self.last < 1:
            raise AttnsparseError(f"vertical-slash needs last >= 1 queries, got {self.last}")

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> VerticalSlash:
        expect_fields(spec, 0, keywords=("last",))
        return cls(int(spec.kwargs.get("last", DEFAULT_LAST)))

    @property
    def spec(self) -> str:
        return self.name if self.last == DEFAULT_LAST else f"{self.name}:last={self.last}"

    def log_mass(self, query: torch.Tensor, key: torch.Tensor, grid: BlockGrid, *, scaling: float,
                 layer_idx: int) -> torch.Tensor:
        groups = query.shape[1] // key.shape[1]
        n, last = grid.keys, min(self.last, grid.queries)
        tail = query[:, :, -last:].float()
        keys = key.float().repeat_interleave(groups, dim=1)
        positions = torch.arange(n - last, n, device=query.device)  # key positions of the last queries
        key_index = torch.arange(n, device=query.device)
        scores = (tail @ keys.transpose(-1, -2)) * scaling
        probs = torch.softmax(scores.masked_fill(key_index > positions[:, None], float("-inf")), dim=-1)
        vertical = probs.mean(dim=2)  # (B, H, K)
        distance = (positions[:, None] - key_index).clamp(min=0)  # (L, K) distance of each visible key
        slash = torch.zeros_like(vertical).scatter_add_(
            -1, distance.reshape(1, 1, -1).expand(*vertical.shape[:2], -1), probs.reshape(*vertical.shape[:2], -1)
        ) / last  # (B, H, K): mean mass at each distance (invisible entries are 0 and land on distance 0)
        return group_mean_log(self._block_mass(vertical, slash, grid).log(), groups, grid.causal(query.device))

    @staticmethod
    def _block_mass(vertical: torch.Tensor, slash: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
        """(B, H, Qb, Kb): per query block, the mean over its queries of the guessed mass on each key block."""
        size, n = grid.key_block, grid.keys
        slash_prefix = F.pad(slash.cumsum(-1), (1, 0))  # [d]: slash mass at distances < d
        vertical_prefix = F.pad(vertical.cumsum(-1), (1, 0))  # [t]: vertical mass on keys < t
        p = torch.arange(grid.offset, n, device=slash.device)  # every query position
        starts = torch.arange(grid.key_blocks, device=slash.device) * size
        stops = torch.minimum((starts + size).clamp(max=n)[None, :], p[:, None] + 1)  # (Q, Kb): keys seen end
        stops = torch.maximum(stops, starts[None, :])  # blocks past the query: empty
        # keys t in [start, stop) lie at distances p - t in [p - stop + 1, p - start]
        far = (p[:, None] - starts[None, :] + 1).clamp(min=0)
        near = (p[:, None] - stops + 1).clamp(min=0)
        per_query = slash_prefix[..., far] - slash_prefix[..., near]
        per_query += vertical_prefix[..., stops] - vertical_prefix[..., starts[None, :].expand_as(stops)]
        row_blocks = grid.query_block_of(p)
        sums = torch.zeros(*slash.shape[:2], grid.query_blocks, grid.key_blocks, device=slash.device)
        sums.index_add_(2, row_blocks, per_query)
        counts, _ = grid.counts(slash.device)
        return sums / counts[:, None]
