"""`blocksparse:B:D[:EST]` / `blockmass:B:G[:EST]`: block-sparse prefill, queries and keys in blocks of B.

B may also be `QxK`: queries in blocks of Q, keys in blocks of K (a divisor of Q), e.g. `blocksparse:64x4:0.1:mean`:
the selection is as fine as K on the key axis while the kernel still serves 64 queries at a time.

Per (query block, kv group) the sink block, the local blocks up to the diagonal and the best key blocks by the
estimator EST (attnsparse.attention.selection) are kept, up to a density D of causal block pairs (`blocksparse`)
or until their estimated mass reaches G (`blockmass`, FlexPrefill's cumulative threshold). Attention is exact
within the kept blocks. The selection is made once per attention call from the whole query and key
(`prepare`); the call is then served by the block kernel (`attend`) or, with observers, by the backend's
chunked path with the block mask expanded to keys (`keep_mask`), which observers see as `kept`.

Keyword fields: `sink=N` (first N key blocks, default 1), `local=N` (blocks ending at the diagonal, default 1),
`per=head` (one selection per query head instead of per kv group: the group's heads no longer share kept blocks,
so each head's budget follows its own pattern, and the kernel reads a kept block once per head instead of once per
group); any other keyword goes to the estimator (`blocksparse:64:0.1:antidiag:stride=16`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from attnsparse.attention.policies.base import POLICIES, Policy
from attnsparse.attention.selection import (
    BlockEstimator,
    BlockGrid,
    Budget,
    Density,
    Mass,
    density_budget,
    expand_to_keys,
    forced_blocks,
    parse_estimator,
    select_blocks,
)
from attnsparse.errors import AttnsparseError
from attnsparse.specs import ParsedSpec

DEFAULT_ESTIMATOR = "antidiag"
INT_KEYWORDS = ("sink", "local")
OWN_KEYWORDS = (*INT_KEYWORDS, "per")
SELECTION_UNITS = ("group", "head")


@dataclass
class SelectionStats:
    """Kept and causal block pairs summed over the selections a policy made (its achieved density)."""

    kept: int = 0
    pairs: int = 0

    def add(self, blocks: torch.Tensor, grid: BlockGrid) -> None:
        self.kept += int(torch.count_nonzero(blocks))
        self.pairs += grid.causal_pairs() * blocks.shape[0] * blocks.shape[1]


@dataclass(frozen=True)
class BlockSparse(Policy):
    block: int
    budget: Budget
    estimator: BlockEstimator
    sink: int = 1
    local: int = 1
    key_block: int = 0  # 0: the query block size
    per: str = "group"  # one selection per kv group, or per query head
    stats: SelectionStats = field(default_factory=SelectionStats, compare=False, hash=False, repr=False)
    name: ClassVar[str] = "blocksparse"

    def __post_init__(self) -> None:
        if self.block < 1 or self.sink < 0 or self.local < 1:
            raise AttnsparseError(f"need block >= 1, sink >= 0, local >= 1; got {self.block}, {self.sink}, "
                                  f"{self.local}")
        if self.per not in SELECTION_UNITS:
            raise AttnsparseError(f"per={self.per}: choose per=group (one selection per kv group) or per=head")
        if self.key_block == 0:
            object.__setattr__(self, "key_block", self.block)
        self.grid(1, 1)  # refuses key blocks that do not divide the query block

    def grid(self, queries: int, keys: int) -> BlockGrid:
        """The block grid of an attention call with these query and key counts."""
        return BlockGrid(self.block, queries, keys, self.key_block)

    @property
    def block_text(self) -> str:
        """`B`, or `QxK` when key blocks are smaller than query blocks."""
        return str(self.block) if self.key_block == self.block else f"{self.block}x{self.key_block}"

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> BlockSparse:
        return _from_spec(spec, mass=False)

    @property
    def spec(self) -> str:
        if isinstance(self.budget, Density):
            head = f"blocksparse:{self.block_text}:{self.budget.density:g}"
        else:
            head = f"blockmass:{self.block_text}:{self.budget.gamma:g}"
        text = f"{head}:{self.estimator.spec}"
        extras = [f"{k}={v}" for k, v in (("sink", self.sink), ("local", self.local)) if v != 1]
        extras += ["per=head"] if self.per == "head" else []
        if extras:
            text += ("," if "=" in self.estimator.spec else ":") + ",".join(extras)
        return text

    def prepare(self, query: torch.Tensor, key: torch.Tensor, *, scaling: float, layer_idx: int) -> Policy:
        grid = self.grid(query.shape[2], key.shape[2])
        if self.per == "head":  # the estimators then see one kv head per query head, and select per head
            key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        with torch.no_grad():
            log_mass = self.estimator.log_mass(query.detach(), key.detach(), grid, scaling=scaling,
                                               layer_idx=layer_idx)
            blocks = select_blocks(log_mass, grid, self.budget, sink=self.sink, local=self.local)
        self.stats.add(blocks, grid)
        return KeptBlocks(blocks, grid)

    def keep_mask(self, scores: torch.Tensor, visible: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
        raise AttnsparseError("blocksparse selects from the whole call: the backend calls prepare() first")

    def kept_per_row(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.to(torch.float64) * self.density(int(rows.max()) if rows.numel() else 1)

    def density(self, n: int) -> float:
        """Kept over causal **block** pairs: achieved over the selections made so far; before any, the density
        budget's nominal value at n (for `blockmass`, the forced blocks' share)."""
        if self.stats.pairs:
            return self.stats.kept / self.stats.pairs
        grid = self.grid(n, n)
        forced = int(forced_blocks(grid, self.sink, self.local).sum())
        kept = max(forced, density_budget(grid, self.budget.density)) if isinstance(self.budget, Density) else forced
        return min(kept, grid.causal_pairs()) / grid.causal_pairs()


def _from_spec(spec: ParsedSpec, *, mass: bool) -> BlockSparse:
    if len(spec.args) not in (2, 3):
        raise ValueError(f"{spec.name} takes 2 or 3 positional fields")
    own: dict = {k: int(v) for k, v in spec.kwargs.items() if k in INT_KEYWORDS}
    if "per" in spec.kwargs:
        own["per"] = spec.kwargs["per"]
    rest = {k: v for k, v in spec.kwargs.items() if k not in OWN_KEYWORDS}
    name = spec.args[2] if len(spec.args) == 3 else DEFAULT_ESTIMATOR
    estimator_text = name + (":" + ",".join(f"{k}={v}" for k, v in rest.items()) if rest else "")
    value = float(spec.args[1])
    budget: Budget = Mass(value) if mass else Density(value)
    query_block, _, key_block = str(spec.args[0]).partition("x")
    if key_block and int(key_block) < 1:
        raise AttnsparseError(f"key blocks must be positive, got {spec.args[0]} (write QxK, e.g. 64x4)")
    return BlockSparse(int(query_block), budget, parse_estimator(estimator_text), **own,
                       key_block=int(key_block) if key_block else 0)


POLICIES.add("blocksparse", lambda spec: _from_spec(spec, mass=False),
             usage="blocksparse:B:D[:EST] (block B or QxK, density D of causal block pairs, estimator EST)",
             help="block-sparse prefill: sink, local and the best key blocks up to a block density")
POLICIES.add("blockmass", lambda spec: _from_spec(spec, mass=True),
             usage="blockmass:B:G[:EST] (block B or QxK, cumulative estimated mass G per query block)",
             help="block-sparse prefill: key blocks in estimated-mass order until their mass reaches G")


@dataclass(frozen=True, eq=False)
class KeptBlocks(Policy):
    """One attention call's block selection: `blocks` (B, Hkv, Qb, Kb) bool on `grid` (B, H, ... under per=head)."""

    blocks: torch.Tensor
    grid: BlockGrid
    name: ClassVar[str] = "kept-blocks"

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.grid.block}x{self.grid.key_block}"

    def keep_mask(self, scores: torch.Tensor, visible: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
        groups = scores.shape[1] // self.blocks.shape[1]
        kept = expand_to_keys(self.blocks, self.grid, query_positions, scores.shape[-1], groups)
        return kept.expand_as(scores) & visible

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, *, scaling: float, causal: bool) -> torch.Tensor | None:
        if attention_mask is not None or not causal:
            return None
        from attnsparse.attention.blockattend import block_sparse_attention

        return block_sparse_attention(query, key, value, self.blocks, self.grid, scaling)

    def kept_per_row(self, rows: torch.Tensor) -> torch.Tensor:
        raise AttnsparseError("a kept-block selection belongs to one call; ask the blocksparse policy")
