"""Condensation that keeps the model: per-head budgets in training, and the synthetic retrieval/copy mixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnsparse.attention.policies import HeadBudget
from attnsparse.condense import CondenseConfig, condense
from attnsparse.condense.mixture import ATTRIBUTES, mix_synthetic
from attnsparse.condense.trainer import CondenseTrainer
from attnsparse.core.data import builtin_text
from attnsparse.errors import AttnsparseError

PROSE = builtin_text()


def test_training_follows_the_head_budget(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    budget_file = tmp_path / "budget.json"
    budget = HeadBudget(((1, 2, 3, 10), (4, 4, 4, 4)))
    budget_file.write_text(json.dumps(budget.to_json()))
    text = tmp_path / "train.txt"
    text.write_text(PROSE[:20000])
    config = CondenseConfig(model=str(tiny_dir), data=str(text), k=4, k_start=8, k_anneal_steps=2, steps=3,
                            batch_size=1, seq_len=48, lr=1e-3, lam=1.0, sparse_aware=True, budget=str(budget_file),
                            save_steps=3, warmup_steps=0, lr_scheduler="constant")
    seen: list[tuple[object, object]] = []
    original = CondenseTrainer.compute_loss

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append((self.backend_state.policy, self.regularizer.budget))
        return out

    monkeypatch.setattr(CondenseTrainer, "compute_loss", spy)
    result = condense(config, tmp_path / "run", progress=False)
    assert result.steps == 3
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [row["k"] for row in log][-1] == 4
    ks = [row["k"] for row in log]
    assert len(seen) == 3
    for (policy, used), k in zip(seen, ks):
        assert policy == used and policy.ks == budget.scaled(k).ks  # the sparse forward and the loss: one allocation
    assert seen[0][0].ks == ((2, 4, 6, 20), (8, 8, 8, 8))  # the allocation's shape at k_start = 8


def test_budget_needs_a_per_head_loss_and_a_readable_file(tmp_path: Path) -> None:
    with pytest.raises(AttnsparseError, match="does not exist"):
        CondenseConfig(budget=str(tmp_path / "none.json")).validate()
    budget_file = tmp_path / "b.json"
    budget_file.write_text(json.dumps(HeadBudget(((2, 2),)).to_json()))
    with pytest.raises(AttnsparseError, match="per-head"):
        CondenseConfig(budget=str(budget_file), loss="entropy").validate()
    with pytest.raises(AttnsparseError, match="--synthetic"):
        CondenseConfig(synthetic=1.0).validate()


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
def test_mixture_share_and_answers(share: float) -> None:
    mixed = mix_synthetic(PROSE, share, seed=3)
    assert mixed != PROSE and mixed.startswith(PROSE.split("\n")[0])
    natural = set(PROSE.split("\n"))
    added = [line for line in mixed.split("\n") if line not in natural]
    assert abs(sum(len(line) + 1 for line in added) / len(mixed) - share) < 0.02
    questions = [line for line in added if line.startswith("Question: what is ")]
    assert questions
    for doc_end in questions:  # the asked fact and its answer are stated in the document before the question
        fact, answer = doc_end.removeprefix("Question: what is ").split("? Answer: ")
        value = answer.removeprefix(fact + " is ").rstrip(".")
        assert f"Note that {fact} is {value}." in mixed
    assert mix_synthetic(PROSE, share, seed=3) == mixed and mix_synthetic(PROSE, share, seed=4) != mixed
    assert mix_synthetic(PROSE, 0.0) == PROSE


def test_mixture_templates_differ_from_every_evaluation_task() -> None:
    from attnsparse.evaluate import passkey

    prompts = " ".join(str(getattr(passkey, name)) for name in ("INTRO", "FILLER", "NEEDLE", "QUESTION"))
    try:
        from attnsparse.evaluate.tasks import templates
    except ImportError:
        templates = None
    if templates is not None:
        prompts += " ".join(templates())
    for attribute in ATTRIBUTES:
        assert attribute.split(" {")[0].removeprefix("the ") not in prompts.lower()
    assert "Question: what is" not in prompts and "The list again" not in prompts


def _dense_kl_to_original(model_dir: Path, original: Path, text: str) -> float:
    """KL(original ‖ model) of the two models' dense next-token distributions on `text` (eager, no backend)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attnsparse.condense.distill import distillation_kl

    ids = AutoTokenizer.from_pretrained(original)(text, return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        student = AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits
        teacher = AutoModelForCausalLM.from_pretrained(original)(ids).logits
    return float(distillation_kl(student, teacher))


def test_dense_weight_distils_the_dense_forward(tiny_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "train.txt"
    text.write_text(PROSE[:20000])
    settings = dict(model=str(tiny_dir), data=str(text), k=2, steps=6, batch_size=1, seq_len=48, lr=2e-2, lam=0.0,
                    sparse_aware=True, distill="only", save_steps=6, warmup_steps=0, lr_scheduler="constant")
    kl = {}
    for weight in (0.0, 4.0):
        out = tmp_path / f"run-{weight}"
        condense(CondenseConfig(**settings, dense_weight=weight), out, progress=False)
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        kl[weight] = _dense_kl_to_original(out / "model", tiny_dir, PROSE[20000:22000])
        assert log[0]["kd"] > 1e-4 and log[0]["cond"] > 0  # the sparse forward and its regularizer still run
        if weight:
            assert log[0]["kd_dense"] == pytest.approx(0.0, abs=1e-5)  # step 1: the student is the original, densely
            assert log[-1]["kd_dense"] > 0
    assert kl[4.0] < 0.5 * kl[0.0]  # the term holds the dense predictions near the original's


def test_dense_weight_needs_distillation_and_a_sparse_forward() -> None:
    with pytest.raises(AttnsparseError, match="--dense-weight"):
        CondenseConfig(dense_weight=1.0, distill="only").validate()
    with pytest.raises(AttnsparseError, match="--dense-weight"):
        CondenseConfig(dense_weight=1.0, sparse_aware=True).validate()
    with pytest.raises(AttnsparseError, match="dense weight"):
        CondenseConfig(dense_weight=-1.0, sparse_aware=True, distill="only").validate()
    CondenseConfig(dense_weight=1.0, sparse_aware=True, distill="only").validate()


def test_pull_toward_anchor_is_the_decoupled_step_on_random_weights() -> None:
    import torch

    from attnsparse.condense.anchor import pull_toward_anchor

    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(7)]
    anchors = [torch.randn(5, 3), torch.randn(7)]
    for share, expected_share in ((0.3, 0.3), (2.5, 1.0), (0.0, 0.0)):
        moved = [w.clone() for w in weights]
        pull_toward_anchor(list(zip(moved, anchors)), share)
        for before, after, anchor in zip(weights, moved, anchors):
            torch.testing.assert_close(after, before - expected_share * (before - anchor), rtol=0, atol=1e-6)


def _weight_distance(model_dir: Path, original: Path) -> float:
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    start = AutoModelForCausalLM.from_pretrained(original).state_dict()
    return sum(float((trained[name] - start[name]).pow(2).sum()) for name in start) ** 0.5


@pytest.mark.parametrize("distill", ["none", "only"])
def test_anchor_weight_pulls_the_trained_weights_to_the_original(tiny_dir: Path, tmp_path: Path,
                                                                  distill: str) -> None:
    text = tmp_path / "train.txt"
    text.write_text(PROSE[:20000])
    lr = 1e-2
    settings = {"model": str(tiny_dir), "data": str(text), "k": 2, "steps": 4, "batch_size": 1, "seq_len": 48,
                "lr": lr, "lam": 1.0, "sparse_aware": True, "distill": distill, "trainable": "all", "save_steps": 4,
                "warmup_steps": 0, "lr_scheduler": "constant"}
    distance = {}
    for weight in (0.0, 1.0 / lr):  # lr·α = 1: every step ends back on the original's weights (partial shares: above)
        out = tmp_path / f"run-{distill}-{weight}"
        condense(CondenseConfig(**settings, anchor_weight=weight), out, progress=False)
        distance[weight] = _weight_distance(out / "model", tiny_dir)
    assert distance[0.0] > 1e-3
    assert distance[1.0 / lr] < 1e-5


def test_anchor_to_a_teacher_of_another_architecture_is_refused_before_the_run(tiny_dir: Path,
                                                                             tmp_path: Path) -> None:
    from attnsparse.core.tiny import save_tiny, tiny_llama

    text = tmp_path / "train.txt"
    text.write_text(PROSE[:5000])
    wider = save_tiny(str(tmp_path / "wider"), tiny_llama(seed=1, head_dim=16))
    config = CondenseConfig(model=str(tiny_dir), data=str(text), k=2, steps=1, batch_size=1, seq_len=48,
                            sparse_aware=True, distill="only", teacher=wider, trainable="all", anchor_weight=10.0)
    with pytest.raises(AttnsparseError, match="--anchor-weight: the original has no weight"):
        condense(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()


def test_anchor_weight_needs_whole_weights_and_a_finite_value() -> None:
    with pytest.raises(AttnsparseError, match="--anchor-weight"):
        CondenseConfig(anchor_weight=1.0, trainable="lora").validate()
    with pytest.raises(AttnsparseError, match="anchor weight"):
        CondenseConfig(anchor_weight=float("nan")).validate()
    CondenseConfig(anchor_weight=1.0, trainable="qk").validate()
