"""Per-kv-head storage for sparse decoding; each decode policy makes the store it needs (`decode.policies`).

- `FullStore` (dense, topk): every token, in a preallocated buffer that grows by doubling; a decode step attends
  by its policy's rule.
- `BlockStore` (block): a `FullStore` in blocks that also holds its scorer's selection data (`decode.scorers`),
  grown with the buffer and updated by the scorer as tokens are appended; only the scorer reads or writes it.
- `StreamStore` (streaming): the first `sink` tokens and a ring of the last `window`; older entries are
  overwritten, so memory stays (sink + window) tokens however long the context grows.

Stores know their policies only through the small protocols below, so policies can import stores without a cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from attnsparse.decode import kernels as K
from attnsparse.decode.scorers.base import BlockScorer

GROWTH_STEP = 1024  # tokens added beyond what is needed when a buffer must grow (plus doubling)


class FullPolicy(Protocol):
    """What a policy over every held token provides: the rule a decode step attends by and what it reads."""

    def attend(self, store: FullStore, q: torch.Tensor, scaling: float) -> torch.Tensor: ...

    def bytes_read(self, n: int, dim: int, itemsize: int, groups: int) -> int: ...


class BlockRule(FullPolicy, Protocol):
    """What a block store reads from its policy (`decode.policies.block.BlockPolicy`)."""

    @property
    def block_size(self) -> int: ...

    @property
    def sink_blocks(self) -> int: ...

    @property
    def recent_blocks(self) -> int: ...

    @property
    def score(self) -> BlockScorer: ...

    def selected_blocks(self, n: int) -> int: ...


class StreamRule(Protocol):
    """What a stream store reads from its policy (`decode.policies.streaming.StreamingPolicy`)."""

    @property
    def sink(self) -> int: ...

    @property
    def window(self) -> int: ...


class FullStore:
    """All tokens of some kv heads; a decode step attends over them by the policy's rule."""

    def __init__(self, policy: FullPolicy, heads: list[int], block: int = 1) -> None:
        self.policy = policy
        self.heads = heads
        self.block = block
        self.n = 0
        self.keys = self.values = torch.empty(0)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2] if self.keys.dim() == 4 else 0

    def reserve(self, like: torch.Tensor, tokens: int) -> bool:
        """Make room for `tokens` in all (copying what is held); `like` gives batch, dim, dtype and device.
        True when the buffers were reallocated."""
        capacity = -(-tokens // self.block) * self.block
        if self.capacity >= capacity:
            return False
        batch, _, _, dim = like.shape
        shape = (batch, len(self.heads), capacity, dim)
        keys = like.new_zeros(shape)  # zeros, not garbage: a partly filled block is read (masked) by attention,
        values = like.new_zeros(shape)  # and a NaN in unused memory would survive masking as 0 * NaN
        if self.n:
            keys[:, :, : self.n] = self.keys[:, :, : self.n]
            values[:, :, : self.n] = self.values[:, :, : self.n]
        self.keys, self.values = keys, values
        return True

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append (B, h, Q, D) states, growing the buffers when full."""
        start, stop = self.n, self.n + keys.shape[2]
        if stop > self.capacity:
            self.reserve(keys, max(stop + GROWTH_STEP, 2 * self.capacity))
        self.keys[:, :, start:stop] = keys
        self.values[:, :, start:stop] = values
        self.n = stop

    def key_blocks(self) -> torch.Tensor:
        batch, heads, capacity, dim = self.keys.shape
        return self.keys.view(batch, heads, capacity // self.block, self.block, dim)

    def value_blocks(self) -> torch.Tensor:
        batch, heads, capacity, dim = self.values.shape
        return self.values.view(batch, heads, capacity // self.block, self.block, dim)

    def attend(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """q (B, h, G, D) -> (B, h, G, D) under this store's policy."""
        return self.policy.attend(self, q, scaling)

    def bytes_read(self, groups: int) -> int:
        """Bytes one decode step reads at the current length (all heads of the store)."""
        per_head = self.policy.bytes_read(self.n, self.keys.shape[-1], self.keys.element_size(), groups)
        return per_head * len(self.heads) * self.keys.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values]

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.keys, self.values = fn(self.keys), fn(self.values)


