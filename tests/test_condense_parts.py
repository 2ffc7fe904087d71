"""Pure parts of condense: k and λ schedules, the constrained λ, LM and distillation losses, config checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnsparse.condense.config import PRESETS, REFINES, CondenseConfig, preset_config
from attnsparse.condense.distill import distillation_kl, lm_loss
from attnsparse.condense.schedules import ConstrainedLambda, k_at, lambda_at
from attnsparse.errors import AttnsparseError


def test_k_schedules() -> None:
    assert [k_at(s, 16) for s in (0, 5, 100)] == [16, 16, 16]
    geometric = [k_at(s, 16, 256, 4, "geometric") for s in range(6)]
    assert geometric == [256, 128, 64, 32, 16, 16]
    linear = [k_at(s, 10, 50, 4, "linear") for s in range(6)]
    assert linear == [50, 40, 30, 20, 10, 10]
    assert k_at(3, 16, 64, 0) == 16  # a 0-step anneal is done at once
    assert all(a >= b for a, b in itertools.pairwise(geometric))
    with pytest.raises(AttnsparseError, match="below the target"):
        k_at(0, 16, 8, 10)
    with pytest.raises(AttnsparseError, match="k schedule"):
        k_at(0, 16, 32, 10, "cosine")  # type: ignore[arg-type]


def test_lambda_schedules() -> None:
    assert lambda_at(0, 2.0) == 2.0
    assert [lambda_at(s, 2.0, "warmup", 4) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert lambda_at(9, 1.0, "linear", total_steps=10) == 1.0
    assert lambda_at(4, 1.0, "linear", total_steps=10) == pytest.approx(0.5)
    with pytest.raises(AttnsparseError):
        lambda_at(0, -1.0)
    with pytest.raises(AttnsparseError):
        lambda_at(0, 1.0, "linear")


def test_constrained_lambda_moves_against_the_excess() -> None:
    c = ConstrainedLambda(lam=1.0, margin=0.1, baseline=3.0, rate=1.0, ema=0.0, max_log_step=10.0)
    # LM loss 3.3: excess 0.2 nats over the 0.1 margin -> λ shrinks by exp(-0.2)
    assert c.update(3.3) == pytest.approx(math.exp(-0.2))
    # LM loss 3.0: 0.1 under budget -> λ grows by exp(0.1)
    assert c.update(3.0) == pytest.approx(math.exp(-0.2) * math.exp(0.1))
    # a per-batch reference (the teacher's loss) replaces the baseline
    before = c.lam
    assert c.update(5.0, baseline=4.9) == pytest.approx(before)  # excess exactly the margin: no change


def test_constrained_lambda_ema_clip_and_state() -> None:
    c = ConstrainedLambda(lam=1.0, margin=0.0, baseline=1.0, ema=0.5, max_log_step=0.05, lam_max=1.02)
    c.update(2.0)  # excess 1 -> ema 1 -> capped log step -0.05
    assert c.excess_ema == 1.0 and c.lam == pytest.approx(math.exp(-0.05))
    c.update(1.0)  # excess 0 -> ema 0.5
    assert c.excess_ema == 0.5
    for _ in range(50):
        c.update(0.0)  # far under budget: grows, but never beyond lam_max
    assert c.lam == pytest.approx(1.02)
    restored = ConstrainedLambda(lam=5.0, margin=0.3)
    restored.load_state_dict(c.state_dict())
    assert restored == c
    with pytest.raises(AttnsparseError, match="never measured"):
        ConstrainedLambda(lam=1.0, margin=0.1).update(1.0)
    with pytest.raises(AttnsparseError):
        ConstrainedLambda(lam=0.0, margin=0.1)


def _brute_kl(student: torch.Tensor, teacher: torch.Tensor, t: float, mask: torch.Tensor | None) -> float:
    total, count = 0.0, 0
    batch, length, _ = student.shape
    for b in range(batch):
        for i in range(length - 1):
            if mask is not None and not (mask[b, i] and mask[b, i + 1]):
                continue
            p = torch.softmax(teacher[b, i].double() / t, -1)
            q = torch.softmax(student[b, i].double() / t, -1)
            total += float((p * (p.log() - q.log())).sum())
            count += 1
    return total / count * t * t


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_kl_matches_brute_force(temperature: float) -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 7, 11) * 3, torch.randn(2, 7, 11) * 3
    assert float(distillation_kl(student, teacher, temperature)) == pytest.approx(
        _brute_kl(student, teacher, temperature, None), rel=1e-5)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    assert float(distillation_kl(student, teacher, temperature, mask)) == pytest.approx(
        _brute_kl(student, teacher, temperature, mask), rel=1e-5)
    assert float(distillation_kl(teacher, teacher, temperature)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_kl_gradient_and_shape_check() -> None:
    student = torch.randn(1, 4, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: distillation_kl(s, teacher, 1.5).double(), (student,))
    with pytest.raises(AttnsparseError, match="vocabulary"):
        distillation_kl(torch.randn(1, 4, 5), torch.randn(1, 4, 6))


def test_lm_loss_matches_brute_force() -> None:
    torch.manual_seed(1)
    logits, ids = torch.randn(2, 6, 9), torch.randint(0, 9, (2, 6))
    brute = -sum(float(torch.log_softmax(logits[b, i], -1)[ids[b, i + 1]]) for b in range(2) for i in range(5)) / 10
    assert float(lm_loss(logits, ids)) == pytest.approx(brute, rel=1e-6)


def test_config_validation_and_presets() -> None:
    CondenseConfig().validate()
    assert CondenseConfig(k=8).loss_spec() == "tail:k=8"
    assert CondenseConfig(loss="softcount:eps=0.02").loss_spec(4) == "softcount:k=4,eps=0.02,tau=0.002,normalize=true"
    assert CondenseConfig(loss="adaptive:alpha=2.0,C=0.4").loss_spec() == "adaptive:alpha=2.0,C=0.4"
    bad = [{"k": 0}, {"loss": "tail:k=3"}, {"loss": "nope"}, {"k_start": 4, "k": 8}, {"distill": "kl"},
           {"trainable": "mlp"}, {"margin": -1.0}, {"margin": 0.1, "lambda_schedule": "warmup"}, {"steps": 0},
           {"lr": 0.0}, {"layers": [-1]}]
    for settings in bad:
        with pytest.raises(AttnsparseError):
            CondenseConfig(**settings).validate()
    for name in PRESETS:
        preset_config(name, model="runs/start/model" if name in REFINES else None).validate()
    with pytest.raises(AttnsparseError, match="refines a model condensed by preset 'smollm2-keep-all-top8-2k'"):
        preset_config("smollm2-keep-all-top8-4k-refine")
    refine = preset_config("smollm2-keep-all-top8-4k-refine", model="runs/start/model")
    assert (refine.model, refine.teacher, refine.seq_len, refine.k_start, refine.k) == \
        ("runs/start/model", "smollm2-135m", 4096, 8, 8)
    assert preset_config("smollm2-cpu-15min", steps=10).steps == 10
    with pytest.raises(AttnsparseError, match="unknown preset"):
        preset_config("nope")
    config = CondenseConfig(k=8, layers=[0, 1])
    assert CondenseConfig.from_json(config.to_json()) == config
