"""What every condensation loss is: a frozen dataclass of its parameters, registered by name in `LOSSES`.

Specs are keyword-only (`tail:k=16`, `adaptive:alpha=1.0,C=0.5`); every parameter has a default, so a bare name
(`entropy`) is a valid spec. `from_spec` and `spec` are generic over the dataclass fields and their types, so a
new loss writes only its fields, their checks and its row function.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, ClassVar, get_type_hints

from torch import Tensor

from attnsparse.condense.losses.rows import RowLoss
from attnsparse.errors import AttnsparseError
from attnsparse.specs import ParsedSpec, Registry

LOSSES: Registry[CondensationLoss] = Registry(
    "condensation loss", extra_help=" (every field is optional; see docs/losses.md)"
)


class CondensationLoss:
    """A differentiable penalty that pushes each attention row's mass into few keys; call it on (probs, visible)."""

    name: ClassVar[str]

    def __call__(self, probs: Tensor, visible: Tensor) -> RowLoss:
        """Per-row loss values and the rows taking part."""
        raise NotImplementedError

    def with_budget(self, k: int) -> CondensationLoss:
        """This loss at key budget k (training anneals k); losses without a budget ignore it."""
        return self

    def diagnostic_k(self, default: int) -> int | None:
        """The k whose top-k mass the regularizer reports; None when the loss value is itself a top-k tail mass."""
        return default

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> CondensationLoss:
        if spec.args:
            raise AttnsparseError(f"expected key=value, got '{spec.args[0]}'")
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        types = get_type_hints(cls)
        values: dict[str, Any] = {}
        for key, text in spec.kwargs.items():
            if key not in names:
                raise AttnsparseError(f"{spec.name} has no parameter '{key}' (parameters: {', '.join(names) or 'none'})")
            values[key] = parse_value(key, text, types[key])
        return cls(**values)

    @property
    def spec(self) -> str:
        """The canonical spec (round-trips through `parse_loss`), for config.json and logs."""
        parts = [f"{f.name}={format_value(getattr(self, f.name))}" for f in fields(self)]  # type: ignore[arg-type]
        return f"{self.name}:{','.join(parts)}" if parts else self.name


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def parse_value(key: str, text: str, kind: type) -> Any:
    """Convert one `key=value` of a spec to the field's type (bool, int or finite float), with a one-line error."""
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    except ValueError:
        raise AttnsparseError(f"{key}={text!r} is not a valid {kind.__name__}") from None