class BlockStore(FullStore):
    """All tokens of some kv heads in blocks, plus the block scorer's selection data (`selection`), which only the
    scorer reads and writes: allocated and grown with the buffers, updated on every append."""

    def __init__(self, policy: BlockRule, heads: list[int]) -> None:
        super().__init__(policy, heads, block=policy.block_size)
        self.policy: BlockRule = policy
        self.scorer = policy.score
        self.selection = torch.empty(0)

    def bind(self, layer: int) -> None:
        """Let the scorer take what it keeps per layer (`BlockScorer.bind`): this store holds `heads` of `layer`."""
        self.scorer = self.policy.score.bind(layer, self.heads)

    def reserve(self, like: torch.Tensor, tokens: int) -> bool:
        grew = super().reserve(like, tokens)
        if grew:
            self.selection = self.scorer.grow(self.selection, self.key_blocks(), self.n)
        return grew

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        start = self.n
        super().append(keys, values)
        self.scorer.update(self.selection, self.key_blocks(), keys, start)

    def select(self, q: torch.Tensor) -> torch.Tensor:
        """Blocks the policy reads for query q: (B, h, C) indices (sink and recent blocks, then the best scores)."""
        p = self.policy
        scores = self.scorer.scores(self.selection, self.key_blocks(), q, self.n)
        return K.select_blocks(scores, p.selected_blocks(self.n), p.sink_blocks, p.recent_blocks)

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + [self.selection]

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().map_batch(fn)
        self.selection = fn(self.selection)


class StreamStore:
    """The first `sink` tokens and the last `window` tokens of some kv heads; evicted entries are overwritten.

    Slots [0, sink) hold the sink; token p >= sink lives in slot sink + (p - sink) % window. Attention does not
    depend on key order (keys carry their rotary position already), so the ring needs no reordering.
    """

    def __init__(self, policy: StreamRule, heads: list[int]) -> None:
        self.policy = policy
        self.heads = heads
        self.n = 0
        self.keys = self.values = torch.empty(0)

    @property
    def slots(self) -> int:
        return self.policy.sink + self.policy.window

    @property
    def held(self) -> int:
        return min(self.n, self.slots)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        sink, window = self.policy.sink, self.policy.window
        if self.keys.dim() != 4:
            batch, _, _, dim = keys.shape
            self.keys = keys.new_empty(batch, len(self.heads), self.slots, dim)
            self.values = values.new_empty(batch, len(self.heads), self.slots, dim)
        count = keys.shape[2]
        if count == 1:  # the decode step: one slot, no index tensors
            slot = self.n if self.n < sink else sink + (self.n - sink) % window
            self.keys[:, :, slot] = keys[:, :, 0]
            self.values[:, :, slot] = values[:, :, 0]
            self.n += 1
            return
        positions = torch.arange(self.n, self.n + count, device=keys.device)
        keep = (positions < sink) | (positions >= self.n + count - window)  # the rest would be overwritten anyway
        positions = positions[keep]
        slots = torch.where(positions < sink, positions, sink + (positions - sink) % window)
        source = keep.nonzero().squeeze(1)
        self.keys.index_copy_(2, slots, keys.index_select(2, source))
        self.values.index_copy_(2, slots, values.index_select(2, source))
        self.n += count

    def held_positions(self) -> torch.Tensor:
        """Token position in each held slot, (held,) long; for tests and inspection."""
        slots = torch.arange(self.held, device=self.keys.device)
        sink, window = self.policy.sink, self.policy.window
        if self.n <= self.slots:
            return slots
        ring = slots[sink:] - sink
        newest_slot = (self.n - 1 - sink) % window
        age = (newest_slot - ring) % window  # 0 for the newest token
        return torch.cat([slots[:sink], self.n - 1 - age])

    def attend(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        held = self.held
        return K.dense_decode(q, self.keys[:, :, :held], self.values[:, :, :held], scaling)

    def bytes_read(self, groups: int) -> int:
        return K.dense_bytes(self.held, self.keys.shape[-1], self.keys.element_size()) * len(self.heads) * self.keys.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values]

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.keys, self.values = fn(self.keys), fn(self.values)


Store = FullStore | BlockStore | StreamStore
