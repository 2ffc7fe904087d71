"""Brute-force references every test shares: attention from its definition, top-k keep sets, and the row metrics.

Written from the definitions in docs/ (python loops and plain tensor algebra), independently of the code under
test, so a test compares the library against something obviously right rather than against itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


# ---- attention ---------------------------------------------------------------------------------------------
def scores(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """q kᵀ · scaling: q (B, H, Q, D), k (B, Hkv, K, D) with H a multiple of Hkv (each kv head serves H/Hkv)."""
    return (q @ k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).transpose(-1, -2)) * scaling


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
              keep: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scaling) v over the kept keys, (B, H, Q, D); `keep` is bool, broadcastable to (B, H, Q, K)
    (None: every key). `softcap` c maps scores to c·tanh(s / c) first (Gemma 2). A row keeping no key gives zeros."""
    s = scores(q, k, scaling)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return probs @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)


def topk_keep(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Row by row: order the visible keys by (score descending, index ascending) and keep the first k."""
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    flat_scores, flat_visible = scores.reshape(-1, scores.shape[-1]), visible.expand_as(scores).reshape(-1, scores.shape[-1])
    flat_keep = keep.view(-1, scores.shape[-1])
    for row in range(flat_scores.shape[0]):
        order = sorted((j for j in range(flat_scores.shape[1]) if flat_visible[row, j]),
                       key=lambda j: (-flat_scores[row, j].item(), j))
        flat_keep[row, order[:k]] = True
    return keep


# ---- row metrics: one attention row as python floats --------------------------------------------------------
def top_mass(row: Sequence[float], k: int) -> float:
    """m_k: the sum of the k largest entries (0 for k <= 0)."""
    return float(sum(sorted((float(p) for p in row), reverse=True)[: max(k, 0)]))


def tail_mass(row: Sequence[float], k: int) -> float:
    """1 - m_k, floored at 0 (k <= 0 leaves the whole mass, 1)."""
    return max(0.0, 1.0 - top_mass(row, k)) if k > 0 else 1.0


def k_at_coverage(row: Sequence[float], delta: float, n: int | None = None, slack: float = 0.0) -> int:
    """The smallest k whose top-k mass reaches 1 - δ - slack; n (default: the row length) if none does."""
    n = len(row) if n is None else n
    acc = 0.0
    for k, p in enumerate(sorted((float(p) for p in row), reverse=True)[:n], start=1):
        acc += p
        if acc >= 1.0 - delta - slack:
            return k
    return n


def count_above(row: Sequence[float], eps: float) -> int:
    """How many entries exceed ε."""
    return sum(1 for p in row if float(p) > eps)


def entropy(row: Sequence[float]) -> float:
    """-Σ p log p in nats (0 log 0 = 0)."""
    return -sum(float(p) * math.log(float(p)) for p in row if p > 0)


def sink_mass(row: Sequence[float], sink: int) -> float:
    """Mass on the first `sink` keys."""
    return float(sum(float(row[j]) for j in range(min(sink, len(row)))))


def local_mass(row: Sequence[float], position: int, window: int) -> float:
    """Mass on keys j with position - window < j <= position."""
    return float(sum(float(row[j]) for j in range(len(row)) if position - window < j <= position))


def streaming_mass(row: Sequence[float], position: int, sink: int, window: int) -> float:
    """Mass on the union of the sink keys and the local window."""
    return float(sum(float(row[j]) for j in range(len(row)) if j < sink or position - window < j <= position))
