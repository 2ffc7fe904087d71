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
def _key_block(grid) -> int:
    return getattr(grid, "key_block", 0) or grid.block


def block_causal(grid) -> torch.Tensor:
    """(Qb, Kb): query block r (the queries at key positions in [(first + r)·B, (first + r + 1)·B)) may see key
    block j (positions from j·KB) when j·KB is at or before r's last query."""
    first = (grid.keys - grid.queries) // grid.block
    query_blocks = -(-grid.keys // grid.block) - first
    key_blocks = -(-grid.keys // _key_block(grid))
    out = torch.zeros(query_blocks, key_blocks, dtype=torch.bool)
    for r in range(query_blocks):
        last_query = min(grid.keys, (first + r + 1) * grid.block) - 1
        for j in range(key_blocks):
            out[r, j] = j * _key_block(grid) <= last_query
    return out


def block_forced(grid, sink: int, local: int) -> torch.Tensor:
    """Visible blocks that are among the first `sink` key blocks or start inside the `local` query-block spans
    ending at the row's own (with equal block sizes: the `local` blocks ending at the diagonal)."""
    first = (grid.keys - grid.queries) // grid.block
    causal = block_causal(grid)
    out = torch.zeros_like(causal)
    for r in range(causal.shape[0]):
        for j in range(causal.shape[1]):
            local_start = (first + r - local + 1) * grid.block
            out[r, j] = bool(causal[r, j]) and (j < sink or j * _key_block(grid) >= local_start)
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
            column = blocks[:, :, pos // grid.block - first, t // _key_block(grid)]  # (B, Hkv)
            keep[:, :, i, t] = column.repeat_interleave(groups, dim=1)
    return keep


def _group_block_probs(per_head: list, groups: int, causal: torch.Tensor) -> torch.Tensor:
    """Per head block masses (nested lists [h][r][j], >= 0) -> (Hkv, Qb, Kb): rows normalised over visible
    blocks, then the mean over each kv group's heads."""
    heads, rows, cols = len(per_head), causal.shape[0], causal.shape[1]
    out = torch.zeros(heads // groups, rows, cols, dtype=torch.float64)
    for h in range(heads):
        for r in range(rows):
            total = sum(per_head[h][r][j] for j in range(cols) if causal[r, j])
            for j in range(cols):
                if causal[r, j] and total > 0:
                    out[h // groups, r, j] += per_head[h][r][j] / total / groups
    return out


def _block_members(grid) -> tuple[list[list[int]], list[list[int]]]:
    """Query indices (into the call's queries) of each query block, key positions of each key block."""
    offset = grid.keys - grid.queries
    first = offset // grid.block
    query_blocks = -(-grid.keys // grid.block) - first
    key_blocks = -(-grid.keys // _key_block(grid))
    q_members = [[i for i in range(grid.queries) if (offset + i) // grid.block == first + r]
                 for r in range(query_blocks)]
    k_members = [[t for t in range(grid.keys) if t // _key_block(grid) == j] for j in range(key_blocks)]
    return q_members, k_members


def _per_block_rows(q: torch.Tensor, k: torch.Tensor, grid, row) -> torch.Tensor:
    """Block masses from `row(q_h (Q, D), k_h (K, D), query indices of a block, offset, key blocks)` -> one mass per
    key block, for each query head and query block; then normalised over visible blocks and averaged per group."""
    groups = q.shape[0] // k.shape[0]
    offset = grid.keys - grid.queries
    q_members, k_members = _block_members(grid)
    per_head = [[row(q[h].double(), k[h // groups].double(), qs, offset, k_members) for qs in q_members]
                for h in range(q.shape[0])]
    return _group_block_probs(per_head, groups, block_causal(grid))


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    return [w / sum(weights) for w in weights]


def mean_query_block_probs(q: torch.Tensor, k: torch.Tensor, grid, scaling: float) -> torch.Tensor:
    """One batch row. Each query block's mean query against every key at or before the block's last query: its
    softmax summed per key block."""

    def row(qh, kh, qs, offset, k_members):
        last = offset + qs[-1]
        probs = _softmax([scaling * float(qh[qs].mean(0) @ kh[t]) for t in range(last + 1)])
        return [sum(probs[t] for t in ks if t <= last) for ks in k_members]

    return _per_block_rows(q, k, grid, row)


def sub_block_mean_key_probs(q: torch.Tensor, k: torch.Tensor, grid, scaling: float, sub: int) -> torch.Tensor:
    """One batch row. Queries in sub-blocks of `sub` positions; each sub-block's mean query gives key block j (mean
    key k̄_j) the mass |j| exp(scaling q̄ · k̄_j), normalised over the key blocks starting at or before its last
    query; a query block's mass is the mean of its sub-blocks' masses weighted by their queries."""

    def row(qh, kh, qs, offset, k_members):
        masses = [0.0] * len(k_members)
        for start in sorted({(offset + i) // sub for i in qs}):
            part = [i for i in qs if (offset + i) // sub == start]
            q_mean, last = qh[part].mean(0), offset + part[-1]
            weights = [len(ks) * math.exp(scaling * float(q_mean @ kh[ks].mean(0))) if ks[0] <= last else 0.0
                       for ks in k_members]
            for j, weight in enumerate(weights):
                masses[j] += weight / sum(weights) * len(part) / len(qs)
        return masses

    return _per_block_rows(q, k, grid, row)


def mean_key_block_probs(q: torch.Tensor, k: torch.Tensor, grid, scaling: float) -> torch.Tensor:
    """One batch row: q (H, Q, D), k (Hkv, K, D). Mass of block j for block r ∝ |j| exp(scaling q̄_r · k̄_j)."""

    def row(qh, kh, qs, offset, k_members):
        return [len(ks) * math.exp(scaling * float(qh[qs].mean(0) @ kh[ks].mean(0))) for ks in k_members]

    return _per_block_rows(q, k, grid, row)


def antidiagonal_block_probs(q: torch.Tensor, k: torch.Tensor, grid, scaling: float, stride: int) -> torch.Tensor:
    """One batch row. Runs of `stride` key-axis positions; for query run a and key run c the antidiagonal sum
    sum_t q[a·S + S-1-t] · k[c·S + t] (absent positions are zero vectors), scaled by scaling / S; each run of
    queries (that holds one) softmaxes over key runs c <= a inside the sequence; a block pair's mass is the sum."""
    groups = q.shape[0] // k.shape[0]
    offset = grid.keys - grid.queries
    first = offset // grid.block
    dim = q.shape[-1]

    def q_at(h: int, pos: int) -> torch.Tensor:
        return q[h, pos - offset].double() if offset <= pos < grid.keys else torch.zeros(dim, dtype=torch.float64)

    def k_at(h: int, pos: int) -> torch.Tensor:
        return k[h // groups, pos].double() if pos < grid.keys else torch.zeros(dim, dtype=torch.float64)

    key_blocks = -(-grid.keys // _key_block(grid))
    query_blocks = -(-grid.keys // grid.block) - first
    per_head = []
    for h in range(q.shape[0]):
        mass = [[0.0] * key_blocks for _ in range(query_blocks)]
        for a in range(first * grid.block // stride, (first + query_blocks) * grid.block // stride):
            if not any(offset <= a * stride + t < grid.keys for t in range(stride)):
                continue
            cols = [c for c in range(a + 1) if c * stride < grid.keys]
            logits = [scaling / stride * sum(float(q_at(h, a * stride + stride - 1 - t) @ k_at(h, c * stride + t))
                                              for t in range(stride)) for c in cols]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            for c, w in zip(cols, weights, strict=True):
                mass[a * stride // grid.block - first][c * stride // _key_block(grid)] += w / sum(weights)
        per_head.append(mass)
    return _group_block_probs(per_head, groups, block_causal(grid))


def vertical_slash_block_probs(q: torch.Tensor, k: torch.Tensor, grid, scaling: float, last: int) -> torch.Tensor:
    """One batch row. The last `last` queries' causal softmax rows give vertical[t] (mean mass on key t) and
    slash[d] (mean mass at distance d = position - key); query p guesses vertical[t] + slash[p - t] for t <= p, a
    block pair's mass is the mean over the block's queries of the sum over its keys."""
    groups = q.shape[0] // k.shape[0]
    offset, n = grid.keys - grid.queries, grid.keys
    last = min(last, grid.queries)
    q_members, k_members = _block_members(grid)
    per_head = []
    for h in range(q.shape[0]):
        vertical, slash = [0.0] * n, [0.0] * n
        for i in range(grid.queries - last, grid.queries):
            pos = offset + i
            logits = [scaling * float(q[h, i].double() @ k[h // groups, t].double()) for t in range(pos + 1)]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            for t, w in enumerate(weights):
                vertical[t] += w / sum(weights) / last
                slash[pos - t] += w / sum(weights) / last
        mass = [[sum(sum(vertical[t] + slash[offset + i - t] for t in ks if t <= offset + i) for i in qs) / len(qs)
                 for ks in k_members] for qs in q_members]
        per_head.append(mass)
    return _group_block_probs(per_head, groups, block_causal(grid))


def exact_block_probs(q: torch.Tensor, k: torch.Tensor, grid, scaling: float) -> torch.Tensor:
    """One batch row. Each query's softmax over the keys at or before it, summed per key block, averaged over the
    query block's queries: the true block-pooled attention."""

    def row(qh, kh, qs, offset, k_members):
        masses = [0.0] * len(k_members)
        for i in qs:
            probs = _softmax([scaling * float(qh[i] @ kh[t]) for t in range(offset + i + 1)])
            for j, ks in enumerate(k_members):
                masses[j] += sum(probs[t] for t in ks if t <= offset + i) / len(qs)
        return masses

    return _per_block_rows(q, k, grid, row)


# ---- block top-k decoding, row by row (decode policy `block:B:BUDGET`, mean-key score) -------------------------
def decode_block_keep(q: torch.Tensor, k: torch.Tensor, block: int, budget: int = 0, density: float = 0.0,
                      sink: int = 1, recent: int = 2, rows: Sequence[int] | None = None) -> torch.Tensor:
    """Keys read by block top-k decoding for each query row t (context t + 1), (B, H, Q, Q) bool; Q = K. Only the
    given `rows` are filled when asked (the others stay False).

    Per (batch, kv head, row): blocks of `block` keys; the first `sink` and last `recent` blocks always; then blocks
    by q . (sum of the block's keys), max over the kv group's query heads, highest first, ties to the lower block,
    until max(ceil(tokens / block), sink + recent) blocks (tokens = budget or ceil(density * (t + 1))), or all.
    """
    batch, heads, n, _ = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    keep = torch.zeros(batch, heads, n, n, dtype=torch.bool)
    for b in range(batch):
        for h in range(kv_heads):
            for t in range(n) if rows is None else rows:
                context = t + 1
                total = math.ceil(context / block)
                tokens = budget if budget else math.ceil(density * context)
                count = min(total, max(math.ceil(tokens / block), sink + recent))
                chosen = {j for j in range(total) if j < sink or j >= total - recent}
                score = {j: max(float(q[b, h * groups + g, t] @ k[b, h, j * block : (j + 1) * block].sum(0))
                                for g in range(groups)) for j in range(total)}
                rest = sorted((j for j in range(total) if j not in chosen), key=lambda j: (-score[j], j))
                chosen |= set(rest[: max(count - len(chosen), 0)])
                for j in chosen:
                    keep[b, h * groups : (h + 1) * groups, t, j * block : min((j + 1) * block, context)] = True
    return keep
