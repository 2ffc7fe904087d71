"""Condensation losses: differentiable penalties that push each attention row's mass into few keys.

Every loss here is a pure tensor function of `probs (..., K)` (softmax rows, 0 on keys that are not
visible) and `visible (..., K)` bool (broadcastable to `probs`, e.g. (B, 1, Q, K) against (B, H, Q, K)).
It returns a `RowLoss`: per-row values and a per-row mask of the rows that take part. Values are 0 on
rows that do not take part, so a caller can add `values.sum()` and `mask.sum()` over chunks and layers
and divide once at the end; the mean is then the same however the rows were split (see
`CondensationRegularizer`). Rows with no visible key (padding) never take part.

Variants (formulas and advice in docs/losses.md):

- `tail`       1 − (sum of the k largest probabilities), rows with n_i > k. The default: it is the
               total-variation distance to top-k attention, which bounds top-k attention's output error.
- `adaptive`   the same with a per-row k_i = ⌈α·n_i^C⌉, rows with n_i > k_i.
- `softcount`  a smooth count of entries above ε, beyond k, rows with n_i > k.
- `entropy`    Shannon entropy of the row (a baseline), rows with n_i ≥ 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from attnsparse.errors import AttnsparseError

Variant = Literal["tail", "adaptive", "softcount", "entropy"]
VARIANTS: tuple[str, ...] = ("tail", "adaptive", "softcount", "entropy")

# ⌈x⌉ of a float that is an integer up to rounding (e.g. 3125**0.2 = 5.000000000000001) must give
# that integer, so we take ⌈x − _CEIL_SLACK⌉.
_CEIL_SLACK = 1e-9


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


# ---------------------------------------------------------------------------------------------------
# helpers


def _broadcast_visible(probs: Tensor, visible: Tensor) -> Tensor:
    """`visible` as a bool tensor of `probs`' shape (GQA callers pass one mask for all heads)."""
    if visible.dtype != torch.bool:
        visible = visible.bool()
    return torch.broadcast_to(visible, probs.shape)


def _row_lengths(visible: Tensor) -> Tensor:
    """n_i = number of visible keys of each row, shape (...)."""
    return visible.sum(-1)


def _masked_topk_sum(probs: Tensor, visible: Tensor, k: int) -> Tensor:
    """Sum of the k largest visible entries per row, for rows with n_i ≥ k (other rows: meaningless).

    Hidden keys are filled with −1 so they are never picked before a visible key; gradient flows
    only to the k picked entries.
    """
    k = min(k, probs.shape[-1])
    filled = probs.masked_fill(~visible, -1.0)
    return filled.topk(k, dim=-1, sorted=False).values.sum(-1)


def _zero_where_absent(values: Tensor, mask: Tensor) -> Tensor:
    """`values` on taking-part rows, exactly 0 elsewhere (and no gradient leaks from elsewhere)."""
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def adaptive_k(lengths: Tensor, alpha: float, C: float) -> Tensor:
    """k_i = max(1, ⌈α·n_i^C⌉) as a long tensor of `lengths`' shape (computed in float64)."""
    x = alpha * lengths.to(torch.float64).pow(C)
    return torch.ceil(x - _CEIL_SLACK).clamp_min(1).to(torch.long)


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


# ---------------------------------------------------------------------------------------------------
# the variants


def topk_tail_mass(probs: Tensor, visible: Tensor, k: int) -> RowLoss:
    """Tail mass 1 − m_k(p_i) per row; rows with n_i ≤ k (tail 0 by definition) and padding do not take part.

    Differentiable through the k picked entries (torch.topk values). With ties at the k-th place
    topk picks one of the tied entries; the value does not depend on the choice, and the gradient is
    that of the picked set (a valid subgradient).
    """
    _check_k(k)
    visible = _broadcast_visible(probs, visible)
    mask = _row_lengths(visible) > k
    if probs.shape[-1] <= k:  # no row can take part
        return RowLoss(probs.sum(-1) * 0.0, mask)
    tail = 1.0 - _masked_topk_sum(probs, visible, k)
    return RowLoss(_zero_where_absent(tail, mask), mask)


