"""The single attention function every attnsparse feature goes through.

It is registered with transformers' `AttentionInterface` as "attnsparse" (plus a boolean mask builder under the
same name) and switched on with `model.set_attn_implementation`. Per-model settings (policy, observers, chunk
size) live in a `BackendState` that `sparse_attention` attaches to the model's config for the duration of a
block; a model switched to "attnsparse" with no state attached computes plain dense attention.

Queries are processed in chunks so that memory stays O(chunk x keys) instead of O(queries x keys).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeGuard

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from attnsparse.attention.policies import DENSE, Policy, TopK, parse_policy
from attnsparse.errors import AttnsparseError

BACKEND_NAME = "attnsparse"
# Bytes of float32 score-sized buffers one query chunk may use (scores, probabilities, masks).
DEFAULT_CHUNK_BUDGET = 256 * 2**20
# Gathered top-k is used when the row has at least this many keys per kept key.
GATHER_MIN_RATIO = 32
# Queries per chunk at most: small chunks skip more causally invisible keys (measured fastest at ctx 1024).
MAX_QUERY_CHUNK = 128


@dataclass
class AttentionChunk:
    """What observers receive: one layer's dense attention rows for a chunk of queries (see docs/CONTRACTS.md)."""

    layer_idx: int
    probs: torch.Tensor  # (B, H, Qc, K) float32, dense softmax over visible keys, 0 elsewhere
    visible: torch.Tensor  # (B, 1, Qc, K) bool
    query_positions: torch.Tensor  # (Qc,) long, index of each query in the key axis
    kept: torch.Tensor | None  # (B, H, Qc, K) bool, keys the policy kept; None under dense
    num_key_value_groups: int
    query: torch.Tensor | None = None  # (B, H, Qc, D) the chunk's queries as the backend got them (after RoPE)
    key: torch.Tensor | None = None  # (B, Hkv, K, D) the layer's keys as the backend got them (all K, after RoPE)


Observer = Callable[[AttentionChunk], None]


