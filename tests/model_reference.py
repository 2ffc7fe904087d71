"""Model-level references for tests: sharpened tiny models, a float64 twin, brute-force attention with explicit
kept-key rules, and next-token NLL computed by hand.

Random tiny models attend almost uniformly, so a logit comparison on them says little about attention. A
sharpened model (q/k projections scaled) has peaked rows: there, dropping keys or mis-scaling scores moves the
logits far beyond float32 rounding, and tests assert that sensitivity before trusting a tolerance.

`reference_attention(model, rule)` switches a model (usually the float64 twin) to a brute-force attention
function: the full score matrix, causal visibility, then `rule(layer, q, k, positions, visible)` narrows the
visible keys to the kept ones, then softmax and the weighted sum. Everything here is written from the
definitions in docs/, independently of the code under test.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from attnsparse.core.tiny import tiny_llama
from tests import reference

REFERENCE_NAME = "attnsparse-test-reference"
# rule(layer, q (B,H,Q,D) float64, k (B,Hkv,K,D) float64, query positions (Q,), visible (B,H,Q,K)) -> kept bool
KeepRule = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_ACTIVE: list[tuple[KeepRule | None, float]] = []


def sharpen(model: PreTrainedModel, factor: float) -> PreTrainedModel:
    """Scale every layer's q and k projection weights by `factor` (scores by factor²), in place."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return model


def sharpened_llama(seed: int = 0, factor: float = 20.0, **kwargs: object) -> PreTrainedModel:
    """A tiny GQA Llama whose attention rows are peaked (mean top-1 mass ~0.6 at factor 20)."""
    return sharpen(tiny_llama(seed=seed, **kwargs), factor)  # type: ignore[arg-type]


def float64_twin(model: PreTrainedModel) -> PreTrainedModel:
    """A float64 copy of the model with the same weights (its rounding error is ~1e-16, not ~1e-7)."""
    twin = copy.deepcopy(model).double()
    twin.set_attn_implementation("sdpa")
    return twin


def logit_scale(logits: torch.Tensor) -> float:
    """The scale tolerances are taken relative to."""
    return float(logits.abs().max())


def _brute_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    rule, score_factor = _ACTIVE[-1]
    batch, heads, queries, dim = query.shape
    keys = key.shape[2]
    q, k = query.double(), key.double()
    scale = (scaling if scaling is not None else dim**-0.5) * score_factor
    positions = torch.arange(queries) + keys - queries
    visible = (torch.arange(keys)[None, :] <= positions[:, None]).expand(batch, heads, queries, keys).clone()
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :keys]
        visible &= mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    kept = visible if rule is None else rule(int(module.layer_idx), q, k, positions, visible) & visible
    out = reference.attention(q, k, value.double(), scale, kept)
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


@contextmanager
def reference_attention(model: PreTrainedModel, rule: KeepRule | None = None,
                        score_factor: float = 1.0) -> Iterator[None]:
    """Run `model` with brute-force attention keeping `rule`'s keys (None: every visible key) inside the block.

    `score_factor` multiplies the scores (a deliberately wrong scaling, to show a test's sensitivity)."""
    AttentionInterface.register(REFERENCE_NAME, _brute_attention)
    AttentionMaskInterface.register(REFERENCE_NAME, sdpa_mask)
    previous = str(model.config._attn_implementation)
    model.set_attn_implementation(REFERENCE_NAME)
    _ACTIVE.append((rule, score_factor))
    try:
        yield
    finally:
        _ACTIVE.pop()
        model.set_attn_implementation(previous)


