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


# ---- block-sparse prefill: block geometry and selection from their definitions (docs/prefill.md) --------------
def block_causal(grid) -> torch.Tensor:
    """(Qb, Kb): query block r (holding key positions of block first + r) may see key blocks j <= first + r."""
    first = (grid.keys - grid.queries) // grid.block
    key_blocks = -(-grid.keys // grid.block)
    out = torch.zeros(key_blocks - first, key_blocks, dtype=torch.bool)
    for r in range(key_blocks - first):
        for j in range(key_blocks):
            out[r, j] = j <= first + r
    return out


def block_forced(grid, sink: int, local: int) -> torch.Tensor:
    """Visible blocks that are among the first `sink` or the `local` blocks ending at the row's diagonal."""
    first = (grid.keys - grid.queries) // grid.block
    causal = block_causal(grid)
    out = torch.zeros_like(causal)
    for r in range(causal.shape[0]):
        for j in range(causal.shape[1]):
            out[r, j] = bool(causal[r, j]) and (j < sink or first + r - local < j)
    return out


def _row_probs(log_mass: torch.Tensor, causal: torch.Tensor) -> list[list[float]]:
    """Softmax of each row over its visible blocks, as python floats (0 where invisible)."""
    rows = []
    for r in range(log_mass.shape[0]):
        visible = [j for j in range(log_mass.shape[1]) if causal[r, j]]
        top = max(float(log_mass[r, j]) for j in visible)
        weights = {j: math.exp(float(log_mass[r, j]) - top) for j in visible}
        total = sum(weights.values())
        rows.append([weights.get(j, 0.0) / total for j in range(log_mass.shape[1])])
    return rows


def density_select(log_mass: torch.Tensor, causal: torch.Tensor, forced: torch.Tensor, budget: int) -> torch.Tensor:
    """(B, Hkv, Qb, Kb): forced blocks, then the best remaining blocks of each map by mass, ties to the earlier
    (row, column), until the map holds `budget` blocks (or only the forced ones, if they are more)."""
    out = torch.zeros(log_mass.shape, dtype=torch.bool)
    for b in range(log_mass.shape[0]):
        for h in range(log_mass.shape[1]):
            probs = _row_probs(log_mass[b, h], causal)
            cells = [(r, j) for r in range(causal.shape[0]) for j in range(causal.shape[1]) if causal[r, j]]
            kept = [c for c in cells if forced[c]]
            rest = sorted((c for c in cells if not forced[c]), key=lambda c: (-probs[c[0]][c[1]], c))
            kept += rest[: max(0, budget - len(kept))]
            for r, j in kept:
                out[b, h, r, j] = True
    return out


def mass_select(log_mass: torch.Tensor, causal: torch.Tensor, forced: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B, Hkv, Qb, Kb): per row the forced blocks, then blocks by mass (ties: earlier), each added while the mass
    kept so far is below gamma."""
    out = torch.zeros(log_mass.shape, dtype=torch.bool)
    for b in range(log_mass.shape[0]):
        for h in range(log_mass.shape[1]):
            probs = _row_probs(log_mass[b, h], causal)
            for r in range(causal.shape[0]):
                kept = 0.0
                for j in range(causal.shape[1]):
                    if forced[r, j]:
                        out[b, h, r, j] = True
                        kept += probs[r][j]
                order = sorted((j for j in range(causal.shape[1]) if causal[r, j] and not forced[r, j]),
                               key=lambda j: (-probs[r][j], j))
                for j in order:
                    if kept >= gamma - 1e-6:
                        break
                    out[b, h, r, j] = True
                    kept += probs[r][j]
    return out


def block_keep_tokens(blocks: torch.Tensor, grid, groups: int) -> torch.Tensor:
    """Token keep mask (B, H, Q, K) from a block mask (B, Hkv, Qb, Kb): query i (key position K - Q + i) keeps key
    t when t <= its position and the block pair (its block, t's block) is kept for its kv group."""
    batch, kv_heads = blocks.shape[:2]
    offset = grid.keys - grid.queries
    first = offset // grid.block
    keep = torch.zeros(batch, kv_heads * groups, grid.queries, grid.keys, dtype=torch.bool)
    for i in range(grid.queries):
        pos = offset + i
        for t in range(pos + 1):
            column = blocks[:, :, pos // grid.block - first, t // grid.block]  # (B, Hkv)
            keep[:, :, i, t] = column.repeat_interleave(groups, dim=1)
    return keep
