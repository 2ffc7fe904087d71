"""The decode attention function and switching a model to it (`sparse_decoding`, `decode_backend`).

The model's attention is switched to "attnsparse-decode" inside `sparse_decoding`. For the prompt (several
tokens) that function delegates to the ordinary attnsparse backend (dense unless a backend state is attached);
for each decode step it finds the `SparseLayer` that has just stored the step's key (the layer registers the
exact tensor it returns from `update`) and runs the per-head kernels there. Decode steps need no attention mask:
padding (batched prompts of unequal length) is refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from attnsparse.attention.backend import attention_implementation, attnsparse_attention
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
    with decode_backend(model):
        yield SparseCache(resolved, model.config, reserve=reserve)


@contextmanager
def decode_backend(model: PreTrainedModel) -> Iterator[None]:
    """The model's attention switched to the decode backend inside the block (dense caches still work there)."""
    register_decode_backend()
    with attention_implementation(model, DECODE_BACKEND):
        try:
            yield
        finally:
            PENDING.clear()
