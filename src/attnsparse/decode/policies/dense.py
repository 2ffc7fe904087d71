"""`dense`: every token held, exact attention over every key."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnsparse.decode import kernels as K
from attnsparse.decode.policies.base import HeadPolicy, register_policy
from attnsparse.decode.stores import FullStore
from attnsparse.specs import ParsedSpec, expect_fields


@register_policy("dense", "dense", "full KV, exact attention over every key")
@dataclass(frozen=True)
class DensePolicy(HeadPolicy):
    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> DensePolicy:
        expect_fields(spec, 0)
        return cls()

    @property
    def spec(self) -> str:
        return "dense"

    def store(self, heads: list[int]) -> FullStore:
        return FullStore(self, heads)

    def attend(self, store: FullStore, q: torch.Tensor, scaling: float) -> torch.Tensor:
        n = store.n
        return K.dense_decode(q, store.keys[:, :, :n], store.values[:, :, :n], scaling)

    def bytes_read(self, n: int, dim: int, itemsize: int, groups: int) -> int:
        return K.dense_bytes(n, dim, itemsize)