def adaptive_topk_tail_mass(probs: Tensor, visible: Tensor, alpha: float, C: float) -> RowLoss:
    """Tail mass with a per-row k_i = ⌈α·n_i^C⌉ (see `adaptive_k`); rows with n_i > k_i take part.

    One topk of width k(K) (much less than K when C < 1), a cumulative sum, and a gather at k_i − 1.
    Ties behave as in `topk_tail_mass`.
    """
    visible = _broadcast_visible(probs, visible)
    lengths = _row_lengths(visible)
    k_rows = adaptive_k(lengths, alpha, C)
    mask = lengths > k_rows
    # k is non-decreasing in n and n_i ≤ K, so k(K) bounds every k_i without a device sync.
    k_max = min(probs.shape[-1], int(adaptive_k(torch.tensor(probs.shape[-1]), alpha, C)))
    filled = probs.masked_fill(~visible, -1.0)
    top = filled.topk(k_max, dim=-1, sorted=True).values.cumsum(-1)
    index = (k_rows.clamp(max=k_max) - 1).unsqueeze(-1)
    tail = 1.0 - top.gather(-1, index).squeeze(-1)
    return RowLoss(_zero_where_absent(tail, mask), mask)


def soft_count_excess(
    probs: Tensor, visible: Tensor, k: int, eps: float, tau: float, normalize: bool = True
) -> RowLoss:
    """Soft count of entries above ε beyond k: relu(s_i − k), s_i = Σ_visible g(p_ij) (`soft_indicator`).

    With `normalize` (default) the excess is divided by n_i − k, so it lies in [0, 1] like the tail
    mass and one λ serves rows of every length. Rows with n_i > k take part (shorter rows cannot have
    more than k entries). As τ → 0 the value tends to the hard count's excess, max(0, #{p > ε} − k).
    """
    _check_k(k)
    _check_eps_tau(eps, tau)
    visible = _broadcast_visible(probs, visible)
    lengths = _row_lengths(visible)
    mask = lengths > k
    soft = soft_indicator(probs, eps, tau)
    soft = torch.where(visible, soft, torch.zeros((), dtype=soft.dtype, device=soft.device))
    excess = torch.relu(soft.sum(-1) - k)
    if normalize:
        excess = excess / (lengths - k).clamp_min(1).to(excess.dtype)
    return RowLoss(_zero_where_absent(excess, mask), mask)


def entropy(probs: Tensor, visible: Tensor, normalize: bool = True) -> RowLoss:
    """Shannon entropy −Σ p log p of each row (0·log 0 = 0, with a zero, finite gradient there).

    With `normalize` (default) it is divided by log n_i, so it lies in [0, 1] (1 = uniform). Rows with
    n_i ≥ 2 take part (a single key has entropy 0 and nothing to learn).
    """
    visible = _broadcast_visible(probs, visible)
    lengths = _row_lengths(visible)
    mask = lengths >= 2
    positive = visible & (probs > 0)
    safe = torch.where(positive, probs, torch.ones((), dtype=probs.dtype, device=probs.device))
    plogp = torch.where(positive, probs * safe.log(), torch.zeros((), dtype=probs.dtype, device=probs.device))
    values = -plogp.sum(-1)
    if normalize:
        values = values / lengths.clamp_min(2).to(values.dtype).log()
    return RowLoss(_zero_where_absent(values, mask), mask)


# ---------------------------------------------------------------------------------------------------
# configuration


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise AttnsparseError(f"condensation loss: k must be a positive integer, got {k!r}")


def _check_eps_tau(eps: float, tau: float) -> None:
    if not 0.0 < eps < 1.0:
        raise AttnsparseError(f"condensation loss: eps must lie in (0, 1), got {eps!r}")
    if not tau > 0.0:
        raise AttnsparseError(f"condensation loss: tau must be > 0, got {tau!r}")


