"""`budget:FILE.json`: top-k with a key budget per (layer, query head), read from a head-budget file.

One k for every head wastes keys: SmolLM2's layer 0 needs ~330 keys for 95 % of its mass at 1K while most later
heads need under 20. A head budget spends a stated average k unevenly (`attnsparse budget` allocates it from a
measured profile, see measure/budget.py). Each row of head h keeps its k_h largest scores (ties: the earlier key),
so a budget whose every k_h equals K is exactly `topk:K`. The condensation loss and the sparse-aware forward both
follow the same allocation (condense `--budget`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from attnsparse.attention.policies.base import POLICIES, Policy
from attnsparse.errors import AttnsparseError
from attnsparse.specs import ParsedSpec, expect_fields

BUDGET_FORMAT = "attnsparse-head-budget"


@POLICIES.register("budget", usage="budget:FILE.json",
                   help="top-k with one k per (layer, head) from a head-budget file (attnsparse budget)")
@dataclass(frozen=True)
class HeadBudget(Policy):
    """Per-(layer, query head) key budgets; `ks[layer][head]`. `path` is where it was read from (its spec)."""

    ks: tuple[tuple[int, ...], ...]
    path: str = ""
    name: ClassVar[str] = "budget"

    def __post_init__(self) -> None:
        if not self.ks or not self.ks[0]:
            raise AttnsparseError("a head budget needs at least one layer and one head")
        widths = {len(row) for row in self.ks}
        if len(widths) != 1:
            raise AttnsparseError(f"head budget rows have different head counts {sorted(widths)}")
        low = min(min(row) for row in self.ks)
        if low < 1:
            raise AttnsparseError(f"every head budget must be >= 1 key, got {low}")

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> HeadBudget:
        expect_fields(spec, 1)
        return read_budget(spec.args[0])

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.path}" if self.path else f"{self.name}:<in memory, mean k {self.mean_k:g}>"

    @property
    def layers(self) -> int:
        return len(self.ks)

    @property
    def heads(self) -> int:
        return len(self.ks[0])

    @property
    def mean_k(self) -> float:
        return sum(map(sum, self.ks)) / (self.layers * self.heads)

    def for_layer(self, layer_idx: int) -> Policy:
        if not 0 <= layer_idx < self.layers:
            raise AttnsparseError(f"head budget covers {self.layers} layers; layer {layer_idx} has none")
        return HeadTopK(self.ks[layer_idx])

    def keep_mask(self, scores: torch.Tensor, visible: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
        raise AttnsparseError("a head budget needs the layer: call for_layer(layer) first")

    def kept_per_row(self, rows: torch.Tensor) -> torch.Tensor:
        """Mean over (layer, head) of the keys kept by a query seeing `rows` keys."""
        ks = torch.tensor(self.ks, dtype=torch.float64, device=rows.device).flatten()
        return rows.to(torch.float64)[..., None].clamp(max=ks).mean(-1)

    def density(self, n: int) -> float:
        """Mean over heads of kept pairs over causal pairs (not rounded to whole pairs, unlike `kept_pairs`)."""
        return float(self.kept_per_row(torch.arange(1, n + 1, device="cpu")).sum()) / (n * (n + 1) / 2)

    def scaled(self, mean_k: float) -> HeadBudget:
        """The same allocation with every k_h multiplied so the mean is about `mean_k` (k annealing in training)."""
        factor = mean_k / self.mean_k
        ks = tuple(tuple(max(1, math.ceil(k * factor - 1e-9)) for k in row) for row in self.ks)
        return HeadBudget(ks)  # no longer the file's allocation, so no path in its spec

    def to_json(self, notes: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"format": BUDGET_FORMAT, "layers": self.layers, "heads": self.heads, "mean_k": self.mean_k,
                "ks": [list(row) for row in self.ks], "notes": notes or {}}


@dataclass(frozen=True)
class HeadTopK(Policy):
    """One layer of a head budget: head h keeps its `ks[h]` largest scores."""

    ks: tuple[int, ...]
    name: ClassVar[str] = "headtopk"

    @property
    def spec(self) -> str:
        return f"{self.name}:{'/'.join(map(str, self.ks))}"

    def keep_mask(self, scores: torch.Tensor, visible: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
        return head_topk_keep_mask(scores, visible, self.ks)

    def kept_per_row(self, rows: torch.Tensor) -> torch.Tensor:
        ks = torch.tensor(self.ks, dtype=torch.float64, device=rows.device)
        return rows.to(torch.float64)[..., None].clamp(max=ks).mean(-1)


def head_topk_keep_mask(scores: torch.Tensor, visible: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """`topk_keep_mask` with one k per head: scores (B, H, Q, K), ks of length H; ties go to the earlier key."""
    heads, width = scores.shape[1], scores.shape[-1]
    if len(ks) != heads:
        raise AttnsparseError(f"head budget has {len(ks)} heads for a layer with {heads}; make one for this model")
    visible = visible.expand_as(scores)
    top = min(max(ks), width)
    masked = scores.masked_fill(~visible, float("-inf"))
    values = masked.topk(top, dim=-1).values  # (B, H, Q, top), descending
    index = torch.tensor([min(k, width) - 1 for k in ks], device=scores.device).view(1, heads, 1, 1)
    threshold = values.gather(-1, index.expand(*values.shape[:-1], 1))
    above = masked > threshold
    at_threshold = (masked == threshold) & visible
    need = torch.tensor(ks, device=scores.device).view(1, heads, 1, 1)
    still_needed = need - above.sum(dim=-1, keepdim=True)
    return above | (at_threshold & (at_threshold.cumsum(dim=-1) <= still_needed))


def read_budget(path: str | Path) -> HeadBudget:
    """A head budget from its JSON file, with one-line errors for a missing or malformed file."""
    file = Path(path)
    if not file.is_file():
        raise AttnsparseError(f"head-budget file {path} does not exist; make one with `attnsparse budget PROFILE`")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AttnsparseError(f"head-budget file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or data.get("format") != BUDGET_FORMAT:
        raise AttnsparseError(f"{path} is not a head-budget file (expected \"format\": \"{BUDGET_FORMAT}\")")
    try:
        ks = tuple(tuple(int(k) for k in row) for row in data["ks"])
    except (KeyError, TypeError, ValueError):
        raise AttnsparseError(f"head-budget file {path} needs 'ks': a list of per-layer lists of integers") from None
    return HeadBudget(ks, str(path))
