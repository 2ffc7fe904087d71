"""`topk:K`: each row keeps its K largest scores; ties at the threshold go to the earlier key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnsparse.attention.policies.base import POLICIES, Policy
from attnsparse.errors import AttnsparseError
from attnsparse.specs import ParsedSpec, expect_fields


@POLICIES.register("topk", usage="topk:K (K >= 1)", help="each row's K largest scores (ties: the earlier key)")
@dataclass(frozen=True)
class TopK(Policy):
    k: int
    name: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise AttnsparseError(f"k must be >= 1, got {self.k}")

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> TopK:
        expect_fields(spec, 1)
        return cls(int(spec.args[0]))

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.k}"

    def keep_mask(self, scores: torch.Tensor, visible: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
        return topk_keep_mask(scores, visible, self.k)

    def kept_per_row(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.clamp(max=self.k)


def topk_keep_mask(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest visible scores; among equal scores at the threshold, the earliest keys win.

    Rows with at most k visible keys keep all of them. The result does not depend on torch.topk's tie order.
    """
    visible = visible.expand_as(scores)
    if k >= scores.shape[-1]:
        return visible
    masked = scores.masked_fill(~visible, float("-inf"))
    threshold = masked.topk(k, dim=-1).values[..., -1:]
    above = masked > threshold
    at_threshold = (masked == threshold) & visible
    still_needed = k - above.sum(dim=-1, keepdim=True)
    return above | (at_threshold & (at_threshold.cumsum(dim=-1) <= still_needed))
