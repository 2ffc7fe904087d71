"""A transformers `Cache` whose layers keep per-kv-head storage for sparse decoding.

Each layer splits its kv heads into groups of equal policy (usually one or two groups), one store each, made by
the policy (`attnsparse.decode.policies`):

- `FullStore` (dense, topk): every token, in a preallocated buffer that grows by doubling; a decode step attends
  by its policy's rule.
- `BlockStore` (block): a `FullStore` in blocks that also holds its scorer's selection data (`decode.scorers`),
  grown with the buffer and updated by the scorer as tokens are appended.
- `StreamStore` (streaming): the first `sink` tokens and a ring of the last `window`; older entries are
  overwritten, so memory stays (sink + window) tokens however long the context grows.

`update()` stores the new states. For a prompt (several tokens into an empty layer) it returns them unchanged, so
prefill is ordinary dense attention. For a decode step (one token) it returns the new token only and marks the
layer pending; the attention function registered by `attnsparse.decode.backend` picks it up and calls `attend()`, which
runs each group's kernel. Several tokens into a non-empty layer (assisted decoding, chunked prefill) are refused.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from attnsparse.core.models import ModelShape
from attnsparse.decode import kernels as K
from attnsparse.errors import AttnsparseError

if TYPE_CHECKING:
    from attnsparse.decode.plan import DecodePlan
    from attnsparse.decode.policies import BlockPolicy, HeadPolicy, StreamingPolicy

DECODE_BACKEND = "attnsparse-decode"
# id(key tensor returned by update) -> (weak ref to that tensor, layer); consumed by the attention function.
PENDING: dict[int, tuple[weakref.ref, SparseLayer]] = {}
GROWTH_STEP = 1024  # tokens added beyond what is needed when a buffer must grow (plus doubling)


class FullPolicy(Protocol):
    """What a policy over every held token provides: the rule a decode step attends by and what it reads."""

    def attend(self, store: FullStore, q: torch.Tensor, scaling: float) -> torch.Tensor: ...

    def bytes_read(self, n: int, dim: int, itemsize: int, groups: int) -> int: ...


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

    def __init__(self, policy: BlockPolicy, heads: list[int]) -> None:
        super().__init__(policy, heads, block=policy.block_size)
        self.policy: BlockPolicy = policy
        self.scorer = policy.score
        self.selection = torch.empty(0)

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

    def __init__(self, policy: StreamingPolicy, heads: list[int]) -> None:
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
        positions = torch.arange(self.n, self.n + count)
        keep = (positions < sink) | (positions >= self.n + count - window)  # the rest would be overwritten anyway
        positions = positions[keep]
        slots = torch.where(positions < sink, positions, sink + (positions - sink) % window).to(keys.device)
        source = keep.nonzero().squeeze(1).to(keys.device)
        self.keys.index_copy_(2, slots, keys.index_select(2, source))
        self.values.index_copy_(2, slots, values.index_select(2, source))
        self.n += count

    def held_positions(self) -> torch.Tensor:
        """Token position in each held slot, (held,) long; for tests and inspection."""
        slots = torch.arange(self.held)
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


class SparseLayer(CacheLayerMixin):
    """One decoder layer's cache: a store per group of kv heads sharing a policy."""

    is_sliding = False
    is_croppable = False

    def __init__(self, policies: list[HeadPolicy]) -> None:
        super().__init__()
        self.kv_heads = len(policies)
        groups: dict[HeadPolicy, list[int]] = {}  # equal policies share one store and one batched kernel call
        for head, policy in enumerate(policies):
            groups.setdefault(policy, []).append(head)
        self.stores: list[Store] = [policy.store(heads) for policy, heads in groups.items()]
        self.index = [torch.tensor(s.heads) for s in self.stores]
        self.n = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.index = [i.to(self.device) for i in self.index]
        self.is_initialized = True

    def _split(self, states: torch.Tensor, i: int) -> torch.Tensor:
        return states if len(self.stores) == 1 else states.index_select(1, self.index[i])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[1] != self.kv_heads:
            raise AttnsparseError(f"the plan has {self.kv_heads} kv heads but the layer gives {key_states.shape[1]}")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[2]
        if count > 1 and self.n > 0:
            raise AttnsparseError(
                "sparse decoding appends one token per step after the prompt; several tokens into a filled cache "
                "(assisted or chunked decoding) is not supported"
            )
        for i, store in enumerate(self.stores):
            store.append(self._split(key_states, i), self._split(value_states, i))
        self.n += count
        if count == 1:
            PENDING[id(key_states)] = (weakref.ref(key_states), self)
        return key_states, value_states

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query (B, H, 1, D) -> output (B, 1, H, D) of this decode step, every store's kernel in turn."""
        batch, heads, _, dim = query.shape
        q = query.view(batch, self.kv_heads, heads // self.kv_heads, dim)
        if len(self.stores) == 1:
            out = self.stores[0].attend(q, scaling)
        else:
            out = torch.empty_like(q)
            for i, store in enumerate(self.stores):
                out.index_copy_(1, self.index[i], store.attend(q.index_select(1, self.index[i]), scaling))
        return out.reshape(batch, 1, heads, dim)

    def bytes_read(self, groups: int) -> int:
        return sum(store.bytes_read(groups) for store in self.stores)

    def held_bytes(self) -> int:
        """Bytes the layer's tensors occupy (allocated, including growth room and block summaries)."""
        return sum(t.numel() * t.element_size() for store in self.stores for t in store.tensors())

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n + query_length, 0

    def get_seq_length(self) -> int:
        return self.n

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        policies: list[HeadPolicy | None] = [None] * self.kv_heads
        for store in self.stores:
            for head in store.heads:
                policies[head] = store.policy
        self.__init__(policies)  # type: ignore[misc, arg-type]

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.n:
            for store in self.stores:
                store.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise AttnsparseError("a sparse decoding cache cannot be cropped (assisted decoding is not supported)")

    def offload(self) -> None:  # keys/values live in the stores; offloading is not supported
        return None

    def prefetch(self) -> None:
        return None


class SparseCache(Cache):
    """Cache for `model.generate(past_key_values=...)` under a `DecodePlan`; needs the attnsparse-decode backend."""

    def __init__(self, plan: DecodePlan, config: object | None = None, reserve: int = 0) -> None:
        self.sparse_layers = [SparseLayer(row) for row in plan.heads]
        super().__init__(layers=list(self.sparse_layers))
        self.plan = plan
        self._config = config
        self._reserve = reserve

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        config = self._config
        if config is not None and getattr(config, "_attn_implementation", DECODE_BACKEND) != DECODE_BACKEND:
            raise AttnsparseError(
                f"SparseCache needs the model's attention set to '{DECODE_BACKEND}' "
                "(use attnsparse.decode.backend.sparse_decoding or generate)"
            )
        layer = self.sparse_layers[layer_idx]
        if self._reserve and layer.n == 0:
            for store in layer.stores:
                if isinstance(store, FullStore):
                    store.reserve(key_states, self._reserve)
        return layer.update(key_states, value_states)

    def bytes_read_per_step(self) -> int:
        """Bytes the next decode step's attention reads, summed over layers (summaries + selected K and V)."""
        groups = self._groups()
        return sum(layer.bytes_read(groups) for layer in self.sparse_layers)

    def held_bytes(self) -> int:
        """Bytes held by all layers' KV tensors (allocated)."""
        return sum(layer.held_bytes() for layer in self.sparse_layers)

    def _groups(self) -> int:
        heads = ModelShape.of(self._config).heads if self._config is not None else None
        kv = self.plan.kv_heads
        return heads // kv if heads else 1
