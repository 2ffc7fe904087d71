"""Training windows sampled from the original model itself: text of no corpus's domain but the model's own.

Distilling on one corpus teaches the student the teacher's behaviour on that corpus: after sparse-aware
distillation on WikiText-2 valid, top-8 costs x1.059 of the original's dense perplexity on WikiText-2 test but
x1.203 on another domain (docs/condense.md). Windows sampled from the teacher (ancestral sampling at temperature 1
from the start token, nothing truncated, so the windows follow the teacher's own distribution) carry no corpus's
domain; matching the teacher on them is data-free distillation in the manner of LLM-QAT (Liu et al. 2023).
Each batch is seeded on its own and cached in the run directory, so an interrupted run resumes without sampling
again and a larger count reuses the batches already drawn.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import torch

from attnsparse.core.runs import atomic_write_bytes
from attnsparse.errors import AttnsparseError


def start_token(tokenizer: object) -> int:
    """The token every sampled window starts from: BOS, else EOS (a document boundary either way)."""
    for name in ("bos_token_id", "eos_token_id"):
        token = getattr(tokenizer, name, None)
        if isinstance(token, int):
            return token
    raise AttnsparseError("--sampled needs a tokenizer with a BOS or EOS token to start each sampled window from")


@torch.no_grad()
def sample_windows(model: torch.nn.Module, start: int, count: int, length: int, generator: torch.Generator,
                   temperature: float = 1.0) -> torch.Tensor:
    """`count` windows of `length` tokens, each `start` followed by tokens drawn from the model one at a time."""
    device = next(model.parameters()).device
    tokens = torch.full((count, length), start, dtype=torch.long)
    was_training = model.training
    model.eval()
    past, step_input = None, tokens[:, :1].to(device)
    for position in range(1, length):
        out = model(input_ids=step_input, cache=past, use_cache=True)
        past = out.cache
        probs = torch.softmax(out.logits[:, -1].float().cpu() / temperature, dim=-1)
        tokens[:, position] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        step_input = tokens[:, position:position + 1].to(device)
    model.train(was_training)
    return tokens


def cached_sampled_windows(model: torch.nn.Module, tokenizer: object, count: int, length: int, seed: int,
                           cache: Path, batch_size: int = 32,
                           echo: Callable[[str], None] | None = None) -> torch.Tensor:
    """`count` sampled windows; batch b is seeded with (seed, b) and read from `cache` when already drawn."""
    if count == 0:
        return torch.empty((0, length), dtype=torch.long)
    start = start_token(tokenizer)
    cache.mkdir(parents=True, exist_ok=True)
    batches, began, drawn = [], time.perf_counter(), 0
    for index in range((count + batch_size - 1) // batch_size):
        size = min(batch_size, count - index * batch_size)
        path = cache / f"seed{seed}-len{length}-batch{index:04d}-of{batch_size}.pt"
        if path.is_file():
            batch = torch.load(path, weights_only=True)
        else:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            batch = sample_windows(model, start, batch_size, length, generator)
            buffer = io.BytesIO()
            torch.save(batch, buffer)
            atomic_write_bytes(path, buffer.getvalue())
            drawn += batch_size
        batches.append(batch[:size])
    if echo is not None and drawn:
        echo(f"sampled {drawn} windows of {length} tokens from the original in {time.perf_counter() - began:.0f} s")
    return torch.cat(batches)
