"""`tail:k=K` (the default): 1 − (sum of the k largest probabilities), on rows with more than k keys.

It is the total-variation distance to top-k attention, which bounds top-k attention's output error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from attnsparse.condense.losses.base import LOSSES, CondensationLoss
from attnsparse.condense.losses.rows import (
    RowLoss,
    broadcast_visible,
    check_k,
    masked_topk_sum,
    row_lengths,
    zero_where_absent,
)


@LOSSES.register("tail", usage="tail:k=K", help="1 − top-k mass of each row (default k=16)")
@dataclass(frozen=True)
class Tail(CondensationLoss):
    k: int = 16
    name: ClassVar[str] = "tail"

    def __post_init__(self) -> None:
        check_k(self.k)

    def __call__(self, probs: Tensor, visible: Tensor) -> RowLoss:
        return topk_tail_mass(probs, visible, self.k)

    def per_head(self, probs: Tensor, visible: Tensor, ks: tuple[int, ...]) -> RowLoss:
        """The tail under a head budget: head h's rows are measured at its own k_h."""
        return head_topk_tail_mass(probs, visible, ks)

    def with_budget(self, k: int) -> Tail:
        return replace(self, k=k)

    def diagnostic_k(self, default: int) -> int | None:
        return None


def head_topk_tail_mass(probs: Tensor, visible: Tensor, ks: tuple[int, ...]) -> RowLoss:
    """`topk_tail_mass` with one k per head: probs (B, H, Q, K), ks of length H (a head budget's layer row).

    Equals `topk_tail_mass` head by head; rows with n_i <= k_h and padding do not take part.
    """
    heads, width = probs.shape[1], probs.shape[-1]
    if len(ks) != heads:
        raise ValueError(f"{len(ks)} head budgets for {heads} heads")
    visible = broadcast_visible(probs, visible)
    need = torch.tensor(ks, device=probs.device).view(1, heads, 1)
    mask = row_lengths(visible) > need
    top = min(max(ks), width)
    picked = probs.masked_fill(~visible, -1.0).topk(top, dim=-1).values.cumsum(-1)
    index = (need.clamp(max=top) - 1).unsqueeze(-1).expand(*picked.shape[:-1], 1)
    tail = 1.0 - picked.gather(-1, index).squeeze(-1)
    return RowLoss(zero_where_absent(tail, mask), mask)


def topk_tail_mass(probs: Tensor, visible: Tensor, k: int) -> RowLoss:
    """Tail mass 1 − m_k(p_i) per row; rows with n_i ≤ k (tail 0 by definition) and padding do not take part.

    Differentiable through the k picked entries (torch.topk values). With ties at the k-th place
    topk picks one of the tied entries; the value does not depend on the choice, and the gradient is
    that of the picked set (a valid subgradient).
    """
    check_k(k)
    visible = broadcast_visible(probs, visible)
    mask = row_lengths(visible) > k
    if probs.shape[-1] <= k:  # no row can take part
        return RowLoss(probs.sum(-1) * 0.0, mask)
    tail = 1.0 - masked_topk_sum(probs, visible, k)
    return RowLoss(zero_where_absent(tail, mask), mask)
