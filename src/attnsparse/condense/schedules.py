"""Step schedules for condensation training: k annealing, λ schedules and the constrained (Lagrangian) λ.

All of them are functions of the optimizer step (0-based: the step about to be taken) or, for the constrained
controller, of a small state that is saved in every checkpoint, so a resumed run follows the same path as an
uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from attnsparse.errors import AttnsparseError

KSchedule = Literal["constant", "geometric", "linear"]
LambdaSchedule = Literal["constant", "warmup", "linear"]
K_SCHEDULES: tuple[str, ...] = ("constant", "geometric", "linear")
LAMBDA_SCHEDULES: tuple[str, ...] = ("constant", "warmup", "linear")


def _progress(step: int, steps: int) -> float:
    """Fraction of a ramp of `steps` steps done at `step` (1.0 once finished; a 0-step ramp is done at once)."""
    if steps <= 0:
        return 1.0
    return min(1.0, max(0.0, step / steps))


def k_at(step: int, target: int, start: int | None = None, anneal_steps: int = 0,
         kind: KSchedule = "geometric") -> int:
    """The top-k budget at `step`: from `start` down to `target` over `anneal_steps` steps, then `target`.

    Annealing from a large k lets early training concentrate mass loosely before the tight target budget;
    `geometric` halves k at a constant rate (k is a scale parameter), `linear` steps it down evenly.
    """
    if target < 1:
        raise AttnsparseError(f"k must be >= 1, got {target}")
    if kind not in K_SCHEDULES:
        raise AttnsparseError(f"unknown k schedule '{kind}'; choose one of {', '.join(K_SCHEDULES)}")
    if kind == "constant" or start is None or start == target:
        return target
    if start < target:
        raise AttnsparseError(f"k annealing starts at k={start}, below the target k={target}; it anneals downwards")
    t = _progress(step, anneal_steps)
    if kind == "geometric":
        value = start * (target / start) ** t
    else:
        value = start + (target - start) * t
    return max(target, min(start, round(value)))


def lambda_at(step: int, lam: float, kind: LambdaSchedule = "constant", ramp_steps: int = 0,
              total_steps: int | None = None) -> float:
    """The condensation weight λ at `step`.

    `constant`: λ throughout. `warmup`: 0 → λ linearly over `ramp_steps`, then λ (lets the LM loss settle
    first). `linear`: 0 → λ linearly over the whole run (`total_steps`).
    """
    if not (lam >= 0 and math.isfinite(lam)):
        raise AttnsparseError(f"λ must be a finite number >= 0, got {lam}")
    if kind not in LAMBDA_SCHEDULES:
        raise AttnsparseError(f"unknown λ schedule '{kind}'; choose one of {', '.join(LAMBDA_SCHEDULES)}")
    if kind == "constant":
        return lam
    if kind == "warmup":
        return lam * _progress(step + 1, ramp_steps)
    if total_steps is None or total_steps < 1:
        raise AttnsparseError("the linear λ schedule needs the total number of steps")
    return lam * _progress(step + 1, total_steps)


@dataclass
class ConstrainedLambda:
    """λ adapted so that the LM loss stays within `margin` nats of the original model's (GECO-style).

    The problem is: minimise L_cond subject to L_LM ≤ L_orig + margin. With a multiplier μ on the constraint the
    Lagrangian is L_cond + μ·(L_LM − L_orig − margin), i.e. (up to scale) L_LM + λ·L_cond with λ = 1/μ. Dual
    ascent on μ is multiplicative on λ: after every step, with ĝ an exponential moving average of the excess
    g = L_LM − L_orig − margin,

        λ ← clip(λ · exp(−rate · ĝ), lam_min, lam_max),   |rate · ĝ| capped at `max_log_step`

    so λ shrinks while the LM loss is over budget and grows while it is under. The state is four numbers and is
    saved with every checkpoint (`state_dict` / `load_state_dict`).
    """

    lam: float
    margin: float
    baseline: float | None = None  # L_orig; None until measured
    rate: float = 1.0
    ema: float = 0.9
    lam_min: float = 1e-4
    lam_max: float = 1e4
    max_log_step: float = 0.05
    excess_ema: float | None = None
    updates: int = 0

    def __post_init__(self) -> None:
        if not (self.margin >= 0 and math.isfinite(self.margin)):
            raise AttnsparseError(f"constrained margin must be a finite number >= 0 nats, got {self.margin}")
        if not (self.lam > 0 and math.isfinite(self.lam)):
            raise AttnsparseError(f"constrained mode needs an initial λ > 0, got {self.lam}")
        if not (self.rate > 0 and 0 <= self.ema < 1 and 0 < self.lam_min <= self.lam_max):
            raise AttnsparseError("constrained λ: need rate > 0, 0 <= ema < 1 and 0 < lam_min <= lam_max")
        self.lam = min(max(self.lam, self.lam_min), self.lam_max)

    def update(self, lm_loss: float, baseline: float | None = None) -> float:
        """One dual step from this step's LM loss (and, if given, this batch's original-model LM loss)."""
        reference = self.baseline if baseline is None else baseline
        if reference is None:
            raise AttnsparseError("constrained λ: the original model's LM loss was never measured")
        excess = lm_loss - reference - self.margin
        self.excess_ema = excess if self.excess_ema is None else self.ema * self.excess_ema + (1 - self.ema) * excess
        log_step = max(-self.max_log_step, min(self.max_log_step, -self.rate * self.excess_ema))
        self.lam = min(max(self.lam * math.exp(log_step), self.lam_min), self.lam_max)
        self.updates += 1
        return self.lam

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key in self.__dataclass_fields__:
                setattr(self, key, value)
