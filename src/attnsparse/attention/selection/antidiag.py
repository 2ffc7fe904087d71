"""`antidiag[:stride=S]`: XAttention's antidiagonal block scores (Xu et al. 2025).

Queries and keys are grouped in runs of S positions; a query run (reversed) concatenated against a key run gives
the sum of the S scores on that S x S tile's antidiagonal, one dot product of length S·D. Those downsampled
scores (scaled by the model's scaling over S, causal at run level) are softmaxed per query run, and a block's
mass is the sum over its runs: every query and key of a block touches its antidiagonals, so a strong vertical or
slash inside the block is not missed. Cost: 1/S of the dense score matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnsparse.attention.selection.base import ESTIMATORS, BlockEstimator, BlockGrid, group_mean_log
from attnsparse.errors import AttnsparseError
from attnsparse.specs import ParsedSpec, expect_fields

DEFAULT_STRIDE = 8


@ESTIMATORS.register("antidiag", usage="antidiag[:stride=S] (S >= 1, default 8)",
                     help="XAttention: softmax of antidiagonal sums of S x S tiles, summed per block")
@dataclass(frozen=True)
class Antidiagonal(BlockEstimator):
    stride: int = DEFAULT_STRIDE
    name: ClassVar[str] = "antidiag"

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise AttnsparseError(f"antidiagonal stride must be >= 1, got {self.stride}")

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> Antidiagonal:
        expect_fields(spec, 0, keywords=("stride",))
        return cls(int(spec.kwargs.get("stride", DEFAULT_STRIDE)))

    @property
    def spec(self) -> str:
        return self.name if self.stride == DEFAULT_STRIDE else f"{self.name}:stride={self.stride}"

    def log_mass(self, query: torch.Tensor, key: torch.Tensor, grid: BlockGrid, *, scaling: float,
                 layer_idx: int) -> torch.Tensor:
        stride = _divisor_at_most(grid.key_block, self.stride)  # divides the query block too
        groups = query.shape[1] // key.shape[1]
        # query runs from the first query block's start, key runs from 0, both padded to whole blocks
        q_start = grid.first * grid.block
        q = F.pad(query.float(), (0, 0, grid.offset - q_start, q_start + grid.query_blocks * grid.block - grid.keys))
        k = F.pad(key.float(), (0, 0, 0, grid.key_blocks * grid.key_block - grid.keys))
        batch, heads, padded_q, dim = q.shape
        q_runs = q.view(batch, heads, padded_q // stride, stride, dim).flip(3).reshape(batch, heads, -1, stride * dim)
        k_runs = k.reshape(batch, key.shape[1], -1, stride * dim).repeat_interleave(groups, dim=1)
        scores = (q_runs @ k_runs.transpose(-1, -2)) * (scaling / stride)  # (B, H, Qr, Kr)
        row_run = torch.arange(q_runs.shape[2], device=q.device)[:, None] + q_start // stride
        col_run = torch.arange(k_runs.shape[2], device=q.device)[None, :]
        row_pos = row_run * stride + torch.arange(stride, device=q.device)[None, :]  # (Qr, S)
        has_query = ((row_pos >= grid.offset) & (row_pos < grid.keys)).any(-1, keepdim=True)  # (Qr, 1)
        visible = (col_run <= row_run) & (col_run * stride < grid.keys) & has_query
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        mass = probs.view(batch, heads, grid.query_blocks, grid.block // stride, grid.key_blocks,
                          grid.key_block // stride)
        return group_mean_log(mass.sum(dim=(3, 5)).log(), groups, grid.causal(query.device))


def _divisor_at_most(block: int, stride: int) -> int:
    """The largest divisor of the (key) block size not above the stride (runs must tile blocks)."""
    return max(d for d in range(1, min(block, stride) + 1) if block % d == 0)
