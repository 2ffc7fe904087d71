"""`block:B:BUDGET[:SCORE]` (Quest-style, Tang et al. 2024): keys in blocks of B tokens, each step reads the best.

Each step keeps the first `sink_blocks` and the last `recent_blocks` (including the one being filled), then the
blocks with the highest score, BUDGET tokens in all (or, written with a decimal point, a density of the context).
SCORE names a block scorer (`attnsparse.decode.scorers`: `mean` by default, `bound`, `channelsR`), which keeps its
own selection data in the store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from attnsparse.decode import kernels as K
from attnsparse.decode.policies.base import HeadPolicy, register_policy
from attnsparse.decode.scorers import SCORERS, BlockScorer, MeanScore, parse_scorer, scorer_from_fields
from attnsparse.decode.stores import BlockStore
from attnsparse.errors import AttnsparseError
from attnsparse.specs import ParsedSpec, expect_fields

SCORE_USAGE = "|".join(usage for usage, _ in SCORERS.help_table())


@register_policy("block", f"block:B:BUDGET[:{SCORE_USAGE}] (BUDGET in tokens, or a density such as 0.0625)",
                 "blocks of B tokens, each step reads the best-scored blocks, BUDGET tokens in all")
@dataclass(frozen=True)
class BlockPolicy(HeadPolicy):
    block_size: int = 16
    budget: int = 0  # tokens kept per step (0: use density)
    density: float = 0.0  # fraction of the context kept per step (used when budget == 0)
    sink_blocks: int = 1  # first blocks always kept
    recent_blocks: int = 2  # last blocks (including the one being filled) always kept
    score: BlockScorer = field(default_factory=MeanScore)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise AttnsparseError(f"block size must be >= 1, got {self.block_size}")
        if self.budget < 0 or not 0.0 <= self.density <= 1.0 or (self.budget == 0 and self.density <= 0.0):
            raise AttnsparseError("block policy needs a token budget >= 1 or a density in (0, 1]")
        if self.sink_blocks < 0 or self.recent_blocks < 1:
            raise AttnsparseError("block policy needs sink_blocks >= 0 and recent_blocks >= 1")

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> BlockPolicy:
        expect_fields(spec, (2, 3))
        size, budget = int(spec.args[0]), spec.args[1]
        score = parse_scorer(spec.args[2]) if len(spec.args) == 3 else MeanScore()
        if "." in budget:
            return cls(size, density=float(budget), score=score)
        return cls(size, budget=int(budget), score=score)

    @property
    def spec(self) -> str:
        score = "" if self.score == MeanScore() else f":{self.score.spec}"
        return f"block:{self.block_size}:{self.budget if self.budget else self.density}{score}"

    def to_dict(self) -> dict[str, Any]:
        """The block fields, `score` (the scorer's name), then the scorer's own fields."""
        own = super().to_dict()
        return own | {"score": self.score.name} | self.score.fields()

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> BlockPolicy:
        own = {name: fields[name] for name in cls.__dataclass_fields__ if name in fields and name != "score"}
        rest = {name: value for name, value in fields.items() if name not in own and name != "score"}
        return cls(**own, score=scorer_from_fields(str(fields.get("score", "mean")), rest))

    def selected_blocks(self, n: int) -> int:
        """Blocks attended to at context n (at least sink + recent, at most all)."""
        total = math.ceil(n / self.block_size)
        tokens = self.budget if self.budget else math.ceil(self.density * n)
        wanted = max(math.ceil(tokens / self.block_size), self.sink_blocks + self.recent_blocks)
        return min(total, wanted)

    def store(self, heads: list[int]) -> BlockStore:
        return BlockStore(self, heads)

    def attend(self, store: BlockStore, q: torch.Tensor, scaling: float) -> torch.Tensor:  # type: ignore[override]
        """The scorer's compiled selection + attention where it has one, else its scores, then block attention."""
        n, key_blocks, value_blocks = store.n, store.key_blocks(), store.value_blocks()
        out = store.scorer.decode(q, key_blocks, value_blocks, store.selection, n, self.selected_blocks(n),
                                self.sink_blocks, self.recent_blocks, scaling)
        return K.block_decode(q, key_blocks, value_blocks, store.select(q), n, scaling) if out is None else out

    def bytes_read(self, n: int, dim: int, itemsize: int, groups: int) -> int:
        return self.score.bytes_read(n, self.block_size, self.selected_blocks(n), dim, itemsize)
