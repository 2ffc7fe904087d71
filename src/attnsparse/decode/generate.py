"""Generation with a sparse KV cache: a greedy loop timed per phase, `model.generate`, and decoding several plans
from one dense prefill.

```python
from attnsparse.decode.generate import generate
result = generate(model, input_ids, "block:16:0.0625", max_new_tokens=64)   # or a DecodePlan / plan JSON path
```
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from attnsparse.decode.backend import make_plan, sparse_decoding
from attnsparse.decode.cache import SparseCache
from attnsparse.decode.plan import DecodePlan
from attnsparse.errors import AttnsparseError


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


# shared prompt, several policies: prefill once (dense for every plan), then decode each policy from its own cache


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


def decode_step(model: PreTrainedModel, cache: Any, token: torch.Tensor) -> torch.Tensor:
    """One cached forward of token (B, 1); returns float logits (B, V). Call inside `decode_backend`."""
    return model(token.to(model.device), past_key_values=cache, use_cache=True).logits[:, -1].float()
