"""A transformers `Cache` whose layers keep per-kv-head storage for sparse decoding.

Each layer splits its kv heads into groups of equal policy (usually one or two groups), one store each
(`decode.stores`), made by the policy. `update()` stores the new states. For a prompt (several tokens into an empty
layer) it returns them unchanged, so prefill is ordinary dense attention. For a decode step (one token) it returns
the new token only and marks the layer pending; the attention function registered by `attnsparse.decode.backend`
picks it up and calls `attend()`, which runs each group's kernel. Several tokens into a non-empty layer (assisted
decoding, chunked prefill) are refused.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from attnsparse.core.models import ModelShape
from attnsparse.decode.stores import BlockStore, FullStore, Store
from attnsparse.errors import AttnsparseError

if TYPE_CHECKING:
    from attnsparse.decode.plan import DecodePlan
    from attnsparse.decode.policies import HeadPolicy

DECODE_BACKEND = "attnsparse-decode"
# id(key tensor returned by update) -> (weak ref to that tensor, layer); consumed by the attention function.
PENDING: dict[int, tuple[weakref.ref, SparseLayer]] = {}


class SparseLayer(CacheLayerMixin):
    """One decoder layer's cache: a store per group of kv heads sharing a policy."""

    is_sliding = False
    is_croppable = False

    def __init__(self, policies: list[HeadPolicy], layer: int = 0) -> None:
        super().__init__()
        self.layer = layer
        self.kv_heads = len(policies)
        groups: dict[HeadPolicy, list[int]] = {}  # equal policies share one store and one batched kernel call
        for head, policy in enumerate(policies):
            groups.setdefault(policy, []).append(head)
        self.stores: list[Store] = [policy.store(heads) for policy, heads in groups.items()]
        for store in self.stores:
            if isinstance(store, BlockStore):
                store.bind(layer)
        self.index: list[torch.Tensor] = []  # each store's kv heads, made on the states' device at the first update
        self.n = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.index = [torch.tensor(s.heads, device=self.device) for s in self.stores]
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
        self.__init__(policies, self.layer)  # type: ignore[misc, arg-type]

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
        self.sparse_layers = [SparseLayer(row, layer) for layer, row in enumerate(plan.heads)]
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
