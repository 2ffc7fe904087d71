"""Sparse decoding through `model.generate()`: the attention function for decode steps and the user-facing API.

```python
from attnsparse.decode.backend import generate
result = generate(model, input_ids, "block:16:0.0625", max_new_tokens=64)   # or a DecodePlan / plan JSON path
```

The model's attention is switched to "attnsparse-decode" inside `sparse_decoding`. For the prompt (several
tokens) that function delegates to the ordinary attnsparse backend (dense unless a backend state is attached);
for each decode step it finds the `SparseLayer` that has just stored the step's key (the layer registers the
exact tensor it returns from `update`) and runs the per-head kernels there. Decode steps need no attention mask:
padding (batched prompts of unequal length) is refused with a clear error.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from attnsparse.attention.backend import attnsparse_attention
from attnsparse.core.models import ModelShape
from attnsparse.decode.cache import DECODE_BACKEND, PENDING, SparseCache
from attnsparse.decode.plan import DecodePlan, resolve_plan
from attnsparse.errors import AttnsparseError


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry: sparse kernels for a SparseCache decode step, the attnsparse backend otherwise."""
    entry = PENDING.pop(id(key), None)
    if entry is None or entry[0]() is not key or query.shape[2] != 1:
        return attnsparse_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
            softcap=softcap, **kwargs,
        )
    if softcap is not None or kwargs.get("s_aux") is not None:
        raise AttnsparseError(f"{type(module).__name__} uses logit softcapping or sinks; sparse decoding does not")
    if attention_mask is not None and not _all_visible(attention_mask):
        raise AttnsparseError(
            "sparse decoding does not support padded batches; generate prompts of equal length (or one at a time)"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return entry[1].attend(query, scale).to(query.dtype), None


def _all_visible(mask: torch.Tensor) -> bool:
    if mask.dtype == torch.bool:
        return bool(mask.all())
    return bool((mask == 0).all())


def register_decode_backend() -> None:
    """Register the decode attention function and its mask builder (idempotent)."""
    AttentionInterface.register(DECODE_BACKEND, decode_attention)
    AttentionMaskInterface.register(DECODE_BACKEND, sdpa_mask)


def make_plan(model: PreTrainedModel, plan: str | Path | DecodePlan) -> DecodePlan:
    """`plan` resolved for this model's layers and kv heads."""
    shape = ModelShape.of(model)
    return resolve_plan(plan, shape.need("layers"), shape.need("kv_heads"), getattr(model.config, "_name_or_path", ""))


@contextmanager
def sparse_decoding(
    model: PreTrainedModel, plan: str | Path | DecodePlan, reserve: int = 0
) -> Iterator[SparseCache]:
    """Switch `model` to the decode backend and yield a fresh SparseCache; the implementation is restored after.

    `reserve` preallocates that many tokens per full-KV head (no growth copies while generating).
    """
    resolved = make_plan(model, plan)
    register_decode_backend()
    previous = str(model.config._attn_implementation)
    try:
        model.set_attn_implementation(DECODE_BACKEND)
    except (ValueError, NotImplementedError, AttributeError) as error:
        raise AttnsparseError(
            f"{type(model).__name__} cannot use a custom attention function ({str(error).splitlines()[0]})"
        ) from error
    try:
        yield SparseCache(resolved, model.config, reserve=reserve)
    finally:
        PENDING.clear()
        if previous != DECODE_BACKEND:
            model.set_attn_implementation(previous)


@dataclass
class GenerateResult:
    """Generated ids and what the cache did."""

    sequences: torch.Tensor  # (B, prompt + new)
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    kv_bytes_held: int
    attention_bytes_per_step: int
    plan_counts: dict[str, int] = field(default_factory=dict)
    logits: list[torch.Tensor] = field(default_factory=list)  # per step (B, V) when requested

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    plan: str | Path | DecodePlan = "dense",
    *,
    max_new_tokens: int = 32,
    keep_logits: bool = False,
    eos_token_id: int | None = None,
) -> GenerateResult:
    """Greedy generation with a sparse KV cache: a prefill forward, then one cached forward per new token.

    A hand-written loop rather than `model.generate` so prefill and decode are timed apart; `generate_hf` runs
    the same cache through `model.generate` for users who want sampling or stopping criteria.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise AttnsparseError("input ids must be (batch, tokens) with at least one token")
    if max_new_tokens < 1:
        raise AttnsparseError(f"max new tokens must be >= 1, got {max_new_tokens}")
    input_ids = input_ids.to(model.device)
    prompt = input_ids.shape[1]
    with sparse_decoding(model, plan, reserve=prompt + max_new_tokens) as cache:
        started = time.perf_counter()
        out = model(input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - started
        tokens = [input_ids]
        logits: list[torch.Tensor] = []
        started = time.perf_counter()
        for step in range(max_new_tokens):
            step_logits = out.logits[:, -1].float()
            if keep_logits:
                logits.append(step_logits.clone())
            nxt = step_logits.argmax(dim=-1, keepdim=True)
            tokens.append(nxt)
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool((nxt == eos_token_id).all())):
                break
            out = model(nxt, past_key_values=cache, use_cache=True)
        decode = time.perf_counter() - started
        sequences = torch.cat(tokens, dim=1)
        return GenerateResult(
            sequences, prompt, sequences.shape[1] - prompt, prefill, decode, cache.held_bytes(),
            cache.bytes_read_per_step(), cache.plan.counts(), logits,
        )


def generate_hf(
    model: PreTrainedModel, input_ids: torch.Tensor, plan: str | Path | DecodePlan = "dense", **generate_kwargs: Any
) -> Any:
    """`model.generate` with a SparseCache (any decoding strategy transformers offers except beams and assisted)."""
    max_new = int(generate_kwargs.get("max_new_tokens", 32))
    with sparse_decoding(model, plan, reserve=input_ids.shape[1] + max_new) as cache:
        return model.generate(input_ids, past_key_values=cache, use_cache=True, **generate_kwargs)  # type: ignore[operator]


# --- shared prompt, several policies: prefill once (dense for every plan), then decode each policy from a copy ---


@torch.inference_mode()
def prefill(model: PreTrainedModel, input_ids: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Dense prefill with the model's own attention: per-layer (keys, values) and the last position's logits (B, V).

    Every plan prefills densely, so this KV is what any SparseCache would hold before eviction; `cache_from_kv`
    turns it into a cache for one plan, and several policies can then decode from the same prompt.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids.to(model.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    kv = [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr]
    return kv, out.logits[:, -1].float()  # type: ignore[return-value]


def cache_from_kv(
    model: PreTrainedModel, kv: list[tuple[torch.Tensor, torch.Tensor]], plan: str | Path | DecodePlan,
    reserve: int = 0,
) -> SparseCache:
    """A SparseCache for `plan` holding a prefilled prompt (streaming heads evict at once)."""
    cache = SparseCache(make_plan(model, plan), None, reserve=reserve)
    for layer_idx, (keys, values) in enumerate(kv):
        cache.update(keys, values, layer_idx)
    cache._config = model.config
    return cache


@contextmanager
def decode_backend(model: PreTrainedModel) -> Iterator[None]:
    """The model's attention switched to the decode backend inside the block (dense caches still work there)."""
    register_decode_backend()
    previous = str(model.config._attn_implementation)
    model.set_attn_implementation(DECODE_BACKEND)
    try:
        yield
    finally:
        PENDING.clear()
        if previous != DECODE_BACKEND:
            model.set_attn_implementation(previous)


def decode_step(model: PreTrainedModel, cache: Any, token: torch.Tensor) -> torch.Tensor:
    """One cached forward of token (B, 1); returns float logits (B, V). Call inside `decode_backend`."""
    return model(token.to(model.device), past_key_values=cache, use_cache=True).logits[:, -1].float()
