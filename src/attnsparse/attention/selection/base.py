"""Block selection for block-sparse prefill: estimators score (query block, key block) pairs; one rule keeps blocks.

Geometry (`BlockGrid`): queries (B, H, Q, D) and keys (B, Hkv, K, D) with Q <= K, query i at key position
K - Q + i (prefill: Q == K). Query blocks of `block` positions and key blocks of `key_block` positions (a divisor
of `block`; equal by default) tile the key axis from 0; a query block is the set of queries whose key position
falls in one query-sized span (the first and last may be partial). Query block r may see the key blocks that
start at or before its last query (causal at block level; inside its own span, the diagonal, the token-level
causal mask still applies). At a fixed density the query block is what sets quality (its queries share one
selection; docs/prefill.md has the measurements), while small key blocks under it cost the kernel little, since it
gathers them into full tiles.

Head axis: one selection per **kv group**, (B, Hkv, Qb, Kb). The G query heads of a group share their keys and
values, so a kept key block is read once for the whole group (by the kernel and by a GPU block mask alike), and
the group's estimate is the mean of its heads' estimated block masses.

Estimators return block log-masses: `softmax` over a row's visible key blocks is the estimator's guess of how a
query block's attention mass spreads over key blocks (mean over its queries and the group's heads). The selection
rule reads only that distribution, so a learned gate and a hand-made estimate plug in the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnsparse.errors import AttnsparseError
from attnsparse.specs import ParsedSpec, Registry, expect_fields

ESTIMATORS: Registry[BlockEstimator] = Registry("block estimator")


@dataclass(frozen=True)
class BlockGrid:
    """Block geometry of one attention call: `queries` queries ending at the last of `keys` key positions, queries
    in blocks of `block` positions, keys in blocks of `key_block` (default: `block`; it must divide `block`)."""

    block: int
    queries: int
    keys: int
    key_block: int = 0

    def __post_init__(self) -> None:
        if self.key_block == 0:
            object.__setattr__(self, "key_block", self.block)
        if self.block < 1 or self.queries < 1 or self.queries > self.keys:
            raise AttnsparseError(f"bad block grid: block {self.block}, {self.queries} queries, {self.keys} keys")
        if self.key_block < 1 or self.block % self.key_block:
            raise AttnsparseError(f"key blocks of {self.key_block} must divide query blocks of {self.block}")

    @property
    def offset(self) -> int:
        """Key position of the first query."""
        return self.keys - self.queries

    @property
    def first(self) -> int:
        """Query block (in blocks of `block` from position 0) holding the first query."""
        return self.offset // self.block

    @property
    def ratio(self) -> int:
        """Key blocks per query block."""
        return self.block // self.key_block

    @property
    def key_blocks(self) -> int:
        return -(-self.keys // self.key_block)

    @property
    def query_blocks(self) -> int:
        return -(-self.keys // self.block) - self.first

    def query_block_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Row index (query block) of each key-axis query position."""
        return torch.div(positions, self.block, rounding_mode="floor") - self.first

    def last_visible(self, device: torch.device | None = None) -> torch.Tensor:
        """(Qb,) int64: the last key block each query block may see (the one holding its last query)."""
        rows = torch.arange(self.query_blocks, device=device) + self.first + 1
        return torch.div((rows * self.block).clamp(max=self.keys) - 1, self.key_block, rounding_mode="floor")

    def diagonal_start(self, device: torch.device | None = None) -> torch.Tensor:
        """(Qb,) int64: the first key block inside each query block's own positions (its diagonal span)."""
        return (torch.arange(self.query_blocks, device=device) + self.first) * self.ratio

    def causal(self, device: torch.device | None = None) -> torch.Tensor:
        """(Qb, Kb) bool: key block j is visible to query block r when it starts at or before r's last query."""
        return torch.arange(self.key_blocks, device=device)[None, :] <= self.last_visible(device)[:, None]

    def causal_pairs(self) -> int:
        """Visible (query block, key block) pairs: the denominator of a block density."""
        return int((self.last_visible() + 1).sum())

    def pool_queries(self, query: torch.Tensor) -> torch.Tensor:
        """Mean query of each query block: (B, H, Q, D) -> (B, H, Qb, D) float32 (partial blocks: their queries)."""
        return _pool(query.float(), self.offset, self.block, self.query_blocks)

    def pool_keys(self, key: torch.Tensor) -> torch.Tensor:
        """Mean key of each key block: (B, Hkv, K, D) -> (B, Hkv, Kb, D) float32 (the last block: its keys)."""
        return _pool(key.float(), 0, self.key_block, self.key_blocks)

    def counts(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries per query block (Qb,) and keys per key block (Kb,), as float32."""
        k_starts = torch.arange(self.key_blocks, device=device) * self.key_block
        keys = (k_starts + self.key_block).clamp(max=self.keys) - k_starts
        q_starts = (torch.arange(self.query_blocks, device=device) + self.first) * self.block
        queries = (q_starts + self.block).clamp(max=self.keys) - q_starts.clamp(min=self.offset)
        return queries.float(), keys.float()


def _pool(x: torch.Tensor, start: int, block: int, blocks: int) -> torch.Tensor:
    """Means of x (..., N, D) over the position blocks its rows fall in, rows being positions start .. start + N."""
    lead = start % block
    tail = blocks * block - lead - x.shape[-2]
    padded = torch.nn.functional.pad(x, (0, 0, lead, tail)) if lead or tail else x.contiguous()
    sums = padded.view(*x.shape[:-2], blocks, block, x.shape[-1]).sum(dim=-2)
    index = torch.arange(blocks * block, device=x.device).view(blocks, block) + (start - lead)
    present = ((index >= start) & (index < start + x.shape[-2])).sum(dim=-1).clamp(min=1)
    return sums / present.to(x.dtype)[:, None]


class BlockEstimator:
    """A way of guessing block attention masses; subclasses are frozen dataclasses registered in ESTIMATORS."""

    name: ClassVar[str]

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> BlockEstimator:
        expect_fields(spec, 0)
        return cls()

    @property
    def spec(self) -> str:
        """The canonical spec, `ESTIMATORS.parse(e.spec) == e`."""
        return self.name

    def log_mass(self, query: torch.Tensor, key: torch.Tensor, grid: BlockGrid, *, scaling: float,
                 layer_idx: int) -> torch.Tensor:
        """Block log-masses (B, Hkv, Qb, Kb) float32 for query (B, H, Q, D) and key (B, Hkv, K, D).

        Only entries visible under `grid.causal()` are read; -inf marks a block guessed to hold no mass.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class ChunkedEstimator(BlockEstimator):
    """An estimator whose one keyword, `chunk=C` (C >= 1, default `default_chunk`), sets how much of the call one
    pass works on: memory, never the result."""

    chunk: int | None = None
    default_chunk: ClassVar[int] = 1
    chunk_unit: ClassVar[str] = "queries"

    def __post_init__(self) -> None:
        if self.chunk is None:
            object.__setattr__(self, "chunk", self.default_chunk)
        if self.chunk < 1:
            raise AttnsparseError(f"{self.name}:chunk={self.chunk}: give a chunk of >= 1 {self.chunk_unit}")

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> ChunkedEstimator:
        expect_fields(spec, 0, keywords=("chunk",))
        return cls(int(spec.kwargs.get("chunk", cls.default_chunk)))

    @property
    def spec(self) -> str:
        return self.name if self.chunk == self.default_chunk else f"{self.name}:chunk={self.chunk}"


def group_mean_log(log_mass: torch.Tensor, groups: int, causal: torch.Tensor) -> torch.Tensor:
    """Per query head log-masses (B, H, Qb, Kb) -> per kv group (B, Hkv, Qb, Kb): each head's row normalised over
    its visible blocks, then the mean mass of the group's G heads (in log). With one head a group, the log-masses
    themselves (they need no normalising or masking: readers normalise each row over its visible blocks)."""
    if groups == 1:
        return log_mass
    batch, heads, rows, cols = log_mass.shape
    probs = torch.softmax(log_mass.masked_fill(~causal, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs.view(batch, heads // groups, groups, rows, cols).mean(dim=2).log()


@dataclass(frozen=True)
class Density:
    """Keep `round(density x causal block pairs)` blocks per (batch, kv group), forced blocks included."""

    density: float

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise AttnsparseError(f"block density must be in (0, 1], got {self.density}")


@dataclass(frozen=True)
class Mass:
    """Per query block, keep the fewest blocks whose estimated mass reaches `gamma` (FlexPrefill's threshold)."""

    gamma: float

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma <= 1.0:
            raise AttnsparseError(f"cumulative mass threshold must be in (0, 1], got {self.gamma}")


Budget = Density | Mass


def forced_blocks(grid: BlockGrid, sink: int, local: int, device: torch.device | None = None) -> torch.Tensor:
    """(Qb, Kb) bool: the first `sink` key blocks, and the key blocks of the `local` query-block spans ending at the
    diagonal (with equal block sizes: the `local` blocks ending at the diagonal), where visible."""
    causal = grid.causal(device)
    cols = torch.arange(grid.key_blocks, device=device)[None, :]
    local_start = grid.diagonal_start(device)[:, None] - (local - 1) * grid.ratio
    return causal & ((cols < sink) | (cols >= local_start))


def select_blocks(log_mass: torch.Tensor, grid: BlockGrid, budget: Budget, *, sink: int = 1,
                  local: int = 1) -> torch.Tensor:
    """Kept-block mask (B, Hkv, Qb, Kb) bool from block log-masses: causal; forced blocks always; then the rest.

    `Density`: the remaining budget (round(density x causal pairs) minus the forced blocks, at least 0) goes to the
    blocks of highest estimated mass over the whole map of a (batch, kv group), which keeps the most estimated mass
    (summed over query blocks) any selection of that size can; ties go to the earlier (row, column). `Mass`: per
    query block, blocks in order of estimated mass (forced first) until the kept mass reaches gamma.
    """
    causal = grid.causal(log_mass.device)
    forced = forced_blocks(grid, sink, local, log_mass.device)
    probs = torch.softmax(log_mass.float().masked_fill(~causal, float("-inf")), dim=-1).nan_to_num(0.0)
    if isinstance(budget, Density):
        return _select_density(probs, causal, forced, budget.density, grid)
    return _select_mass(probs, causal, forced, budget.gamma)


def density_budget(grid: BlockGrid, density: float) -> int:
    """Blocks a density keeps per (batch, kv group): round(density x causal pairs), at least one."""
    return max(1, math.floor(density * grid.causal_pairs() + 0.5))


def _select_density(probs: torch.Tensor, causal: torch.Tensor, forced: torch.Tensor, density: float,
                    grid: BlockGrid) -> torch.Tensor:
    batch, heads, rows, cols = probs.shape
    extra = max(0, density_budget(grid, density) - int(forced.sum()))
    keep = forced.expand(batch, heads, rows, cols).clone()
    if extra == 0:
        return keep
    candidates = (causal & ~forced).expand_as(probs)
    ranked = probs.masked_fill(~candidates, -1.0).reshape(batch, heads, -1)
    # the first `extra` of a stable descending sort, without sorting: everything at or above the extra-th largest value
    # (topk finds it ~10x faster than a sort of the map), unless that takes more than `extra` (ties at the value),
    # when the earliest of the tied entries fill what is left
    extra = min(extra, ranked.shape[-1])
    threshold = torch.topk(ranked, extra, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    chosen = ranked >= threshold
    if bool((torch.count_nonzero(chosen, dim=-1) > extra).any()):  # ties at the threshold left out: the earliest
        above = ranked > threshold
        ties = ranked == threshold
        chosen = above | (ties & (ties.cumsum(dim=-1) <= extra - above.sum(dim=-1, keepdim=True)))
    return keep | (chosen.view_as(keep) & candidates)


def _select_mass(probs: torch.Tensor, causal: torch.Tensor, forced: torch.Tensor, gamma: float) -> torch.Tensor:
    forced = forced.expand_as(probs)
    # forced blocks sort first (key 2 + mass), then candidates by mass; invisible blocks last
    key = torch.where(forced, probs + 2.0, torch.where(causal, probs, torch.full_like(probs, -1.0)))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    sorted_mass = probs.gather(-1, order)
    before = sorted_mass.cumsum(dim=-1) - sorted_mass  # mass kept before each block is added
    take = (before < gamma - 1e-6) | forced.gather(-1, order)
    take &= causal.expand_as(probs).gather(-1, order)
    return torch.zeros_like(take).scatter_(-1, order, take)


def expand_to_keys(blocks: torch.Tensor, grid: BlockGrid, positions: torch.Tensor, width: int,
                   groups: int) -> torch.Tensor:
    """Token-level kept mask (B, H, Qc, width) for queries at `positions` from a block mask (B, Hkv, Qb, Kb)."""
    rows = blocks[:, :, grid.query_block_of(positions.to(blocks.device))]  # (B, Hkv, Qc, Kb)
    columns = torch.div(torch.arange(width, device=blocks.device), grid.key_block, rounding_mode="floor")
    tokens = rows[..., columns]  # (B, Hkv, Qc, width)
    batch, kv_heads, chunk, _ = tokens.shape
    return tokens[:, :, None].expand(batch, kv_heads, groups, chunk, width).reshape(batch, kv_heads * groups,
                                                                                   chunk, width)


def parse_estimator(spec: str | BlockEstimator) -> BlockEstimator:
    """An estimator from its spec (`antidiag`, `mean`, ...); an instance passes through."""
    return spec if isinstance(spec, BlockEstimator) else ESTIMATORS.parse(spec)