@dataclass
class BackendState:
    """Settings the attention function reads for one model."""

    policy: Policy = DENSE
    observers: list[Observer] = field(default_factory=list)
    query_chunk: int | None = None
    fast_dense: bool = True  # dense with no observers delegates to torch SDPA (same result, faster)
    calls: int = 0  # attention calls served, used by the support probe

    def chunk_size(self, batch: int, heads: int, queries: int, keys: int) -> int:
        if self.query_chunk is not None:
            return max(1, min(self.query_chunk, queries))
        per_query = batch * heads * keys * 4 * 3
        return max(1, min(queries, MAX_QUERY_CHUNK, DEFAULT_CHUNK_BUDGET // max(per_query, 1)))


_STATES: dict[int, tuple[weakref.ref, BackendState]] = {}


def _state_for(module: torch.nn.Module) -> BackendState | None:
    config = getattr(module, "config", None)
    entry = _STATES.get(id(config))
    if entry is None or entry[0]() is not config:
        return None
    return entry[1]


def attnsparse_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry point: (B,H,Q,D) query, (B,Hkv,K,D) key/value -> ((B,Q,H,D) output, None)."""
    state = _state_for(module) or BackendState()
    state.calls += 1
    if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        raise AttnsparseError(
            f"{type(module).__name__} uses attention sinks or position bias, which attnsparse does not support; "
            "use a model whose attention is plain scaled dot-product"
        )
    if state.policy.is_dense and not state.observers and softcap is None and state.fast_dense:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        layer_idx = -1
    return chunked_attention(
        query, key, value, attention_mask,
        scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
        causal=bool(causal),
        softcap=softcap,
        dropout=dropout if module.training else 0.0,
        policy=state.policy,
        observers=state.observers,
        layer_idx=int(layer_idx),
        query_chunk=state.chunk_size(query.shape[0], query.shape[1], query.shape[2], key.shape[2]),
    ), None


def chunked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float,
    causal: bool = True,
    softcap: float | None = None,
    dropout: float = 0.0,
    policy: Policy = DENSE,
    observers: Sequence[Observer] = (),
    layer_idx: int = 0,
    query_chunk: int = 256,
) -> torch.Tensor:
    """Attention over query chunks with a key-selection policy; returns (B, Q, H, D) in the query's dtype.

    `attention_mask` is transformers' 4D mask: bool (True = attend) or additive float; None means causal with
    top-left alignment when Q > 1 (the SDPA convention transformers relies on) and no mask when Q == 1.
    """
    policy = policy.for_layer(layer_idx).prepare(query, key, scaling=scaling, layer_idx=layer_idx)
    if not observers and dropout == 0.0 and softcap is None:
        own = policy.attend(query, key, value, attention_mask, scaling=scaling, causal=causal)
        if own is not None:
            return own
    batch, heads, queries, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise AttnsparseError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    groups = heads // kv_heads
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    q = query.to(compute_dtype).reshape(batch, kv_heads, groups, queries, dim)
    k_t = key.to(compute_dtype).transpose(-1, -2)
    v = value.to(compute_dtype)
    key_index = torch.arange(keys, device=query.device)
    # plain causal self-attention (no mask tensor): row i of a chunk sees keys <= start + i, so nothing needs
    # to be searched for: the hidden columns start at start + 1 and every row sees at least one key
    plain_causal = attention_mask is None and causal and queries > 1 and queries == keys
    outputs = []
    for start in range(0, queries, query_chunk):
        stop = min(start + query_chunk, queries)
        chunk = stop - start
        visible, bias, positions = _chunk_mask(attention_mask, causal, start, stop, queries, keys, key_index)
        width = _needed_keys(visible, positions, causal, keys)
        visible = visible[..., :width]
        bias = None if bias is None else bias[..., :width]
        q_chunk = q[:, :, :, start:stop].reshape(batch, kv_heads, groups * chunk, dim)
        scores = (q_chunk @ k_t[..., :width]).mul_(scaling).view(batch, heads, chunk, width)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if bias is not None:
            scores = scores + bias
        _hide_invisible_(scores, visible, start + 1 if plain_causal else None)
        if not observers and dropout == 0.0 and _gather_pays(policy, width):
            out = _topk_gathered(scores, visible, v[:, :, :width], policy.k)
            if out is not None:
                outputs.append(out.transpose(1, 2))
                continue
        kept = None if policy.is_dense else policy.keep_mask(scores, visible, positions)
        need_dense = policy.is_dense or bool(observers)
        dense_probs = _softmax_visible(scores, None if plain_causal else visible) if need_dense else None
        if observers:
            record = AttentionChunk(layer_idx, dense_probs, visible, positions, kept, groups,  # type: ignore[arg-type]
                                    query[:, :, start:stop], key)
            for observer in observers:
                observer(record)
        probs = dense_probs if kept is None else _masked_softmax(scores, kept)
        if dropout > 0.0:
            probs = F.dropout(probs, p=dropout)
        out = probs.view(batch, kv_heads, groups * chunk, width) @ v[:, :, :width]
        outputs.append(out.view(batch, heads, chunk, dim).transpose(1, 2))
    return torch.cat(outputs, dim=1).to(query.dtype).contiguous()


def _chunk_mask(
    attention_mask: torch.Tensor | None,
    causal: bool,
    start: int,
    stop: int,
    queries: int,
    keys: int,
    key_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Visible keys (B|1, 1|H, Qc, K) bool, an optional additive bias, and the queries' key-axis positions."""
    if attention_mask is None:
        if causal and queries > 1:
            positions = torch.arange(start, stop, device=key_index.device)
            return (key_index[None, :] <= positions[:, None])[None, None], None, positions
        positions = torch.arange(start, stop, device=key_index.device) + (keys - queries)
        return torch.ones(1, 1, stop - start, keys, dtype=torch.bool, device=key_index.device), None, positions
    positions = torch.arange(start, stop, device=key_index.device) + (keys - queries)
    mask = attention_mask[:, :, start:stop, :keys]
    if mask.dtype == torch.bool:
        return mask, None, positions
    visible = mask > torch.finfo(mask.dtype).min / 2
    return visible, mask.to(torch.float32), positions


def _needed_keys(visible: torch.Tensor, positions: torch.Tensor, causal: bool, keys: int) -> int:
    """Keys past the chunk's last query are causally invisible: skip them (halves the work of a causal pass).

    With an explicit mask this is only done when the mask really hides every key past that point.
    """
    if not causal or positions.numel() == 0:
        return keys
    width = min(keys, int(positions[-1]) + 1)
    if width < keys and visible.shape[-1] == keys and bool(visible[..., width:].any()):
        return keys
    return max(width, 1)


def _masked_softmax(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over kept entries; rows with nothing kept (padding) become all zeros instead of NaN."""
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    if bool(keep.any(dim=-1).all()):
        return probs
    return torch.nan_to_num(probs, nan=0.0)


def _hide_invisible_(scores: torch.Tensor, visible: torch.Tensor, first: int | None = None) -> None:
    """Set invisible scores to -inf in place, touching only the columns from the first one any query cannot see
    (under a causal mask, the chunk's diagonal block instead of the whole row). `first`: that column, if known."""
    if first is None:
        columns = (~visible).reshape(-1, visible.shape[-1]).any(0).nonzero()
        first = int(columns[0]) if columns.numel() else visible.shape[-1]
    if first < visible.shape[-1]:
        scores[..., first:].masked_fill_(~visible[..., first:], float("-inf"))


def _softmax_visible(scores: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """Softmax of scores whose invisible entries are already -inf; rows that see nothing become zeros.
    `visible` None: every row is known to see a key."""
    probs = torch.softmax(scores, dim=-1)
    if visible is None or bool(visible.any(dim=-1).all()):
        return probs
    return torch.nan_to_num(probs, nan=0.0)


def _gather_pays(policy: Policy, width: int) -> TypeGuard[TopK]:
    """Top-k from gathered keys beats a masked softmax over the whole row when k is a small share of it."""
    return isinstance(policy, TopK) and policy.k * GATHER_MIN_RATIO <= width


def _topk_gathered(scores: torch.Tensor, visible: torch.Tensor, value: torch.Tensor, k: int) -> torch.Tensor | None:
    """Exact top-k attention computed from the k selected keys only: (B, H, Qc, D), or None on a tie.

    The selection equals `topk_keep_mask` unless the k-th and (k+1)-th scores of a row are equal; then the
    tie rule (earlier key wins) decides, so the caller falls back to the mask path. Differentiable.
    """
    batch, heads, chunk, width = scores.shape
    kv_heads, dim = value.shape[1], value.shape[-1]
    top, index = scores.topk(min(k + 1, width), dim=-1)  # invisible scores are already -inf
    if top.shape[-1] > k:
        boundary = top[..., k - 1]
        if bool(((top[..., k] == boundary) & torch.isfinite(boundary)).any()):
            return None
        top, index = top[..., :k], index[..., :k]
    probs = torch.softmax(top, dim=-1)
    if not bool(visible.any(dim=-1).all()):
        probs = torch.nan_to_num(probs, nan=0.0)
    flat = index.reshape(batch, kv_heads, -1, 1).expand(-1, -1, -1, dim)
    picked = value.gather(2, flat).view(batch, heads, chunk, -1, dim)
    return (probs.unsqueeze(-1) * picked).sum(dim=-2)


def register_backend() -> None:
    """Register the attention function and its boolean mask builder under the name "attnsparse" (idempotent)."""
    AttentionInterface.register(BACKEND_NAME, attnsparse_attention)
    AttentionMaskInterface.register(BACKEND_NAME, sdpa_mask)


def _configs(model: PreTrainedModel) -> list[object]:
    """The model's config and any sub-configs its attention modules hold (all share settings)."""
    seen: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            seen.setdefault(id(config), config)
    return list(seen.values())


def attach(model: PreTrainedModel, state: BackendState) -> BackendState | None:
    """Attach `state` to the model's configs; returns the state that was attached before, if any."""
    previous = None
    for config in _configs(model):
        entry = _STATES.get(id(config))
        if entry is not None and entry[0]() is config:
            previous = previous or entry[1]
        _bind(config, state)
    return previous


def _bind(config: object, state: BackendState) -> None:
    """Map the config to the state; the entry disappears when the config is garbage-collected."""
    key = id(config)
    _STATES[key] = (weakref.ref(config, lambda _ref: _STATES.pop(key, None)), state)


def detach(model: PreTrainedModel, restore: BackendState | None = None) -> None:
    """Remove the model's state, or put `restore` back."""
    for config in _configs(model):
        if restore is None:
            _STATES.pop(id(config), None)
        else:
            _bind(config, restore)


@contextmanager
def attention_implementation(model: PreTrainedModel, name: str) -> Iterator[None]:
    """The model's attention switched to the registered implementation `name` inside the block, restored after.

    `sparse_attention` switches through it; so can any other registered function (the decode backend's). One-line
    error where the architecture refuses a custom function.
    """
    previous = str(model.config._attn_implementation)
    try:
        model.set_attn_implementation(name)
    except (ValueError, NotImplementedError, AttributeError) as error:
        raise AttnsparseError(
            f"{type(model).__name__} cannot switch to a custom attention function ({str(error).splitlines()[0]}); "
            "attnsparse needs a model whose attention goes through transformers' AttentionInterface"
        ) from error
    try:
        yield
    finally:
        if previous != name:
            model.set_attn_implementation(previous)


@contextmanager
def sparse_attention(
    model: PreTrainedModel,
    policy: str | Policy = DENSE,
    observers: Sequence[Observer] = (),
    query_chunk: int | None = None,
    fast_dense: bool = True,
) -> Iterator[BackendState]:
    """Run `model` with the attnsparse backend, a policy and observers inside the block; restore it afterwards.

    Measure, evaluate and condense all come here. A policy given as a spec string is parsed here, once; the
    yielded state may be changed in the block (sparse-aware training sets its policy per step).
    """
    if query_chunk is not None and query_chunk < 1:
        raise AttnsparseError(f"query chunk {query_chunk} must be >= 1")
    state = BackendState(parse_policy(policy), list(observers), query_chunk, fast_dense)
    register_backend()
    with attention_implementation(model, BACKEND_NAME):
        previous_state = attach(model, state)
        try:
            yield state
        finally:
            detach(model, previous_state)

register_backend()
