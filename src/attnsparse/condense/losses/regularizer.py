"""The attention observer that turns a condensation loss into one training term over layers and query chunks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnsparse.attention.policies.budget import HeadBudget
from attnsparse.condense.losses.base import LOSSES, CondensationLoss
from attnsparse.condense.losses.rows import RowLoss, check_k
from attnsparse.condense.losses.tail import topk_tail_mass


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

    def __init__(self, loss: str | CondensationLoss = "tail:k=16", layers: set[int] | list[int] | None = None,
                 diag_k: int = 16) -> None:
        self.loss = loss if isinstance(loss, CondensationLoss) else LOSSES.parse(loss)
        self.layers: frozenset[int] | None = None if layers is None else frozenset(int(i) for i in layers)
        check_k(diag_k)
        self.diag_k = diag_k
        self.budget: HeadBudget | None = None  # per-head k (a loss with `per_head`, e.g. tail) when set
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
        per_head = getattr(self.loss, "per_head", None)
        if self.budget is not None and per_head is not None:
            rows = per_head(probs, visible, self.budget.ks[chunk.layer_idx])
        else:
            rows = self.loss(probs, visible)
        self._device = probs.device
        self._sum = _add(self._sum, rows.total())
        self._count = _add(self._count, rows.count())
        with torch.no_grad():
            mass = self._diagnostic_mass(probs.detach(), visible, rows)
            self._mass_sum = _add(self._mass_sum, mass.total())
            self._mass_count = _add(self._mass_count, mass.count())

    def _diagnostic_mass(self, probs: Tensor, visible: Tensor, rows: RowLoss) -> RowLoss:
        """Top-k mass of taking-part rows (reusing the tail when the loss is a tail mass)."""
        k = self.loss.diagnostic_k(self.diag_k)
        tails = rows if k is None else topk_tail_mass(probs, visible, k)
        tail = tails.values.detach()
        return RowLoss(torch.where(tails.mask, 1.0 - tail, tail), tails.mask)

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
            "spec": self.loss.spec,
        }


def _add(total: Tensor | None, term: Tensor) -> Tensor:
    return term if total is None else total + term
