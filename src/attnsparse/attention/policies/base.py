"""What every prefill attention policy is, and the registry that names them."""

from __future__ import annotations

from typing import ClassVar

import torch

from attnsparse.specs import Registry

POLICIES: Registry[Policy] = Registry("attention policy")


class Policy:
    """A key-selection rule applied to every query row; subclasses are frozen dataclasses of its parameters."""

    name: ClassVar[str]

    @property
    def spec(self) -> str:
        """The canonical spec (`parse_policy(p.spec) == p`), as written in results and logs."""
        raise NotImplementedError

    @property
    def is_dense(self) -> bool:
        """True when the policy keeps every visible key (the backend then skips the selection)."""
        return False

    def for_layer(self, layer_idx: int) -> Policy:
        """The rule layer `layer_idx` applies (the backend asks once per call); uniform policies are themselves."""
        return self

    def prepare(self, query: torch.Tensor, key: torch.Tensor, *, scaling: float, layer_idx: int) -> Policy:
        """The rule for one attention call, given its whole query (B, H, Q, D) and key (B, Hkv, K, D): block-sparse
        prefill selects its blocks here, once per call; row-wise policies are themselves."""
        return self

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, *, scaling: float, causal: bool) -> torch.Tensor | None:
        """The call's output (B, Q, H, D) from the policy's own kernel, or None to use the backend's chunked path
        (always the case with observers, dropout or soft-capping, which only the chunked path serves)."""
        return None

    def keep_mask(self, scores: torch.Tensor, visible: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
        """Bool mask (same shape as `scores`) of the keys this policy keeps; always a subset of `visible`.

        `visible` broadcasts to `scores`; `query_positions` (Q,) is each query's index on the key axis.
        """
        raise NotImplementedError

    def kept_per_row(self, rows: torch.Tensor) -> torch.Tensor:
        """Keys kept by a query that sees `rows` keys (elementwise), in an unpadded causal sequence."""
        raise NotImplementedError

    def kept_pairs(self, n: int) -> int:
        """Kept (query, key) pairs for one causal sequence of n tokens with no padding."""
        return int(self.kept_per_row(torch.arange(1, n + 1, device="cpu")).sum())  # host bookkeeping

    def density(self, n: int) -> float:
        """Kept pairs over causal pairs, n(n+1)/2, for a causal sequence of n tokens."""
        return self.kept_pairs(n) / (n * (n + 1) / 2)
