"""`entropy`: the Shannon entropy of each row (a baseline), on rows with at least two keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from attnsparse.condense.losses.base import LOSSES, CondensationLoss
from attnsparse.condense.losses.rows import RowLoss, broadcast_visible, row_lengths, zero_where_absent


@LOSSES.register("entropy", usage="entropy:normalize=B", help="Shannon entropy of each row, over log n (a baseline)")
@dataclass(frozen=True)
class Entropy(CondensationLoss):
    normalize: bool = True
    name: ClassVar[str] = "entropy"

    def __call__(self, probs: Tensor, visible: Tensor) -> RowLoss:
        return entropy(probs, visible, self.normalize)


def entropy(probs: Tensor, visible: Tensor, normalize: bool = True) -> RowLoss:
    """Shannon entropy −Σ p log p of each row (0·log 0 = 0, with a zero, finite gradient there).

    With `normalize` (default) it is divided by log n_i, so it lies in [0, 1] (1 = uniform). Rows with
    n_i ≥ 2 take part (a single key has entropy 0 and nothing to learn).
    """
    visible = broadcast_visible(probs, visible)
    lengths = row_lengths(visible)
    mask = lengths >= 2
    positive = visible & (probs > 0)
    safe = torch.where(positive, probs, torch.ones((), dtype=probs.dtype, device=probs.device))
    plogp = torch.where(positive, probs * safe.log(), torch.zeros((), dtype=probs.dtype, device=probs.device))
    values = -plogp.sum(-1)
    if normalize:
        values = values / lengths.clamp_min(2).to(values.dtype).log()
    return RowLoss(zero_where_absent(values, mask), mask)
