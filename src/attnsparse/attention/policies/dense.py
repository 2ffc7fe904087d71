"""`dense`: every visible key (the reference every other policy is compared with)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnsparse.attention.policies.base import POLICIES, Policy
from attnsparse.specs import ParsedSpec, expect_fields


@POLICIES.register("dense", usage="dense", help="every visible key")
@dataclass(frozen=True)
class Dense(Policy):
    name: ClassVar[str] = "dense"

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> Dense:
        expect_fields(spec, 0)
        return cls()

    @property
    def spec(self) -> str:
        return self.name

    @property
    def is_dense(self) -> bool:
        return True

    def keep_mask(self, scores: torch.Tensor, visible: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
        return visible.expand_as(scores)

    def kept_per_row(self, rows: torch.Tensor) -> torch.Tensor:
        return rows
