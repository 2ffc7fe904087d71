"""Perplexity of a causal LM over token windows under an attention policy, and the one perplexity record."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from attnsparse.attention.backend import sparse_attention
from attnsparse.attention.policies import DENSE, Policy


@dataclass
class PerplexityResult:
    """One policy's NLL over every window: what prefill (`perplexity`) and decode (`decode.eval`) both return.

    `policy` is the policy spec, or `plan:<spec or file>` for a decode plan; `density` is the share of causal
    pairs the policy keeps, or for a decode plan the share of dense KV bytes it reads per decode step.
    """

    policy: str
    nll_sum: float
    tokens: int
    windows: int
    ctx: int
    density: float

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


@torch.inference_mode()
def perplexity(
    model: PreTrainedModel,
    windows: torch.Tensor,
    policy: Policy = DENSE,
    *,
    batch_size: int = 1,
    query_chunk: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """exp(mean next-token NLL) over every window; each window of n tokens scores its last n - 1 tokens.

    `policy` is already parsed (`attnsparse.attention.policies.parse_policy`): specs are parsed once, at the edge.
    """
    count, ctx = windows.shape
    nll_sum = torch.zeros((), dtype=torch.float64, device=model.device)  # summed on the device, read once
    with sparse_attention(model, policy, query_chunk=query_chunk):
        for start in tqdm(range(0, count, batch_size), desc=f"ppl {policy.spec}", disable=not progress, leave=False):
            batch = windows[start : start + batch_size].to(model.device)
            logits = model(batch).logits[:, :-1].float()
            nll_sum += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
    return PerplexityResult(policy.spec, float(nll_sum), count * (ctx - 1), count, ctx, policy.density(ctx))
