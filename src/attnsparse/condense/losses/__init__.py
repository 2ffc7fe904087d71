"""Condensation losses: differentiable penalties that push each attention row's mass into few keys.

Each variant is one file here, a frozen dataclass of its parameters registered by name in `LOSSES` (formulas and
advice in docs/losses.md):

- `tail`       1 − (sum of the k largest probabilities), rows with n_i > k. The default: it is the
               total-variation distance to top-k attention, which bounds top-k attention's output error.
- `adaptive`   the same with a per-row k_i = ⌈α·n_i^C⌉, rows with n_i > k_i.
- `softcount`  a smooth count of entries above ε, beyond k, rows with n_i > k.
- `entropy`    Shannon entropy of the row (a baseline), rows with n_i ≥ 2.

`rows` holds the per-row result type and shared tensor helpers, `base` the loss base class and spec handling,
`regularizer` the attention observer that sums a loss over layers during training. Adding a loss means adding
its file and importing it below.
"""

from __future__ import annotations

from attnsparse.condense.losses.adaptive import Adaptive, adaptive_k, adaptive_topk_tail_mass
from attnsparse.condense.losses.base import LOSSES, CondensationLoss
from attnsparse.condense.losses.entropy import Entropy, entropy
from attnsparse.condense.losses.regularizer import CondensationRegularizer
from attnsparse.condense.losses.rows import RowLoss
from attnsparse.condense.losses.softcount import SoftCount, soft_count_excess, soft_indicator
from attnsparse.condense.losses.tail import Tail, topk_tail_mass

__all__ = [
    "LOSSES", "Adaptive", "CondensationLoss", "CondensationRegularizer", "Entropy", "RowLoss", "SoftCount", "Tail",
    "adaptive_k", "adaptive_topk_tail_mass", "entropy", "parse_loss", "soft_count_excess", "soft_indicator",
    "topk_tail_mass",
]


def parse_loss(spec: str | CondensationLoss) -> CondensationLoss:
    """Parse `tail:k=16`, `adaptive:alpha=1.0,C=0.5`, `softcount:k=16,eps=0.01,tau=0.002`, `entropy`.

    A bare variant name takes the defaults (tail k=16, adaptive α=1 C=0.5, softcount k=16 ε=0.01
    τ=0.002, normalize=true). Raises a one-line AttnsparseError for an unknown variant or key, a repeated key, a
    malformed pair or an out-of-range value, listing every registered loss.
    """
    return spec if isinstance(spec, CondensationLoss) else LOSSES.parse(spec)
