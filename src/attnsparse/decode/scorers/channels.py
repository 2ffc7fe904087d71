"""Score `channelsR` (SparQ-style, Ribar et al. 2024): every key scored on the R channels where |q| is largest.

The keys are kept a second time, channel-major in float16 (B, h, D, capacity), so each chosen channel is one
contiguous read of 2 bytes per token; a block scores the max over its keys and the group's query heads (with R = D,
the exact max of q . k per block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnsparse.decode import kernels as K
from attnsparse.decode.scorers.base import BlockScorer, register_scorer
from attnsparse.errors import AttnsparseError
from attnsparse.specs import ParsedSpec, expect_fields


@register_scorer("channels", "channelsR", "each key on the R channels where |q| is largest, block = max (R: 16)")
@dataclass(frozen=True)
class ChannelScore(BlockScorer):
    """Selection data: the keys in float16, channel-major (B, h, D, capacity)."""

    channels: int = 16

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise AttnsparseError(f"block score channels needs R >= 1 channels, got {self.channels}")

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> ChannelScore:
        expect_fields(spec, (0, 1))
        return cls(int(spec.args[0])) if spec.args else cls()

    @property
    def spec(self) -> str:
        return f"channels{self.channels}"

    def grow(self, old: torch.Tensor, key_blocks: torch.Tensor, n: int) -> torch.Tensor:
        batch, heads, blocks, size, dim = key_blocks.shape
        sketch = key_blocks.new_zeros(batch, heads, dim, blocks * size, dtype=torch.float16)
        if n:
            sketch[..., :n] = old[..., :n]
        return sketch

    def update(self, data: torch.Tensor, key_blocks: torch.Tensor, keys: torch.Tensor, start: int) -> None:
        data[..., start : start + keys.shape[2]] = keys.transpose(-1, -2)

    def scores(self, data: torch.Tensor, key_blocks: torch.Tensor, q: torch.Tensor, n: int) -> torch.Tensor:
        return K.block_channel_scores(q, data, n, key_blocks.shape[-2], self.channels)

    def decode(self, q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor, data: torch.Tensor,
               n: int, count: int, sink_blocks: int, recent_blocks: int, scaling: float) -> torch.Tensor | None:
        return K.channel_block_decode(q, key_blocks, value_blocks, data, n, count, sink_blocks, recent_blocks,
                                      self.channels, scaling)

    def bytes_read(self, n: int, block: int, selected: int, dim: int, itemsize: int) -> int:
        return K.channel_block_bytes(n, block, selected, dim, itemsize, self.channels)
