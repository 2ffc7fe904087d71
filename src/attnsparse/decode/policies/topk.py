"""`topk:K`: every token held, exact scores, each query head keeps its K largest (a reference: it reads every key)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnsparse.decode import kernels as K
from attnsparse.decode.policies.base import HeadPolicy, register_policy
from attnsparse.decode.stores import FullStore
from attnsparse.errors import AttnsparseError
from attnsparse.specs import ParsedSpec, expect_fields


@register_policy("topk", "topk:K", "full KV, exact scores, each query head keeps its K largest")
@dataclass(frozen=True)
class TopkPolicy(HeadPolicy):
    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise AttnsparseError(f"topk needs k >= 1, got {self.k}")

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> TopkPolicy:
        expect_fields(spec, 1)
        return cls(int(spec.args[0]))

    @property
    def spec(self) -> str:
        return f"topk:{self.k}"

    def store(self, heads: list[int]) -> FullStore:
        return FullStore(self, heads)

    def attend(self, store: FullStore, q: torch.Tensor, scaling: float) -> torch.Tensor:
        n = store.n
        return K.topk_decode(q, store.keys[:, :, :n], store.values[:, :, :n], self.k, scaling)

    def bytes_read(self, n: int, dim: int, itemsize: int, groups: int) -> int:
        return K.topk_bytes(n, self.k, groups, dim, itemsize)
