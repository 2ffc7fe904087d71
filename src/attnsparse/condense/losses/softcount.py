"""`softcount:k=K,eps=E,tau=T`: a smooth count of entries above ε beyond k, on rows with more than k keys."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from attnsparse.condense.losses.base import LOSSES, CondensationLoss
from attnsparse.condense.losses.rows import RowLoss, broadcast_visible, check_k, row_lengths, zero_where_absent
from attnsparse.errors import AttnsparseError


@LOSSES.register("softcount", usage="softcount:k=K,eps=E,tau=T,normalize=B",
                 help="smooth count of entries above ε beyond k (default k=16, ε=0.01, τ=0.002, normalized)")
@dataclass(frozen=True)
class SoftCount(CondensationLoss):
    k: int = 16
    eps: float = 0.01
    tau: float = 0.002
    normalize: bool = True
    name: ClassVar[str] = "softcount"

    def __post_init__(self) -> None:
        check_k(self.k)
        check_eps_tau(self.eps, self.tau)

    def __call__(self, probs: Tensor, visible: Tensor) -> RowLoss:
        return soft_count_excess(probs, visible, self.k, self.eps, self.tau, self.normalize)

    def with_budget(self, k: int) -> SoftCount:
        return replace(self, k=k)

    def diagnostic_k(self, default: int) -> int | None:
        return self.k


def check_eps_tau(eps: float, tau: float) -> None:
    if not 0.0 < eps < 1.0:
        raise AttnsparseError(f"eps must lie in (0, 1), got {eps!r}")
    if not tau > 0.0:
        raise AttnsparseError(f"tau must be > 0, got {tau!r}")


def _sigmoid(x: float) -> float:
    """σ(x) for a Python float, without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def soft_indicator(p: Tensor, eps: float, tau: float) -> Tensor:
    """g(p) ≈ 1{p > ε}: a sigmoid of width τ, shifted and scaled so that g(0) = 0 and g(1) = 1.

    The plain sigmoid((p − ε)/τ) gives every near-zero entry σ(−ε/τ) > 0, which over thousands of
    keys adds up to a spurious count; the shift removes that floor.
    """
    low = _sigmoid(-eps / tau)
    high = _sigmoid((1.0 - eps) / tau)
    return (torch.sigmoid((p - eps) / tau) - low) / (high - low)


def soft_count_excess(
    probs: Tensor, visible: Tensor, k: int, eps: float, tau: float, normalize: bool = True
) -> RowLoss:
    """Soft count of entries above ε beyond k: relu(s_i − k), s_i = Σ_visible g(p_ij) (`soft_indicator`).

    With `normalize` (default) the excess is divided by n_i − k, so it lies in [0, 1] like the tail
    mass and one λ serves rows of every length. Rows with n_i > k take part (shorter rows cannot have
    more than k entries). As τ → 0 the value tends to the hard count's excess, max(0, #{p > ε} − k).
    """
    check_k(k)
    check_eps_tau(eps, tau)
    visible = broadcast_visible(probs, visible)
    lengths = row_lengths(visible)
    mask = lengths > k
    soft = soft_indicator(probs, eps, tau)
    soft = torch.where(visible, soft, torch.zeros((), dtype=soft.dtype, device=soft.device))
    excess = torch.relu(soft.sum(-1) - k)
    if normalize:
        excess = excess / (lengths - k).clamp_min(1).to(excess.dtype)
    return RowLoss(zero_where_absent(excess, mask), mask)
