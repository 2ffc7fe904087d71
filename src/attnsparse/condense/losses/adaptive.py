"""`adaptive:alpha=A,C=C`: the tail mass with a per-row budget k_i = ⌈α·n_i^C⌉, on rows with n_i > k_i."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from attnsparse.condense.losses.base import LOSSES, CondensationLoss
from attnsparse.condense.losses.rows import RowLoss, broadcast_visible, row_lengths, zero_where_absent
from attnsparse.errors import AttnsparseError

# ⌈x⌉ of a float that is an integer up to rounding (e.g. 3125**0.2 = 5.000000000000001) must give
# that integer, so we take ⌈x − _CEIL_SLACK⌉.
_CEIL_SLACK = 1e-9


@LOSSES.register("adaptive", usage="adaptive:alpha=A,C=C",
                 help="tail mass with per-row k_i = ⌈α·n_i^C⌉ (default α=1, C=0.5)")
@dataclass(frozen=True)
class Adaptive(CondensationLoss):
    alpha: float = 1.0
    C: float = 0.5
    name: ClassVar[str] = "adaptive"

    def __post_init__(self) -> None:
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise AttnsparseError(f"alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 < self.C <= 1.0:
            raise AttnsparseError(f"C must lie in (0, 1], got {self.C!r}")

    def __call__(self, probs: Tensor, visible: Tensor) -> RowLoss:
        return adaptive_topk_tail_mass(probs, visible, self.alpha, self.C)

    def diagnostic_k(self, default: int) -> int | None:
        return None


def adaptive_k(lengths: Tensor, alpha: float, C: float) -> Tensor:
    """k_i = max(1, ⌈α·n_i^C⌉) as a long tensor of `lengths`' shape (computed in float64)."""
    x = alpha * lengths.to(torch.float64).pow(C)
    return torch.ceil(x - _CEIL_SLACK).clamp_min(1).to(torch.long)


def adaptive_topk_tail_mass(probs: Tensor, visible: Tensor, alpha: float, C: float) -> RowLoss:
    """Tail mass with a per-row k_i = ⌈α·n_i^C⌉ (see `adaptive_k`); rows with n_i > k_i take part.

    One topk of width k(K) (much less than K when C < 1), a cumulative sum, and a gather at k_i − 1.
    Ties behave as in `topk_tail_mass`.
    """
    visible = broadcast_visible(probs, visible)
    lengths = row_lengths(visible)
    k_rows = adaptive_k(lengths, alpha, C)
    mask = lengths > k_rows
    # k is non-decreasing in n and n_i ≤ K, so k(K) bounds every k_i without a device sync.
    k_max = min(probs.shape[-1], int(adaptive_k(torch.tensor(probs.shape[-1], device="cpu"), alpha, C)))
    filled = probs.masked_fill(~visible, -1.0)
    top = filled.topk(k_max, dim=-1, sorted=True).values.cumsum(-1)
    index = (k_rows.clamp(max=k_max) - 1).unsqueeze(-1)
    tail = 1.0 - top.gather(-1, index).squeeze(-1)
    return RowLoss(zero_where_absent(tail, mask), mask)
