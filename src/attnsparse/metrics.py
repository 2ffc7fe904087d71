"""Per-row attention sparsity metrics: pure tensor functions on softmax rows (docs/measure.md, DESIGN.md §1).

Every function takes attention rows `probs (..., K)` whose entries are exactly 0 on keys the query cannot see
(the backend's convention), so a row "shorter than k" simply has fewer than k non-zero entries. One descending
sort and one cumulative sum per row serve the top-k masses, the tail masses, k at coverage and the (ε,k) counts;
`row_metrics` computes them all with that single sort, which is what the profile recorder uses.

On CPU the sort runs in numpy (values only, SIMD, threads over row blocks): torch's CPU sort also builds an
index tensor and is several times slower, and the sort is the measure command's dominant cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

# Rows smaller than this are sorted on one thread: a thread pool costs more than it saves on small work.
_PARALLEL_MIN_ELEMENTS = 1 << 20


def row_lengths(visible: torch.Tensor) -> torch.Tensor:
    """n_i: how many keys each query sees (0 for padded query rows, which every metric skips)."""
    return visible.sum(-1)


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _parallel_rows(fn, rows: int, total_elements: int) -> None:  # type: ignore[no-untyped-def]
    """Run fn(start, stop) over row blocks, on several threads when the work is large (numpy frees the GIL)."""
    workers = min(_threads(), rows)
    if workers <= 1 or total_elements < _PARALLEL_MIN_ELEMENTS:
        fn(0, rows)
        return
    bounds = np.linspace(0, rows, workers + 1).astype(int)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda i: fn(bounds[i], bounds[i + 1]), range(workers)))


@dataclass
class SortedRows:
    """Rows sorted ascending (`ascending`, float32), their descending cumulative mass (`top_mass`, float64:
    `top_mass[r, j]` is the top-(j+1) mass m_{j+1} of row r) and each row's entropy (float64, nats)."""

    ascending: torch.Tensor
    top_mass: torch.Tensor
    entropy: torch.Tensor


_TINY = np.float32(np.finfo(np.float32).tiny)


def sort_rows(rows: torch.Tensor) -> SortedRows:
    """One sort + one cumsum of a 2-D (R, K) block of attention rows (a strided view is fine; it is not changed).

    The entropy rides along on the sorted copy while it is in cache: -Σ p log p with 0 log 0 = 0.
    """
    if rows.dim() != 2:
        raise ValueError(f"sort_rows expects (rows, keys), got shape {tuple(rows.shape)}")
    rows = rows.detach()
    if rows.device.type != "cpu":
        ascending = torch.sort(rows.float(), dim=-1).values
        top_mass = torch.cumsum(ascending.flip(-1), dim=-1, dtype=torch.float64)
        ent = torch.special.entr(ascending).sum(-1, dtype=torch.float64)
        return SortedRows(ascending, top_mass, ent)
    source = rows if rows.dtype == torch.float32 else rows.float()
    view = source.numpy()  # no copy, possibly strided
    array = np.empty(view.shape, dtype=np.float32)
    top = np.empty(view.shape, dtype=np.float64)
    ent = np.empty(view.shape[0], dtype=np.float64)

    def work(start: int, stop: int) -> None:
        block = array[start:stop]
        block[...] = view[start:stop]
        block.sort(axis=-1)
        np.cumsum(block[:, ::-1], axis=-1, dtype=np.float64, out=top[start:stop])
        logs = np.log(np.maximum(block, _TINY))
        np.multiply(logs, block, out=logs)
        ent[start:stop] = -logs.sum(axis=-1, dtype=np.float64)

    _parallel_rows(work, array.shape[0], array.size)
    return SortedRows(torch.from_numpy(array), torch.from_numpy(top), torch.from_numpy(ent))


