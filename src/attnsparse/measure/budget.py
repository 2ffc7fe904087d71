"""Per-head key budgets from a measured profile: spend a stated average k where it removes the most tail mass.

Each head's measured mean top-k mass at k = 1, 2, 4, ... gives its tail curve t_h(k) = 1 − m_k (interpolated
linearly in log k between measured points, 0 from the context length on). Starting every head at `min_k`, keys are
handed out one at a time to the head whose tail drops most with one more key, until the heads' mean k is the
requested average. For tail curves that are convex in k (every measured head here) this greedy choice minimises
the summed tail mass for that total, which bounds the summed output error of top-k attention (docs/losses.md).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence

from attnsparse.attention.policies.budget import HeadBudget
from attnsparse.errors import AttnsparseError
from attnsparse.measure.profile import ProfileView


def tail_curve(points: dict[int, float], ctx: int) -> list[float]:
    """t(k) for k = 0 .. ctx from measured {k: top-k mass}; t(0) = 1, t(ctx) = 0, log-linear in between."""
    known = sorted((k, min(1.0, max(0.0, 1.0 - m))) for k, m in points.items() if 1 <= k < ctx)
    known = [(0, 1.0), *known, (ctx, 0.0)]
    curve = [1.0] * (ctx + 1)
    for (k0, t0), (k1, t1) in itertools.pairwise(known):
        for k in range(k0, k1 + 1):
            if k0 == 0:
                share = k / k1
            else:
                share = (math.log(k) - math.log(k0)) / (math.log(k1) - math.log(k0))
            curve[k] = t0 + share * (t1 - t0)
    for k in range(1, ctx + 1):  # a measured curve can wobble by rounding; keep it non-increasing
        curve[k] = min(curve[k], curve[k - 1])
    return curve


def allocate(curves: Sequence[Sequence[float]], mean_k: float, min_k: int = 1) -> list[int]:
    """Greedy keys per head: total round(mean_k × heads), each head at least `min_k`, largest tail drop first."""
    heads = len(curves)
    total = round(mean_k * heads)
    if min_k < 1 or min_k * heads > total:
        raise AttnsparseError(f"average k {mean_k} is below the minimum of {min_k} keys per head; lower --min-k")
    ks = [min(min_k, len(c) - 1) for c in curves]
    gains = [(-(c[k] - c[k + 1]), h) for h, (c, k) in enumerate(zip(curves, ks)) if k + 1 < len(c)]
    heapq.heapify(gains)
    spare = total - sum(ks)
    while spare > 0 and gains:
        _, h = heapq.heappop(gains)
        ks[h] += 1
        spare -= 1
        curve = curves[h]
        if ks[h] + 1 < len(curve):
            heapq.heappush(gains, (-(curve[ks[h]] - curve[ks[h] + 1]), h))
    return ks


def budget_from_profile(profile: ProfileView, mean_k: float, min_k: int = 1) -> HeadBudget:
    """A head budget of average `mean_k` keys per (layer, head) from a measure profile's top-k masses."""
    if not mean_k > 0:
        raise AttnsparseError(f"--mean-k must be > 0, got {mean_k}")
    curves: dict[tuple[int, int], list[float]] = {}
    for head in profile.per_head:
        masses = head.data.get("topk_mass")
        if not isinstance(masses, dict) or not masses:
            raise AttnsparseError(f"profile head ({head.layer}, {head.head}) has no topk_mass; re-run attnsparse measure")
        curves[(head.layer, head.head)] = tail_curve({int(k): float(v) for k, v in masses.items()}, profile.ctx)
    order = [(layer, h) for layer in range(profile.layers) for h in range(profile.heads)]
    missing = [key for key in order if key not in curves]
    if missing:
        raise AttnsparseError(f"profile lacks heads {missing[:3]}...; re-run attnsparse measure")
    ks = allocate([curves[key] for key in order], mean_k, min_k)
    rows = tuple(tuple(ks[layer * profile.heads:(layer + 1) * profile.heads]) for layer in range(profile.layers))
    return HeadBudget(rows)
