"""Block selection for block-sparse prefill: estimators of block attention mass and the rule that keeps blocks.

Each estimator is one file here, a frozen dataclass registered by name in `ESTIMATORS` (imported below);
`select_blocks` turns any estimator's block log-masses into a kept-block mask (see base.py for the geometry and
the head axis: one selection per kv group).
"""

from __future__ import annotations

from attnsparse.attention.selection.antidiag import Antidiagonal
from attnsparse.attention.selection.base import (
    ESTIMATORS,
    BlockEstimator,
    BlockGrid,
    Budget,
    Density,
    Mass,
    density_budget,
    expand_to_keys,
    forced_blocks,
    group_mean_log,
    parse_estimator,
    select_blocks,
)
from attnsparse.attention.selection.exact import ExactMass
from attnsparse.attention.selection.gate import GateEstimator
from attnsparse.attention.selection.mean import MeanKey
from attnsparse.attention.selection.meanquery import MeanQuery
from attnsparse.attention.selection.vslash import VerticalSlash

__all__ = [
    "ESTIMATORS",
    "Antidiagonal",
    "BlockEstimator",
    "BlockGrid",
    "Budget",
    "Density",
    "ExactMass",
    "GateEstimator",
    "Mass",
    "MeanKey",
    "MeanQuery",
    "VerticalSlash",
    "density_budget",
    "expand_to_keys",
    "forced_blocks",
    "group_mean_log",
    "parse_estimator",
    "select_blocks",
]
