"""Per-row loss values and the tensor helpers every condensation loss shares.

A loss is a pure function of `probs (..., K)` (softmax rows, 0 on keys that are not visible) and `visible (..., K)`
bool (broadcastable to `probs`, e.g. (B, 1, Q, K) against (B, H, Q, K)). It returns a `RowLoss`: values are 0 on
rows that do not take part, so a caller can add `values.sum()` and `mask.sum()` over chunks and layers and divide
once at the end; the mean is then the same however the rows were split. Rows with no visible key never take part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnsparse.errors import AttnsparseError


@dataclass(frozen=True)
class RowLoss:
    """Per-row loss `values` (0 where not taking part) and the `mask` of rows taking part; shape (...)."""

    values: Tensor
    mask: Tensor

    def total(self) -> Tensor:
        """Sum over taking-part rows (keeps the autograd graph)."""
        return self.values.sum()

    def count(self) -> Tensor:
        """Number of taking-part rows, as a long tensor (no device sync)."""
        return self.mask.sum()

    def mean(self) -> Tensor:
        """Mean over taking-part rows; 0 when none take part."""
        return self.total() / self.count().clamp_min(1)


def broadcast_visible(probs: Tensor, visible: Tensor) -> Tensor:
    """`visible` as a bool tensor of `probs`' shape (GQA callers pass one mask for all heads)."""
    if visible.dtype != torch.bool:
        visible = visible.bool()
    return torch.broadcast_to(visible, probs.shape)


def row_lengths(visible: Tensor) -> Tensor:
    """n_i = number of visible keys of each row, shape (...)."""
    return visible.sum(-1)


def masked_topk_sum(probs: Tensor, visible: Tensor, k: int) -> Tensor:
    """Sum of the k largest visible entries per row, for rows with n_i ≥ k (other rows: meaningless).

    Hidden keys are filled with −1 so they are never picked before a visible key; gradient flows
    only to the k picked entries.
    """
    k = min(k, probs.shape[-1])
    filled = probs.masked_fill(~visible, -1.0)
    return filled.topk(k, dim=-1, sorted=False).values.sum(-1)


def zero_where_absent(values: Tensor, mask: Tensor) -> Tensor:
    """`values` on taking-part rows, exactly 0 elsewhere (and no gradient leaks from elsewhere)."""
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def check_k(k: int) -> None:
    """Refuse a budget that is not a positive integer."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise AttnsparseError(f"k must be a positive integer, got {k!r}")
