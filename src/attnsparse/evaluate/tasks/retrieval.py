"""Retrieval scores per head (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality").

While the model writes an answer it copies from a needle, a head *retrieves* at a step when the key it attends to
most is a token inside a needle span and that token is the one the step generates. A head's score on one sample
is (steps at which it retrieves) / (needle tokens); the definition, with its edge cases, is in docs/tasks.md.

Measured through an attention-backend observer on a dense decode from the prompt's dense prefill, so it needs
nothing model-specific: any model whose attention goes through attnsparse works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from attnsparse.attention.backend import AttentionChunk, sparse_attention
from attnsparse.core.models import ModelShape
from attnsparse.evaluate.tasks.base import Sample

KV = list[tuple[torch.Tensor, torch.Tensor]]


class TopKeyObserver:
    """Backend observer: for every layer, each query head's most-attended key of the last query row."""

    def __init__(self) -> None:
        self.top: dict[int, torch.Tensor] = {}

    def __call__(self, chunk: AttentionChunk) -> None:
        # argmax returns the first of equal maxima: ties go to the earliest key
        self.top[chunk.layer_idx] = chunk.probs[0, :, -1].detach().argmax(dim=-1)


@torch.inference_mode()
def sample_retrieval_scores(model: PreTrainedModel, kv: KV, sample: Sample, eos: int | None = None) -> torch.Tensor:
    """(layers, heads) retrieval scores of one sample: greedy dense decoding of its answer from the prefilled KV.

    The prompt's last token is fed again as the first decode step (the KV holds the rest), so the attention that
    chooses the first answer token is observed as well.
    """
    shape = ModelShape.of(model)
    layers, heads = shape.need("layers"), shape.need("heads")
    denominator = sum(needle.length for needle in sample.needles)
    if denominator == 0:
        return torch.zeros(layers, heads)
    device = model.device  # the hits are counted where the attention is: one copy to the host per sample
    hits = torch.zeros(layers, heads, device=device)
    in_needle = torch.zeros(sample.ids.numel() + sample.answer_tokens, dtype=torch.bool, device=device)
    for needle in sample.needles:
        for start, stop in needle.spans:
            in_needle[start:stop] = True
    sequence = torch.cat([sample.ids.to(device), torch.zeros(sample.answer_tokens, dtype=torch.long, device=device)])
    cache = DynamicCache(config=model.config)
    for layer, (keys, values) in enumerate(kv):
        cache.update(keys[:, :, :-1], values[:, :, :-1], layer)
    observer = TopKeyObserver()
    token = sample.ids[-1:].view(1, 1).to(model.device)
    position = sample.ids.numel()
    with sparse_attention(model, "dense", observers=[observer]):
        for _ in range(sample.answer_tokens):
            logits = model(token, past_key_values=cache, use_cache=True).logits[0, -1]
            generated = int(logits.argmax())
            for layer, top in observer.top.items():
                hits[layer] += (in_needle[top] & (sequence[top] == generated)).float()
            sequence[position] = generated
            position += 1
            if generated == eos:
                break
            token = torch.tensor([[generated]], device=model.device)
    return (hits / denominator).cpu()


@dataclass
class RetrievalScores:
    """Retrieval scores summed over samples, per task; means per (layer, head)."""

    layers: int
    heads: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)

    def add(self, task: str, scores: torch.Tensor) -> None:
        self.sums[task] = self.sums.get(task, torch.zeros(self.layers, self.heads)) + scores
        self.samples[task] = self.samples.get(task, 0) + 1

    def mean(self, task: str | None = None) -> torch.Tensor:
        """(layers, heads) mean score over the samples of `task` (None: over every sample of every task)."""
        tasks = [task] if task is not None else list(self.sums)
        total = sum((self.sums[t] for t in tasks), torch.zeros(self.layers, self.heads))
        count = sum(self.samples[t] for t in tasks)
        return total / max(count, 1)

    def to_json(self, threshold: float = 0.1) -> dict[str, Any]:
        overall = self.mean()
        return {
            "definition": "docs/tasks.md#retrieval-scores", "layers": self.layers, "heads": self.heads,
            "samples": dict(self.samples), "threshold": threshold,
            "heads_above_threshold": int((overall > threshold).sum()),
            "per_head": [{"layer": layer, "head": head, "retrieval_score": round(float(overall[layer, head]), 6)}
                         for layer in range(self.layers) for head in range(self.heads)],
            "per_task": {task: [[round(float(x), 6) for x in row] for row in self.mean(task)] for task in self.sums},
        }