def reference_logits(model: PreTrainedModel, ids: torch.Tensor, rule: KeepRule | None = None,
                     score_factor: float = 1.0) -> torch.Tensor:
    """Logits of `model` under brute-force attention with `rule`, float64 when the model is."""
    with torch.no_grad(), reference_attention(model, rule, score_factor):
        return model(ids).logits


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Sum over positions t of -log softmax(logits[t])[ids[t + 1]], in float64, and how many tokens that is.

    Written out (logsumexp minus the target's logit) instead of through cross_entropy."""
    scored = logits[:, :-1].double()
    targets = ids[:, 1:]
    target_logits = scored.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    nll = torch.logsumexp(scored, dim=-1) - target_logits
    return float(nll.sum()), int(targets.numel())


# ---- kept-key rules --------------------------------------------------------------------------------------


class Separation:
    """Smallest relative gap seen between the last kept and the first dropped score of any selection.

    Reference and code under test compute scores in different precisions; a selection is only comparable when
    this gap is far above float32 rounding, and tests assert that it is."""

    def __init__(self) -> None:
        self.smallest = math.inf

    def record(self, scores: torch.Tensor, chosen: int) -> None:
        """scores (..., N) float64; the `chosen` largest are kept."""
        if chosen >= scores.shape[-1] or chosen < 1:
            return
        ordered = scores.sort(dim=-1, descending=True).values
        scale = ordered.abs().amax(dim=-1).clamp_min(1e-30)
        gap = (ordered[..., chosen - 1] - ordered[..., chosen]) / scale
        self.smallest = min(self.smallest, float(gap.min()))


def topk_rule(k: int, separation: Separation | None = None) -> KeepRule:
    """Every row keeps its k largest visible scores (each query head on its own)."""

    def rule(layer: int, q: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
             visible: torch.Tensor) -> torch.Tensor:
        groups = q.shape[1] // key.shape[1]
        scores = (q @ key.repeat_interleave(groups, dim=1).transpose(-1, -2)).masked_fill(~visible, float("-inf"))
        kept = torch.zeros_like(visible)
        for i in range(scores.shape[2]):
            row = scores[:, :, i, : int(positions[i]) + 1]
            if separation is not None:
                separation.record(row, k)
            chosen = row.topk(min(k, row.shape[-1]), dim=-1).indices
            kept[:, :, i].scatter_(-1, chosen, True)
        return kept

    return rule


def decode_rule(plan: object, prompt: int, separation: Separation | None = None) -> KeepRule:
    """Keys a decode plan keeps: the prompt rows (positions < prompt) are dense, as prefill is; every later row
    is one decode step and keeps, per (layer, kv head), what that head's policy reads at context n = t + 1."""

    def rule(layer: int, q: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
             visible: torch.Tensor) -> torch.Tensor:
        kept = visible.clone()
        kv_heads = key.shape[1]
        groups = q.shape[1] // kv_heads
        for i, position in enumerate(positions.tolist()):
            if position < prompt:
                continue
            n = position + 1
            for kv in range(kv_heads):
                heads = slice(kv * groups, (kv + 1) * groups)
                policy = plan.heads[layer][kv]  # type: ignore[attr-defined]
                row = torch.zeros_like(kept[:, heads, i])
                row[..., :n] = head_keeps(policy, q[:, heads, i], key[:, kv, :n], separation)
                kept[:, heads, i] = row
        return kept

    return rule


def head_keeps(policy: object, q: torch.Tensor, keys: torch.Tensor,
               separation: Separation | None = None) -> torch.Tensor:
    """Kept keys (B, G, n) of one kv head's decode policy for its G query heads q (B, G, D) over keys (B, n, D)."""
    batch, groups, _ = q.shape
    n = keys.shape[1]
    kind = policy.kind  # type: ignore[attr-defined]
    index = torch.arange(n)
    if kind == "dense":
        return torch.ones(batch, groups, n, dtype=torch.bool)
    if kind == "streaming":
        keep = (index < policy.sink) | (index > n - 1 - policy.window)  # type: ignore[attr-defined]
        return keep.expand(batch, groups, n).clone()
    if kind == "topk":
        scores = q @ keys.transpose(-1, -2)
        k = min(policy.k, n)  # type: ignore[attr-defined]
        if separation is not None:
            separation.record(scores, k)
        return torch.zeros(batch, groups, n, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)
    blocks = _selected_blocks(policy, q, keys, separation)  # (B, total) bool
    size = policy.block_size  # type: ignore[attr-defined]
    return blocks.repeat_interleave(size, dim=-1)[:, None, :n].expand(batch, groups, n).clone()


def _selected_blocks(policy: object, q: torch.Tensor, keys: torch.Tensor,
                     separation: Separation | None) -> torch.Tensor:
    """Block top-k as docs/decode.md defines it: sink and recent blocks always, then the best-scoring blocks
    until ceil(budget / B) blocks (at least sink + recent, at most all) are read."""
    p = policy
    batch, n = keys.shape[0], keys.shape[1]
    size = p.block_size  # type: ignore[attr-defined]
    total = -(-n // size)
    tokens = p.budget if p.budget else math.ceil(p.density * n)  # type: ignore[attr-defined]
    count = min(total, max(-(-tokens // size), p.sink_blocks + p.recent_blocks))  # type: ignore[attr-defined]
    padded = torch.zeros(batch, total * size, keys.shape[2], dtype=keys.dtype)
    padded[:, :n] = keys
    present = (torch.arange(total * size) < n).view(total, size)
    blocks = padded.view(batch, total, size, -1)
    score = p.score.name  # type: ignore[attr-defined]  # the block scorer (attnsparse.decode.scorers)
    if score == "mean":
        values = (blocks.sum(dim=2) @ q.transpose(-1, -2)).amax(dim=-1)  # q . key sum, max over the group
    elif score == "bound":
        big = blocks.masked_fill(~present[None, :, :, None], float("-inf")).amax(dim=2)
        small = blocks.masked_fill(~present[None, :, :, None], float("inf")).amin(dim=2)
        products = torch.maximum(q[:, None] * big[:, :, None], q[:, None] * small[:, :, None])  # (B, NB, G, D)
        values = products.sum(dim=-1).amax(dim=-1)
    else:  # channels: the R channels where the group's |q| is largest, keys rounded to float16 as stored
        channels = min(p.score.channels, q.shape[-1])  # type: ignore[attr-defined]
        weight = q.abs().sum(dim=1)  # (B, D)
        if separation is not None:
            separation.record(weight, channels)
        chosen = weight.topk(channels, dim=-1).indices
        mask = torch.zeros_like(weight).scatter_(-1, chosen, 1.0)
        rounded = blocks.half().double()
        per_key = torch.einsum("bgd,bksd->bksg", q * mask[:, None], rounded).amax(dim=-1)  # (B, NB, S)
        values = per_key.masked_fill(~present[None], float("-inf")).amax(dim=-1)
    selected = torch.zeros(batch, total, dtype=torch.bool)
    forced = torch.zeros(total, dtype=torch.bool)
    forced[: min(p.sink_blocks, total)] = True  # type: ignore[attr-defined]
    forced[max(total - p.recent_blocks, 0):] = True  # type: ignore[attr-defined]
    if count >= total:
        return torch.ones(batch, total, dtype=torch.bool)
    free = count - int(forced.sum())
    others = values.masked_fill(forced[None], float("-inf"))
    candidates = others[:, ~forced]
    if separation is not None:
        separation.record(candidates, free)
    selected[:, forced] = True
    if free > 0:
        selected.scatter_(-1, others.topk(free, dim=-1).indices, True)
    return selected