def _flatten(probs: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    lead = tuple(probs.shape[:-1])
    return probs.detach().reshape(-1, probs.shape[-1]), lead


def _as_long(values: Sequence[int], name: str) -> list[int]:
    out = [int(v) for v in values]
    if not out:
        raise ValueError(f"{name} must not be empty")
    if min(out) < 1:
        raise ValueError(f"{name} must be >= 1, got {min(out)}")
    return out


def topk_mass_from_sorted(sorted_rows: SortedRows, ks: Sequence[int]) -> torch.Tensor:
    """m_k for each k in ks: (R, len(ks)) float64; k beyond the row length gives the whole row's mass."""
    width = sorted_rows.top_mass.shape[-1]
    if width == 0:
        return torch.zeros(sorted_rows.top_mass.shape[0], len(ks), dtype=torch.float64)
    index = torch.tensor([min(k, width) - 1 for k in ks], dtype=torch.long, device=sorted_rows.top_mass.device)
    return sorted_rows.top_mass.index_select(-1, index)


def k_at_coverage_from_sorted(sorted_rows: SortedRows, deltas: Sequence[float], n: torch.Tensor) -> torch.Tensor:
    """Smallest k with m_k >= 1 - δ, per δ: (R, len(deltas)) long, clamped to the row length n (rounding)."""
    top = sorted_rows.top_mass
    targets = torch.tensor([1.0 - d for d in deltas], dtype=torch.float64, device=top.device)
    targets = targets.expand(top.shape[0], len(deltas)).contiguous()
    k = torch.searchsorted(top.contiguous(), targets, side="left") + 1
    return torch.minimum(k, n.reshape(-1, 1).to(k.device, k.dtype)).clamp_min(1)


def count_above_from_sorted(sorted_rows: SortedRows, eps: Sequence[float]) -> torch.Tensor:
    """How many entries of each row exceed ε, per ε: (R, len(eps)) long."""
    ascending = sorted_rows.ascending.contiguous()
    columns = []
    for e in eps:
        # compare exactly as in float64: x > e for a float32 x is x > rounded(e), or x >= rounded(e) if it rounded up
        rounded = torch.tensor(e, dtype=ascending.dtype)
        side = "left" if float(rounded) > e else "right"
        values = rounded.to(ascending.device).expand(ascending.shape[0], 1).contiguous()
        columns.append(ascending.shape[-1] - torch.searchsorted(ascending, values, side=side))
    return torch.cat(columns, dim=-1)


def topk_mass(probs: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Top-k mass m_k(p_i) = sum of the k largest entries: (..., len(ks)) float64."""
    ks = _as_long(ks, "k list")
    rows, lead = _flatten(probs)
    return topk_mass_from_sorted(sort_rows(rows), ks).reshape(*lead, len(ks))


def tail_mass(probs: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Tail mass 1 - m_k(p_i) (the TV distance to the top-k renormalisation), floored at 0 against rounding."""
    return (1.0 - topk_mass(probs, ks)).clamp_min(0.0)


def k_at_coverage(probs: torch.Tensor, deltas: Sequence[float], visible: torch.Tensor | None = None) -> torch.Tensor:
    """k_{1-δ}(p_i): the smallest k whose top-k mass is >= 1 - δ, per δ: (..., len(deltas)) long.

    `visible` (broadcastable to probs) gives n_i; without it n_i counts the non-zero entries.
    """
    rows, lead = _flatten(probs)
    n = (visible.expand(probs.shape) if visible is not None else probs > 0).sum(-1).reshape(-1)
    return k_at_coverage_from_sorted(sort_rows(rows), deltas, n).reshape(*lead, len(deltas))


def count_above(probs: torch.Tensor, eps: Sequence[float]) -> torch.Tensor:
    """Number of entries > ε per row, per ε: (..., len(eps)) long."""
    rows, lead = _flatten(probs)
    return count_above_from_sorted(sort_rows(rows), eps).reshape(*lead, len(eps))


def eps_k_sparse(probs: torch.Tensor, eps: Sequence[float], ks: Sequence[int]) -> torch.Tensor:
    """(ε,k)-sparse indicator (at most k entries exceed ε): (..., len(eps), len(ks)) bool."""
    counts = count_above(probs, eps)
    kk = torch.tensor(_as_long(ks, "k list"), dtype=counts.dtype, device=counts.device)
    return counts[..., :, None] <= kk


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy H(p_i) in nats (0 log 0 = 0), float64; exp(H) is the effective support."""
    return torch.special.entr(probs.detach()).sum(-1, dtype=torch.float64)


def sink_mass(probs: torch.Tensor, sink_tokens: int) -> torch.Tensor:
    """Mass on the first `sink_tokens` positions of the sequence (key index < s), float64."""
    return probs.detach()[..., :sink_tokens].sum(-1, dtype=torch.float64)


def _local_gather(probs: torch.Tensor, positions: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries of keys positions-w+1 .. positions (float64) and whether each such key index is >= 0."""
    offsets = torch.arange(window, device=probs.device)
    index = positions.to(probs.device)[..., None] - offsets  # (..., w)
    valid = index >= 0
    index = index.clamp(0, probs.shape[-1] - 1).expand(*probs.shape[:-1], window)
    values = probs.detach().gather(-1, index).to(torch.float64)
    return values * valid, valid.expand_as(values)


def local_mass(probs: torch.Tensor, query_positions: torch.Tensor, window: int) -> torch.Tensor:
    """Mass on the last `window` keys up to and including the query (key j with i - w < j <= i), float64.

    `query_positions` is broadcastable to probs.shape[:-1] (e.g. (Qc,) for probs (B, H, Qc, K)).
    """
    values, _ = _local_gather(probs, query_positions, window)
    return values.sum(-1)


def streaming_mass(probs: torch.Tensor, query_positions: torch.Tensor, sink_tokens: int, window: int) -> torch.Tensor:
    """Mass on the union of the sink keys (j < s) and the local window (i - w < j <= i), float64."""
    local = local_mass(probs, query_positions, window)
    sink_cols = min(sink_tokens, probs.shape[-1])
    cols = torch.arange(sink_cols, device=probs.device)
    outside_window = cols <= query_positions.to(probs.device)[..., None] - window  # (..., s)
    sink_only = (probs.detach()[..., :sink_cols].to(torch.float64) * outside_window).sum(-1)
    return local + sink_only


@dataclass(frozen=True)
class MetricSpec:
    """Which metrics `row_metrics` computes: the k list, coverage δs, ε grid, sink size and local window."""

    ks: tuple[int, ...]
    deltas: tuple[float, ...] = (0.01, 0.05, 0.1)
    eps: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    sink_tokens: int = 4
    local_window: int = 64


@dataclass
class RowMetrics:
    """Every per-row metric for a block of rows, each shaped like probs.shape[:-1] (+ a trailing grid axis)."""

    n: torch.Tensor  # long, row length n_i (0 = padded row, skip)
    topk_mass: torch.Tensor  # float64 (..., len(ks))
    k_cov: torch.Tensor  # long (..., len(deltas))
    count_above: torch.Tensor  # long (..., len(eps))
    entropy: torch.Tensor  # float64
    sink: torch.Tensor  # float64
    local: torch.Tensor  # float64
    streaming: torch.Tensor  # float64, sink ∪ local


def row_metrics(
    probs: torch.Tensor, visible: torch.Tensor, query_positions: torch.Tensor, spec: MetricSpec
) -> RowMetrics:
    """All metrics of `spec` for rows `probs (..., Qc, K)`, with a single sort per row.

    Keys after the last column any row can see are dropped before sorting (under a causal mask that halves
    the work on average); they hold zeros, so no metric changes.
    """
    probs = probs.detach()
    lead = tuple(probs.shape[:-1])
    n = row_lengths(visible).expand(lead)
    cols_seen = visible.reshape(-1, visible.shape[-1]).any(0).nonzero()
    width = int(cols_seen.max()) + 1 if cols_seen.numel() else 1
    narrow = probs[..., :width]
    rows = probs.reshape(-1, probs.shape[-1])[:, :width]  # a view: sort_rows copies row blocks itself
    sorted_rows = sort_rows(rows)
    n_flat = n.reshape(-1)
    top = topk_mass_from_sorted(sorted_rows, spec.ks).to(probs.device)
    k_cov = k_at_coverage_from_sorted(sorted_rows, spec.deltas, n_flat).to(probs.device)
    above = count_above_from_sorted(sorted_rows, spec.eps).to(probs.device)
    ent = sorted_rows.entropy.to(probs.device)
    positions = query_positions.to(probs.device)
    return RowMetrics(
        n=n,
        topk_mass=top.reshape(*lead, len(spec.ks)),
        k_cov=k_cov.reshape(*lead, len(spec.deltas)),
        count_above=above.reshape(*lead, len(spec.eps)),
        entropy=ent.reshape(lead),
        sink=sink_mass(narrow, spec.sink_tokens),
        local=local_mass(narrow, positions, spec.local_window),
        streaming=streaming_mass(narrow, positions, spec.sink_tokens, spec.local_window),
    )


def default_ks(ctx: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ctx, with ctx itself appended when it is not a power of two."""
    ks = [2**j for j in range(int(math.log2(max(ctx, 1))) + 1)]
    if ks[-1] != ctx:
        ks.append(ctx)
    return tuple(ks)