@dataclass(frozen=True)
class LossConfig:
    """A condensation-loss variant and its parameters; build with `parse_loss`, call on (probs, visible).

    Fields unused by a variant keep their defaults and are ignored.
    """

    variant: Variant = "tail"
    k: int = 16
    alpha: float = 1.0
    C: float = 0.5
    eps: float = 0.01
    tau: float = 0.002
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise AttnsparseError(f"unknown condensation loss {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        _check_k(self.k)
        _check_eps_tau(self.eps, self.tau)
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise AttnsparseError(f"condensation loss: alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 < self.C <= 1.0:
            raise AttnsparseError(f"condensation loss: C must lie in (0, 1], got {self.C!r}")

    def __call__(self, probs: Tensor, visible: Tensor) -> RowLoss:
        """Per-row loss of this variant."""
        if self.variant == "tail":
            return topk_tail_mass(probs, visible, self.k)
        if self.variant == "adaptive":
            return adaptive_topk_tail_mass(probs, visible, self.alpha, self.C)
        if self.variant == "softcount":
            return soft_count_excess(probs, visible, self.k, self.eps, self.tau, self.normalize)
        return entropy(probs, visible, self.normalize)

    def spec(self) -> str:
        """The canonical spec string (round-trips through `parse_loss`), for config.json and logs."""
        keys = _VARIANT_KEYS[self.variant]
        if not keys:
            return self.variant
        parts = [f"{key}={_format(getattr(self, key))}" for key in keys]
        return f"{self.variant}:{','.join(parts)}"


_VARIANT_KEYS: dict[str, tuple[str, ...]] = {
    "tail": ("k",),
    "adaptive": ("alpha", "C"),
    "softcount": ("k", "eps", "tau", "normalize"),
    "entropy": ("normalize",),
}
_FIELD_TYPES: dict[str, type] = {"k": int, "alpha": float, "C": float, "eps": float, "tau": float, "normalize": bool}


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _parse_value(variant: str, key: str, text: str) -> Any:
    """Convert one `key=value` of a spec to the field's type, with a one-line error."""
    kind = _FIELD_TYPES[key]
    text = text.strip()
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    except ValueError:
        raise AttnsparseError(
            f"condensation loss {variant!r}: {key}={text!r} is not a valid {kind.__name__}"
        ) from None


def parse_loss(spec: str | LossConfig) -> LossConfig:
    """Parse `tail:k=16`, `adaptive:alpha=1.0,C=0.5`, `softcount:k=16,eps=0.01,tau=0.002`, `entropy`.

    A bare variant name takes the defaults (tail k=16, adaptive α=1 C=0.5, softcount k=16 ε=0.01
    τ=0.002, normalize=true). Raises AttnsparseError for an unknown variant or key, a repeated key, a
    malformed pair or an out-of-range value.
    """
    if isinstance(spec, LossConfig):
        return spec
    text = spec.strip() if isinstance(spec, str) else ""
    if not text:
        raise AttnsparseError(f"empty condensation loss spec; choose one of {', '.join(VARIANTS)} (e.g. tail:k=16)")
    variant, _, rest = text.partition(":")
    variant = variant.strip().lower()
    if variant not in VARIANTS:
        raise AttnsparseError(f"unknown condensation loss {variant!r} in {spec!r}; choose one of {', '.join(VARIANTS)}")
    allowed = _VARIANT_KEYS[variant]
    values: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not raw.strip():
            raise AttnsparseError(f"condensation loss {spec!r}: expected key=value, got {pair!r}")
        if key not in allowed:
            known = ", ".join(allowed) if allowed else "none"
            raise AttnsparseError(f"condensation loss {variant!r} has no parameter {key!r} (parameters: {known})")
        if key in values:
            raise AttnsparseError(f"condensation loss {spec!r}: {key} given twice")
        values[key] = _parse_value(variant, key, raw)
    return LossConfig(variant=variant, **values)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# the observer


class CondensationRegularizer:
    """Attention observer that accumulates the condensation loss over layers and query chunks.

    Use it with `attnsparse.attention.backend.sparse_attention(model, policy, observers=[reg])`: after the forward
    pass `reg.value()` is the mean loss over (layers, heads, taking-part rows) and carries the autograd
    graph back to the attention scores; add `λ · reg.value()` to the LM loss and call `reg.reset()`
    before the next forward. It reads only `layer_idx`, `probs` and `visible` of each chunk. `probs` is
    the dense softmax (before any sparsifying policy), so the loss is the same under sparse-aware
    training. Diagnostics are detached: the mean loss, the number of rows, and the mean top-k mass of
    taking-part rows (k = the loss's k, the adaptive k_i, or `diag_k` for entropy).
    """

    def __init__(self, loss: str | LossConfig = "tail:k=16", layers: set[int] | list[int] | None = None,
                 diag_k: int = 16) -> None:
        self.config = parse_loss(loss)
        self.layers: frozenset[int] | None = None if layers is None else frozenset(int(i) for i in layers)
        _check_k(diag_k)
        self.diag_k = diag_k
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated (call before each forward pass)."""
        self._sum: Tensor | None = None
        self._count: Tensor | None = None
        self._mass_sum: Tensor | None = None
        self._mass_count: Tensor | None = None
        self._device: torch.device | None = None

    def __call__(self, chunk: Any) -> None:
        """Add one chunk's rows (an `AttentionChunk`); chunks of layers outside the subset are skipped."""
        if self.layers is not None and chunk.layer_idx not in self.layers:
            return
        probs, visible = chunk.probs, chunk.visible
        rows = self.config(probs, visible)
        self._device = probs.device
        self._sum = _add(self._sum, rows.total())
        self._count = _add(self._count, rows.count())
        with torch.no_grad():
            mass = self._diagnostic_mass(probs.detach(), visible, rows)
            self._mass_sum = _add(self._mass_sum, mass.total())
            self._mass_count = _add(self._mass_count, mass.count())

    def _diagnostic_mass(self, probs: Tensor, visible: Tensor, rows: RowLoss) -> RowLoss:
        """Top-k mass of taking-part rows (reusing the tail when the loss is a tail mass)."""
        variant = self.config.variant
        if variant == "tail" or variant == "adaptive":
            tail = rows.values.detach()
            return RowLoss(torch.where(rows.mask, 1.0 - tail, tail), rows.mask)
        k = self.config.k if variant == "softcount" else self.diag_k
        tails = topk_tail_mass(probs, visible, k)
        return RowLoss(torch.where(tails.mask, 1.0 - tails.values, tails.values), tails.mask)

    @property
    def count(self) -> int:
        """Rows accumulated so far (all heads of all observed layers and chunks)."""
        return 0 if self._count is None else int(self._count)

    def value(self) -> Tensor:
        """Mean loss over accumulated rows; a 0 tensor (float32, no graph) if nothing was accumulated."""
        if self._sum is None or self._count is None:
            return torch.zeros((), dtype=torch.float32, device=self._device)
        return self._sum / self._count.clamp_min(1).to(self._sum.dtype)

    def diagnostics(self) -> dict[str, float | int | str]:
        """Detached summary: `loss`, `rows`, `topk_mass` (NaN if no rows), `topk_rows` and the loss spec."""
        mass_rows = 0 if self._mass_count is None else int(self._mass_count)
        mass = float("nan") if mass_rows == 0 else float(self._mass_sum / mass_rows)  # type: ignore[operator]
        return {
            "loss": float(self.value().detach()),
            "rows": self.count,
            "topk_mass": mass,
            "topk_rows": mass_rows,
            "spec": self.config.spec(),
        }


def _add(total: Tensor | None, term: Tensor) -> Tensor:
    return term if total is None else total + term
