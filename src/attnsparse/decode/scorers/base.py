"""What a block scorer is, and the registry of scorers (`block:B:BUDGET:SCORE` names one).

A scorer decides which blocks block top-k reads. It owns the selection data the store keeps beside the keys (one
tensor whose layout only the scorer knows): how it is allocated and grown, how it is updated when tokens are
appended, how it scores the blocks for a query, and the bytes a decode step reads from it. A scorer is a frozen
dataclass of its parameters; its spec is its name with its one integer parameter, if any, written right after it
(`mean`, `channels24`). Adding a scorer is one file in this package that subclasses `BlockScorer` and registers it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from attnsparse.errors import AttnsparseError
from attnsparse.specs import ParsedSpec, Registry, expect_fields

SCORERS: Registry[BlockScorer] = Registry("block score")
SCORER_TYPES: dict[str, type[BlockScorer]] = {}


def register_scorer(name: str, usage: str, help: str) -> Callable[[type], type]:
    """Class decorator: the scorer is parsed from specs named `name` and rebuilt from plan entries with `score: name`."""

    def add(cls: type) -> type:
        cls.name = name  # type: ignore[attr-defined]
        SCORERS.register(name, usage, help)(cls)
        SCORER_TYPES[name] = cls
        return cls

    return add


class BlockScorer:
    """Base of every block scorer. `data` below is the scorer's own tensor, held by the store between calls;
    `key_blocks` is the store's key buffer viewed as (B, h, capacity / block, block, D)."""

    name: ClassVar[str]

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> BlockScorer:
        """A scorer without parameters; scorers with one override this."""
        expect_fields(spec, 0)
        return cls()

    @property
    def spec(self) -> str:
        return self.name

    def fields(self) -> dict[str, Any]:
        """The scorer's parameters as they are written in a plan entry (beside `"score": name`)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}  # type: ignore[arg-type]

    def bind(self, layer: int, heads: list[int]) -> BlockScorer:
        """The scorer the store of kv heads `heads` of decoder layer `layer` uses: itself, unless the scorer has
        per-layer parameters (the learned gate picks that layer's weights here)."""
        return self

    def grow(self, old: torch.Tensor, key_blocks: torch.Tensor, n: int) -> torch.Tensor:
        """The selection data for the (new, larger) key buffer `key_blocks`, holding what `old` held for n tokens
        (`old` is an empty tensor at the first allocation, when n is 0)."""
        raise NotImplementedError

    def update(self, data: torch.Tensor, key_blocks: torch.Tensor, keys: torch.Tensor, start: int) -> None:
        """Bring `data` up to date after keys (B, h, Q, D) were stored at positions start..start + Q (in place)."""
        raise NotImplementedError

    def scores(self, data: torch.Tensor, key_blocks: torch.Tensor, q: torch.Tensor, n: int) -> torch.Tensor:
        """Score of every block for query q (B, h, G, D), one per kv head (max over its G heads): (B, h, ceil(n / block))."""
        raise NotImplementedError

    def decode(self, q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor, data: torch.Tensor,
               n: int, count: int, sink_blocks: int, recent_blocks: int, scaling: float) -> torch.Tensor | None:
        """Selection and attention in one compiled call, or None (the default): `scores` + block attention is used."""
        return None

    def bytes_read(self, n: int, block: int, selected: int, dim: int, itemsize: int) -> int:
        """Bytes one decode step reads for one kv head: this scorer's data plus keys and values of the selected blocks."""
        raise NotImplementedError


def parse_scorer(text: str) -> BlockScorer:
    """`mean`, `bound`, `channels24`: a registered name, optionally followed directly by its integer parameter."""
    match = re.fullmatch(r"(.*?)(\d*)", text.strip().lower())
    name, number = match.groups() if match else (text, "")
    return SCORERS.parse(f"{name}:{number}" if number else name)


def scorer_from_fields(name: str, fields: dict[str, Any]) -> BlockScorer:
    """The scorer of a plan entry: `"score": name` and the scorer's own fields (the rest of the entry)."""
    cls = SCORER_TYPES.get(name)
    if cls is None:
        raise AttnsparseError(f"unknown block score '{name}'; {SCORERS.usage()}")
    unknown = set(fields) - {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise AttnsparseError(f"block score '{name}' has no fields {sorted(unknown)}")
    return cls(**fields)


def grow_per_block(old: torch.Tensor, key_blocks: torch.Tensor, n: int, vectors: int) -> torch.Tensor:
    """Zeroed (B, h, capacity / block, vectors * D) for scorers keeping `vectors` summary vectors per block."""
    batch, heads, blocks, size, dim = key_blocks.shape
    data = key_blocks.new_zeros(batch, heads, blocks, vectors * dim)
    used = -(-n // size)
    if used:
        data[:, :, :used] = old[:, :, :used]
    return data


def touched_blocks(key_blocks: torch.Tensor, start: int, stop: int) -> tuple[slice, torch.Tensor, torch.Tensor]:
    """Blocks holding positions start..stop: their slice, their keys (B, h, C, block, D) and which are valid (C, block, 1)."""
    size = key_blocks.shape[-2]
    first, last = start // size, -(-stop // size)
    valid = (torch.arange(first * size, last * size, device=key_blocks.device) < stop).view(last - first, size, 1)
    return slice(first, last), key_blocks[:, :, first:last], valid
