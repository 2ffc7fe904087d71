"""Perplexity under decode plans: what a plan costs in quality when it is used the way it is meant, token by token.

Decode plans (block top-k, streaming heads, per-head mixes) act on the KV cache while generating, so their
quality is measured by decoding: each window's first ctx - N tokens are prefilled densely once, then every plan
decodes the last N tokens teacher-forced from its own SparseCache, and the NLL of those N true tokens gives the
perplexity. "dense" decodes the same way (with full KV), so ratios compare like with like.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from attnsparse.decode.backend import decode_backend, make_plan
from attnsparse.decode.generate import cache_from_kv, decode_step, prefill
from attnsparse.decode.plan import DecodePlan
from attnsparse.errors import AttnsparseError
from attnsparse.evaluate.perplexity import PerplexityResult


def plan_label(plan: str | Path | DecodePlan) -> str:
    """How a plan is named in results: `plan:<spec>` or `plan:<file name>`."""
    if isinstance(plan, DecodePlan):
        return "plan:custom"
    text = str(plan)
    return f"plan:{Path(text).name}" if text.endswith(".json") or Path(text).is_file() else f"plan:{text}"


@torch.inference_mode()
def decode_perplexity(
    model: PreTrainedModel,
    windows: torch.Tensor,
    plans: list[str | Path | DecodePlan],
    new_tokens: int,
    *,
    progress: bool = True,
) -> list[PerplexityResult]:
    """Decode the last `new_tokens` of every (M, ctx) window under each plan (plus dense, first); NLL per plan.

    Each result's `density` is the plan's share of dense KV bytes read per decode step.
    """
    count, ctx = windows.shape
    if not 1 <= new_tokens < ctx:
        raise AttnsparseError(f"decode tokens {new_tokens} must be between 1 and ctx - 1 = {ctx - 1}")
    resolved = {"plan:dense": make_plan(model, "dense")}
    for plan in plans:
        label = plan_label(plan)
        if isinstance(plan, DecodePlan):  # plan objects have no name: each is its own row, `plan:custom`, `-2`, ...
            taken = sum(1 for name in resolved if name == label or name.startswith(label + "-"))
            label = label if not taken else f"{label}-{taken + 1}"
        resolved.setdefault(label, make_plan(model, plan))
    nll = dict.fromkeys(resolved, 0.0)
    read = dict.fromkeys(resolved, 0.0)
    prompt = ctx - new_tokens
    for index in tqdm(range(count), desc="decode ppl", disable=not progress, leave=False):
        window = windows[index : index + 1].to(model.device)
        kv, first_logits = prefill(model, window[:, :prompt])
        targets = window[0, prompt:]
        with decode_backend(model):
            for label, plan in resolved.items():
                cache = cache_from_kv(model, kv, plan, reserve=ctx)
                logits = [first_logits[0]]
                for step in range(new_tokens - 1):
                    if step == new_tokens // 2:  # the read share halfway through the decoded span
                        read[label] += cache.bytes_read_per_step()
                    logits.append(decode_step(model, cache, window[:, prompt + step : prompt + step + 1])[0])
                if new_tokens == 1:
                    read[label] += cache.bytes_read_per_step()
                nll[label] += float(F.cross_entropy(torch.stack(logits), targets, reduction="sum"))
    dense_read = max(read["plan:dense"], 1.0)
    return [
        PerplexityResult(label, nll[label], count * new_tokens, count, ctx, read[label] / dense_read)
        for label in resolved
    ]
