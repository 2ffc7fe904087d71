"""Per-row attention sparsity metrics: pure tensor functions on softmax rows (docs/measure.md).

The one implementation of top-k mass, tail mass, k at coverage, ε counts and (ε,k)-sparsity: `measure` profiles
and the theory lab both use it. Every function takes attention rows `probs (..., K)` whose entries are exactly 0
on keys the query cannot see (the backend's convention), so a row "shorter than k" simply has fewer than k
non-zero entries. The single-metric functions sort each row (`sort_rows`: one sort and one float64 cumsum serve
every metric). `row_metrics`, what the profile recorder uses, avoids the full sort on CPU for rows of 512+ keys
(`_select_block`: a 16-bit radix order plus exact fix-ups) and gives the same integers and masses within float
rounding; `sort_rows` stays the reference and the path for other devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from attnsparse.core.devices import require_cpu

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
    """Rows sorted ascending (`ascending`: float32, or float64 for float64 rows), their descending cumulative mass
    (`top_mass`, float64: `top_mass[r, j]` is the top-(j+1) mass m_{j+1} of row r) and each row's entropy
    (float64, nats)."""

    ascending: torch.Tensor
    top_mass: torch.Tensor
    entropy: torch.Tensor


_TINY = np.float32(np.finfo(np.float32).tiny)


def sort_rows(rows: torch.Tensor) -> SortedRows:
    """One sort + one cumsum of a 2-D (R, K) block of attention rows (a strided view is fine; it is not changed).

    float64 rows stay float64 (the theory lab's exact rows); anything else is sorted as float32, which is what the
    backend records. The entropy rides along on the sorted copy while it is in cache: -Σ p log p with 0 log 0 = 0.
    """
    if rows.dim() != 2:
        raise ValueError(f"sort_rows expects (rows, keys), got shape {tuple(rows.shape)}")
    rows = rows.detach()
    dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    if not host_rows(rows):
        ascending = torch.sort(rows.to(dtype), dim=-1).values
        top_mass = torch.cumsum(ascending.flip(-1), dim=-1, dtype=torch.float64)
        ent = torch.special.entr(ascending).sum(-1, dtype=torch.float64)
        return SortedRows(ascending, top_mass, ent)
    view = rows.to(dtype).numpy()  # no copy when already of that dtype, possibly strided
    array = np.empty(view.shape, dtype=view.dtype)
    top = np.empty(view.shape, dtype=np.float64)
    ent = np.empty(view.shape[0], dtype=np.float64)
    tiny = np.finfo(view.dtype).tiny

    def work(start: int, stop: int) -> None:
        block = array[start:stop]
        block[...] = view[start:stop]
        block.sort(axis=-1)
        np.cumsum(block[:, ::-1], axis=-1, dtype=np.float64, out=top[start:stop])
        logs = np.log(np.maximum(block, tiny))
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


def topk_mass_from_sorted(sorted_rows: SortedRows, ks: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """m_k per row, float64: `ks` a list (the same ks for every row: (R, len(ks))) or a long tensor of per-row ks,
    (R,) or (R, G) (→ (R, 1) or (R, G)). k beyond the row length gives the whole row's mass; k <= 0 gives 0."""
    top = sorted_rows.top_mass
    rows, width = top.shape
    if isinstance(ks, torch.Tensor):
        k = ks.to(top.device, torch.long)
        k = k.reshape(rows, -1) if k.dim() else k.expand(rows, 1)
    else:
        k = torch.tensor(list(ks), dtype=torch.long, device=top.device).expand(rows, len(ks))
    if width == 0:
        return torch.zeros(k.shape, dtype=torch.float64, device=top.device)
    kept = top.gather(-1, (k.clamp(1, width) - 1).contiguous())
    return torch.where(k > 0, kept, torch.zeros_like(kept))


def tail_mass_from_sorted(sorted_rows: SortedRows, ks: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Tail mass 1 - m_k (the TV distance to the top-k renormalisation), floored at 0 against rounding; `ks` as
    in `topk_mass_from_sorted` (k <= 0 leaves the whole mass, 1)."""
    return (1.0 - topk_mass_from_sorted(sorted_rows, ks)).clamp_min(0.0)


def k_at_coverage_from_top_mass(
    top_mass: torch.Tensor, deltas: Sequence[float], n: torch.Tensor, slack: float = 0.0
) -> torch.Tensor:
    """Smallest k with m_k >= 1 - δ - slack, per δ: (R, len(deltas)) long, clamped to the row length n.

    `top_mass` (R, K) is any non-decreasing cumulative mass (`SortedRows.top_mass`, or a row built in descending
    order). `slack` 0 is the exact rule `measure` records; the theory lab passes a tolerance for its float64 rows,
    whose planted masses sit exactly on 1 - δ.
    """
    targets = torch.tensor([(1.0 - d) - slack for d in deltas], dtype=top_mass.dtype, device=top_mass.device)
    targets = targets.expand(top_mass.shape[0], len(deltas)).contiguous()
    k = torch.searchsorted(top_mass.contiguous(), targets, side="left") + 1
    return torch.minimum(k, n.reshape(-1, 1).to(k.device, k.dtype)).clamp_min(1)


def k_at_coverage_from_sorted(
    sorted_rows: SortedRows, deltas: Sequence[float], n: torch.Tensor, slack: float = 0.0
) -> torch.Tensor:
    """Smallest k with m_k >= 1 - δ (- slack), per δ: (R, len(deltas)) long, clamped to the row length n."""
    return k_at_coverage_from_top_mass(sorted_rows.top_mass, deltas, n, slack)


def count_above_from_sorted(sorted_rows: SortedRows, eps: Sequence[float]) -> torch.Tensor:
    """How many entries of each row exceed ε, per ε: (R, len(eps)) long."""
    ascending = sorted_rows.ascending.contiguous()
    columns = []
    for e in eps:
        # compare exactly as in float64: x > e for a float32 x is x > rounded(e), or x >= rounded(e) if it rounded up
        rounded = torch.tensor(e, dtype=ascending.dtype, device="cpu")  # a host scalar: rounding decided here
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
    ks = _as_long(ks, "k list")
    rows, lead = _flatten(probs)
    return tail_mass_from_sorted(sort_rows(rows), ks).reshape(*lead, len(ks))


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
    return _streaming_from_local(probs, local, query_positions, sink_tokens, window)


def _streaming_from_local(
    probs: torch.Tensor, local: torch.Tensor, query_positions: torch.Tensor, sink_tokens: int, window: int
) -> torch.Tensor:
    sink_cols = min(sink_tokens, probs.shape[-1])
    cols = torch.arange(sink_cols, device=probs.device)
    outside_window = cols <= query_positions.to(probs.device)[..., None] - window  # (..., s)
    sink_only = (probs.detach()[..., :sink_cols].to(torch.float64) * outside_window).sum(-1)
    return local + sink_only


# ---- selection-based exact path (CPU): no full sort --------------------------------------------------------
# Rows are ordered by a 16-bit key (the float32 bits >> 14: exponent and 9 mantissa bits, exact order up to
# ties within 0.2%) with numpy's radix argsort, in cache-sized row blocks. Values of one key form a contiguous
# "group" whose internal order is arbitrary; every sum over whole groups is a sum over the right set. Only where
# a top-k boundary or a coverage crossing falls inside a group of several keys is that group sorted exactly.
# Cumulative masses come from float64 sums of 64-element sub-blocks (no full cumsum). k at coverage must equal
# the old sequential float64 cumsum exactly: where our prefix sum lies within a rounding bound of 1 - δ, the
# row is recomputed the old way (sort + sequential cumsum), so the integers agree bit for bit.

_KEY_SHIFT = 14  # float32 bits >> 14 fits in uint16 for 0 <= x < 2
_KEY_LIMIT = 1 << 30
_SUB = 64  # sub-block of sorted values summed at once
_NEAR = 8  # key runs are first looked for within this many positions
_SELECT_MIN_WIDTH = 512  # narrower rows are cheaper to sort (fewer numpy calls per element)
_BLOCK_ELEMENTS = 1 << 19  # row block processed at once (a few MB of temporaries, mostly cache resident)
_GROUP_CLASSES = (8, 32, 128, 512)  # padded widths for sorting groups; larger groups are sorted one by one
_SKIP_GROUP_BOUND = 2.0**-46  # a group whose mass error bound is below this needs no re-sort for top-k masses


class _Keys:
    """The 16-bit keys of descending pseudo-sorted rows, indexed like an array but computed on the fly."""

    def __init__(self, vd: np.ndarray) -> None:
        self.vd = vd
        self.shape = vd.shape

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        return self.vd[index].view(np.int32) >> _KEY_SHIFT


def _search(kd: _Keys, rows: np.ndarray, kappa: np.ndarray, strict: bool) -> np.ndarray:
    """First position of each descending key row kd[rows] whose key is <= kappa (strict) or < kappa (not strict)."""
    width = kd.shape[1]
    lo = np.zeros(rows.size, dtype=np.int64)
    hi = np.full(rows.size, width, dtype=np.int64)
    for _ in range(int(width).bit_length() + 1):
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) >> 1
        val = kd[rows, np.minimum(mid, width - 1)]
        right = ((val > kappa) if strict else (val >= kappa)) & active
        lo = np.where(right, mid + 1, lo)
        hi = np.where(right | ~active, hi, mid)
    return lo


def _group_bounds(kd: _Keys, rows: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[g0, g1): the run of equal keys around position `pos` of each descending key row kd[rows].

    Looks in a window of ±_NEAR positions first; runs reaching its edge are found by binary search.
    """
    width = kd.shape[1]
    kappa = kd[rows, pos]
    offs = np.arange(-_NEAR, _NEAR + 1)
    cols = pos[:, None] + offs
    inside = (cols >= 0) & (cols < width)
    eq = (kd[rows[:, None], np.minimum(np.maximum(cols, 0), width - 1)] == kappa[:, None]) & inside
    g0 = cols[np.arange(rows.size), eq.argmax(-1)]
    g1 = cols[np.arange(rows.size), eq.shape[1] - 1 - eq[:, ::-1].argmax(-1)] + 1
    far = np.nonzero(((g0 == pos - _NEAR) & (g0 > 0)) | ((g1 == pos + _NEAR + 1) & (g1 < width)))[0]
    if far.size:
        g0[far] = _search(kd, rows[far], kappa[far], strict=True)
        g1[far] = _search(kd, rows[far], kappa[far], strict=False)
    return g0, g1


def _sorted_groups(
    vd: np.ndarray, rows: np.ndarray, g0: np.ndarray, g1: np.ndarray, sort: bool = True
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Values vd[row, g0:g1] of each query, sorted descending, batched by padded width: [(query indices, (m, L))].

    Padding is 0 after the group's values (all values are >= 0), so sums and cumsums may run over it.
    Empty groups are left out.
    """
    length = g1 - g0
    out = []
    lower = 0
    for cap in _GROUP_CLASSES:
        sel = np.nonzero((length > lower) & (length <= cap))[0]
        lower = cap
        if sel.size == 0:
            continue
        width = int(length[sel].max())
        offs = np.arange(width)
        cols = g0[sel, None] + offs
        valid = offs < length[sel, None]
        vals = np.where(valid, vd[rows[sel, None], np.minimum(cols, vd.shape[1] - 1)], np.float32(-1.0))
        if sort:
            vals.sort(axis=-1)
            vals = vals[:, ::-1]
        out.append((sel, np.maximum(vals, np.float32(0.0))))
    for i in np.nonzero(length > lower)[0]:
        vals = vd[rows[i], g0[i]:g1[i]]
        vals = np.sort(vals)[::-1] if sort else vals
        out.append((np.array([i]), vals[None, :]))
    return out


class _Prefix:
    """Prefix sums (float64) of descending pseudo-sorted rows at arbitrary positions, from sub-block sums."""

    def __init__(self, vd: np.ndarray) -> None:
        rows, width = vd.shape
        full = width // _SUB
        sums = np.empty((rows, -(-width // _SUB)), dtype=np.float64)
        if full:
            sums[:, :full] = vd[:, : full * _SUB].reshape(rows, full, _SUB).sum(-1, dtype=np.float64)
        if width % _SUB:
            sums[:, full] = vd[:, full * _SUB:].sum(-1, dtype=np.float64)
        self.vd = vd
        self.cum = np.cumsum(sums, axis=-1)
        self.head: np.ndarray | None = None

    def block(self, rows: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Values of sub-block q of each row (0 past the row end) and the prefix sum before it."""
        width = self.vd.shape[1]
        cols = q[:, None] * _SUB + np.arange(_SUB)
        vals = np.where(cols < width, self.vd[rows[:, None], np.minimum(cols, width - 1)], np.float32(0.0))
        base = np.where(q > 0, self.cum[rows, np.maximum(q - 1, 0)], 0.0)
        return vals, base

    def at(self, rows: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Sum of the first j values of each row (0 <= j <= width)."""
        q = j // _SUB
        r = j - q * _SUB
        out = np.where(q > 0, self.cum[rows, np.maximum(q - 1, 0)], 0.0)
        head = (q == 0) & (r > 0)
        if head.any():  # inside the first sub-block: its running sum, computed once
            if self.head is None:
                self.head = np.cumsum(self.vd[:, :_SUB], axis=-1, dtype=np.float64)
            out[head] = self.head[rows[head], r[head] - 1]
        partial = np.nonzero((r > 0) & (q > 0))[0]
        if partial.size:
            vals, _ = self.block(rows[partial], q[partial])
            vals = np.where(np.arange(_SUB) < r[partial, None], vals, np.float32(0.0))
            out[partial] += vals.sum(-1, dtype=np.float64)
        return out


def _exact_kcov_rows(x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The reference computation (ascending sort, sequential float64 cumsum of the reversed row, searchsorted)."""
    ascending = np.sort(x, axis=-1)
    top = np.cumsum(ascending[:, ::-1], axis=-1, dtype=np.float64)
    return np.stack([np.searchsorted(row, targets, side="left") for row in top]).astype(np.int64) + 1


def _select_block(
    x: np.ndarray, ks: np.ndarray, targets: np.ndarray, eps: list[tuple[np.float32, bool]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """top-k masses (R, nk), raw k at coverage (R, nd, unclamped), ε counts (R, ne), entropy (R,) of a block.

    Returns None when the values do not fit the 16-bit key (negative, >= 2, NaN): the caller then sorts.
    """
    nrows, width = x.shape
    u = x.view(np.uint32)
    if int(u.max()) >= _KEY_LIMIT:  # negative, >= 2 or NaN
        return None
    order = np.argsort((u >> _KEY_SHIFT).astype(np.uint16), axis=-1, kind="stable")  # radix sort, 16-bit keys
    vd = np.take_along_axis(x, order[:, ::-1], axis=-1)  # descending pseudo-sorted values
    del order
    kd = _Keys(vd)  # their keys, computed where looked at
    prefix = _Prefix(vd)
    total = prefix.cum[:, -1]

    # --- top-k masses at the grid: whole key groups are exact sets; re-sort a group a boundary splits -----------
    top = np.repeat(total[:, None], len(ks), axis=1)
    inner = np.nonzero(ks < width)[0]
    if inner.size:
        kk = ks[inner]
        rows = np.repeat(np.arange(nrows), inner.size)
        j = np.tile(kk, nrows)
        top[:, inner] = prefix.at(rows, j).reshape(nrows, inner.size)
        split = (kd[:, kk - 1] == kd[:, kk]).ravel()
        if split.any():
            q = np.nonzero(split)[0]
            rows, j, col = rows[q], j[q], inner[q % inner.size]
            g0, g1 = _group_bounds(kd, rows, j)
            upper = ((kd[rows, j].astype(np.int64) + 1) << _KEY_SHIFT).astype(np.int32).view(np.float32)
            need = np.nonzero((g1 - g0) * upper.astype(np.float64) * 2.0**-9 > _SKIP_GROUP_BOUND)[0]
            if need.size:
                rows, j, col, g0, g1 = rows[need], j[need], col[need], g0[need], g1[need]
                base = prefix.at(rows, g0)
                for sel, vals in _sorted_groups(vd, rows, g0, g1):
                    take = (j - g0)[sel, None] > np.arange(vals.shape[1])
                    part = np.where(take, vals, np.float32(0.0)).sum(-1, dtype=np.float64)
                    top[rows[sel], col[sel]] = base[sel] + part

    # --- k at coverage: sub-block of the crossing, then the crossing's key group ---------------------------------
    nd = len(targets)
    tol = 4.0 * width * 2.0**-53 * np.maximum(total, 1.0)
    q_all = (prefix.cum[:, :, None] < targets).sum(1)  # (R, nd) sub-block of the crossing
    reached = q_all < prefix.cum.shape[1]
    kcov = np.full((nrows, nd), width + 1, dtype=np.int64)
    fallback = (~reached & (targets - total[:, None] <= tol[:, None])).any(-1)
    rq, dq = np.nonzero(reached)
    if rq.size:
        t = targets[dq]
        q = q_all[rq, dq]
        vals, base = prefix.block(rq, q)
        cum = base[:, None] + np.cumsum(vals, axis=-1, dtype=np.float64)
        hit = cum >= t[:, None]
        m = np.arange(rq.size)
        idx = np.where(hit.any(-1), hit.argmax(-1), np.minimum(width - q * _SUB, _SUB) - 1)
        jstar = q * _SUB + idx + 1
        c_hi = cum[m, idx]
        c_lo = np.where(idx > 0, cum[m, np.maximum(idx - 1, 0)], base)
        p = jstar - 1
        kappa = kd[rq, p]
        grouped = ((p >= 1) & (kd[rq, np.maximum(p - 1, 0)] == kappa)) | (
            (p + 1 < width) & (kd[rq, np.minimum(p + 1, width - 1)] == kappa))
        gq = np.nonzero(grouped)[0]
        if gq.size:
            grows = rq[gq]
            g0, g1 = _group_bounds(kd, grows, p[gq])
            gbase = prefix.at(grows, g0)
            for sel, gvals in _sorted_groups(vd, grows, g0, g1):
                length = (g1 - g0)[sel]
                gcum = gbase[sel, None] + np.cumsum(gvals, -1, dtype=np.float64)
                ghit = (gcum >= t[gq[sel], None]) & (np.arange(gvals.shape[1]) < length[:, None])
                gidx = np.where(ghit.any(-1), ghit.argmax(-1), length - 1)
                mm = np.arange(sel.size)
                target = gq[sel]
                jstar[target] = g0[sel] + gidx + 1
                c_hi[target] = gcum[mm, gidx]
                c_lo[target] = np.where(gidx > 0, gcum[mm, np.maximum(gidx - 1, 0)], gbase[sel])
        kcov[rq, dq] = jstar
        close = (c_hi - t < tol[rq]) | (t - c_lo <= tol[rq])
        fallback[rq[close]] = True
    if fallback.any():
        rows = np.nonzero(fallback)[0]
        kcov[rows] = _exact_kcov_rows(x[rows], targets)

    # --- ε counts: keys above ε's key, plus the members of ε's key group that pass -------------------------------
    counts = np.empty((nrows, len(eps)), dtype=np.int64)
    all_rows = np.arange(nrows)
    for i, (value, inclusive) in enumerate(eps):
        kappa = np.full(nrows, int(np.array(value, dtype=np.float32).view(np.int32)) >> _KEY_SHIFT)
        g0 = _search(kd, all_rows, kappa, strict=True)
        g1 = _search(kd, all_rows, kappa, strict=False)
        counts[:, i] = g0
        for sel, vals in _sorted_groups(vd, all_rows, g0, g1, sort=False):
            valid = np.arange(vals.shape[1]) < (g1 - g0)[sel, None]
            passed = (vals >= value) if inclusive else (vals > value)
            counts[sel, i] += np.count_nonzero(passed & valid, axis=-1)

    # --- entropy on the unsorted rows ----------------------------------------------------------------------------
    logs = np.log(np.maximum(x, _TINY))
    np.multiply(logs, x, out=logs)
    ent = -logs.sum(axis=-1, dtype=np.float64)
    return top, kcov, counts, ent


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


def _eps_thresholds(eps: Sequence[float]) -> list[tuple[np.float32, bool]]:
    """x > e for float32 x, compared exactly as in float64: (rounded e, whether to count x >= rounded)."""
    out = []
    for e in eps:
        rounded = np.float32(e)
        out.append((rounded, float(rounded) > e))
    return out


def _cpu_row_stats(
    rows: torch.Tensor, spec: MetricSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """top-k masses, raw k at coverage (not clamped to n), ε counts and entropy of 2-D CPU rows, without a
    full sort (see `_select_block`); blocks whose values do not fit the key fall back to `sort_rows`."""
    require_cpu(rows, "the row-metrics selection kernel")
    source = rows if rows.dtype == torch.float32 else rows.float()
    view = source.numpy()
    nrows, width = view.shape
    ks = np.asarray(spec.ks, dtype=np.int64)
    targets = np.asarray([1.0 - d for d in spec.deltas], dtype=np.float64)
    eps = _eps_thresholds(spec.eps)
    top = np.empty((nrows, len(ks)), dtype=np.float64)
    kcov = np.empty((nrows, len(targets)), dtype=np.int64)
    counts = np.empty((nrows, len(eps)), dtype=np.int64)
    ent = np.empty(nrows, dtype=np.float64)
    step = max(1, _BLOCK_ELEMENTS // max(width, 1))

    kernel = _native_rowstats() if width >= _SELECT_MIN_WIDTH else None

    def work(start: int, stop: int) -> None:
        for lo in range(start, stop, step):
            hi = min(lo + step, stop)
            block = np.ascontiguousarray(view[lo:hi])
            if kernel is not None:
                got = _native_block(kernel, block, ks, targets, eps, spec)
            elif width >= _SELECT_MIN_WIDTH:
                got = _select_block(block, ks, targets, eps)
            else:
                got = None
            if got is None:
                got = _sorted_block(block, spec)
            top[lo:hi], kcov[lo:hi], counts[lo:hi], ent[lo:hi] = got

    _parallel_rows(work, nrows, view.size)
    return torch.from_numpy(top), torch.from_numpy(kcov), torch.from_numpy(counts), torch.from_numpy(ent)


def _native_rowstats():  # type: ignore[no-untyped-def]
    """The compiled bucket kernel (native/rowstats.c) as a ctypes function, or None (numpy path)."""
    from attnsparse.core import native

    return native.function("rowstats", "rowstats", "pnnpnpnppnppppp")


def _native_block(
    kernel, block: np.ndarray, ks: np.ndarray, targets: np.ndarray, eps: list[tuple[np.float32, bool]],  # type: ignore[no-untyped-def]
    spec: MetricSpec,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Like `_select_block`, with top-k masses and k at coverage from the C bucket kernel (no sort at all).

    Rows the kernel flags are finished here: values outside [0, 2) take the sort path, coverage crossings
    within rounding of the target take the exact reference computation.
    """
    nrows, width = block.shape
    top = np.empty((nrows, ks.size), dtype=np.float64)
    kcov = np.empty((nrows, targets.size), dtype=np.int64)
    counts = np.empty((nrows, len(eps)), dtype=np.int64)
    ent = np.empty(nrows, dtype=np.float64)
    flag = np.empty(nrows, dtype=np.uint8)
    thresholds = np.asarray([value for value, _ in eps], dtype=np.float32)
    inclusive = np.asarray([bool(inc) for _, inc in eps], dtype=np.uint8)
    if kernel(block.ctypes.data, nrows, width, ks.ctypes.data, ks.size, targets.ctypes.data, targets.size,
              thresholds.ctypes.data, inclusive.ctypes.data, thresholds.size,
              top.ctypes.data, kcov.ctypes.data, counts.ctypes.data, ent.ctypes.data, flag.ctypes.data) != 0:
        raise MemoryError("row metrics kernel could not allocate its buffers")
    close = np.nonzero(flag == 1)[0]
    if close.size:
        kcov[close] = _exact_kcov_rows(block[close], targets)
    odd = np.nonzero(flag == 2)[0]
    if odd.size:
        top[odd], kcov[odd], counts[odd], ent[odd] = _sorted_block(np.ascontiguousarray(block[odd]), spec)
    return top, kcov, counts, ent


def _sorted_block(block: np.ndarray, spec: MetricSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sort path for one block (values outside [0, 2) or NaN): raw k at coverage, not clamped."""
    srt = sort_rows(torch.from_numpy(block))
    no_clamp = torch.full((block.shape[0],), block.shape[1] + 1, dtype=torch.long)
    return (
        topk_mass_from_sorted(srt, spec.ks).numpy(),
        k_at_coverage_from_sorted(srt, spec.deltas, no_clamp).numpy(),
        count_above_from_sorted(srt, spec.eps).numpy(),
        srt.entropy.numpy(),
    )


def host_rows(rows: torch.Tensor) -> bool:
    """Whether `row_metrics` takes the CPU path (selection kernel, numpy) for these rows; any other device takes
    the torch path on that device. The one switch between them (tests force the torch path on the CPU with it)."""
    return rows.device.type == "cpu"


def row_metrics(
    probs: torch.Tensor, visible: torch.Tensor, query_positions: torch.Tensor, spec: MetricSpec
) -> RowMetrics:
    """All metrics of `spec` for rows `probs (..., Qc, K)`.

    Keys after the last column any row can see are dropped first (under a causal mask that halves the work on
    average); they hold zeros, so no metric changes. On CPU the rows are not fully sorted (`_select_block`:
    radix order on a 16-bit key, exact fix-ups where needed); on other devices one torch sort per row serves all,
    on the device (no copy to the host; the compiled kernel is CPU-only), and every result stays there.
    """
    probs = probs.detach()
    lead = tuple(probs.shape[:-1])
    n = row_lengths(visible).expand(lead)
    width = probs.shape[-1]
    if host_rows(probs):  # on a device, finding the width would cost a sync per chunk: keep every column
        cols_seen = visible.reshape(-1, visible.shape[-1]).any(0).nonzero()
        width = int(cols_seen.max()) + 1 if cols_seen.numel() else 1
    narrow = probs[..., :width]
    rows = probs.reshape(-1, probs.shape[-1])[:, :width]  # a view: blocks are copied only where not contiguous
    n_flat = n.reshape(-1)
    if host_rows(rows):
        top, k_raw, above, ent = _cpu_row_stats(rows, spec)
        k_cov = torch.minimum(k_raw, n_flat.reshape(-1, 1).to(k_raw.dtype)).clamp_min(1)
    else:
        sorted_rows = sort_rows(rows)
        top = topk_mass_from_sorted(sorted_rows, spec.ks)
        k_cov = k_at_coverage_from_sorted(sorted_rows, spec.deltas, n_flat)
        above = count_above_from_sorted(sorted_rows, spec.eps)
        ent = sorted_rows.entropy
    positions = query_positions.to(probs.device)
    local = local_mass(narrow, positions, spec.local_window)
    return RowMetrics(
        n=n,
        topk_mass=top.to(probs.device).reshape(*lead, len(spec.ks)),
        k_cov=k_cov.to(probs.device).reshape(*lead, len(spec.deltas)),
        count_above=above.to(probs.device).reshape(*lead, len(spec.eps)),
        entropy=ent.to(probs.device).reshape(lead),
        sink=sink_mass(narrow, spec.sink_tokens),
        local=local,
        streaming=_streaming_from_local(narrow, local, positions, spec.sink_tokens, spec.local_window),
    )


def default_ks(ctx: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ctx, with ctx itself appended when it is not a power of two."""
    ks = [2**j for j in range(int(math.log2(max(ctx, 1))) + 1)]
    if ks[-1] != ctx:
        ks.append(ctx)
    return tuple(ks)
