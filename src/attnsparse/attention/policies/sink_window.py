"""`sink+window:S:W` (also spelled `streaming:S:W`, as decode plans do): attention sinks plus a recent window.

One rule under two names: the first S visible keys and the keys within W positions up to the query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnsparse.attention.policies.base import POLICIES, Policy
from attnsparse.errors import AttnsparseError
from attnsparse.specs import ParsedSpec, expect_fields


@POLICIES.register("sink+window", usage="sink+window:S:W (alias streaming:S:W; S >= 0, W >= 1)",
                   help="the first S visible keys and the last W keys up to the query", aliases=("streaming",))
@dataclass(frozen=True)
class SinkWindow(Policy):
    sink: int
    window: int
    name: ClassVar[str] = "sink+window"

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 1:
            raise AttnsparseError(f"need sink >= 0 and window >= 1, got sink {self.sink}, window {self.window}")

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> SinkWindow:
        expect_fields(spec, 2)
        return cls(int(spec.args[0]), int(spec.args[1]))

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.sink}:{self.window}"

    def keep_mask(self, scores: torch.Tensor, visible: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
        return sink_window_keep_mask(visible.expand_as(scores), query_positions, self.sink, self.window)

    def kept_per_row(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.clamp(max=self.sink + self.window)


def sink_window_keep_mask(
    visible: torch.Tensor, query_positions: torch.Tensor, sink: int, window: int
) -> torch.Tensor:
    """Keep the first `sink` visible keys and the keys within `window` positions up to each query."""
    key_index = torch.arange(visible.shape[-1], device=visible.device)
    recent = key_index > (query_positions.to(visible.device)[:, None] - window)
    first = visible.cumsum(dim=-1) <= sink
    return visible & (recent | first)
