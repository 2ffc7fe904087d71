"""The condensation term really trains: its gradient lowers the tail mass, it changes the trainer's updates, and
with λ = 0 condense is exactly a plain fine-tune of the same weights on the LM loss.

A run whose top-k mass rose says little (plain fine-tuning can raise it too); these tests look at the updates.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from attnsparse.attention.backend import sparse_attention
from attnsparse.condense import CondenseConfig, condense
from attnsparse.condense.losses import CondensationRegularizer
from tests.model_reference import sharpened_llama

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 2
SEQ, WINDOWS, K = 39, 4, 4  # 158 characters: exactly 4 windows


def _qk(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.endswith(("q_proj.weight", "k_proj.weight"))]


def _tail_and_cond(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The tail:k=K condensation value (differentiable) and the mean top-K mass, from one forward."""
    regularizer = CondensationRegularizer(f"tail:k={K}")
    with sparse_attention(model, "dense", observers=[regularizer], fast_dense=False):
        model(ids)
    return regularizer.value(), float(regularizer.diagnostics()["topk_mass"])


def test_condensation_gradient_is_nonzero_and_lowers_the_tail_mass() -> None:
    model = sharpened_llama(seed=2, factor=4.0)
    ids = torch.randint(1, 97, (2, 48), generator=torch.Generator().manual_seed(0))
    cond, mass = _tail_and_cond(model, ids)
    grads = torch.autograd.grad(cond, _qk(model))
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    assert norm > 1e-3 * float(cond)  # the term reaches the q/k weights
    with torch.no_grad():
        for p, g in zip(_qk(model), grads):
            p.sub_(0.05 * g / norm)  # a small step against the gradient
        after, mass_after = _tail_and_cond(model, ids)
    assert float(after) < float(cond) - 1e-3 * 0.05 * float(norm)  # first order: the step lowers it
    assert mass_after > mass  # i.e. more attention mass in each row's top K keys


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("signal") / "train.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _run(tiny_dir: Path, text_file: Path, out: Path, lam: float) -> dict[str, torch.Tensor]:
    """Two full-batch steps (every window in one batch, so data order cannot matter), constant lr, fixed λ."""
    config = CondenseConfig(model=str(tiny_dir), data=str(text_file), k=K, lam=lam, steps=2, batch_size=WINDOWS,
                            seq_len=SEQ, lr=1e-2, lr_scheduler="constant", warmup_steps=0, save_steps=2,
                            save_total_limit=None)
    condense(config, out, progress=False)
    return load_file(str(out / "model" / "model.safetensors"))


def _plain_fine_tune(tiny_dir: Path) -> dict[str, torch.Tensor]:
    """What λ = 0 must equal: AdamW on the q/k weights, the mean next-token cross-entropy, clipped at norm 1."""
    from attnsparse.core.tiny import tiny_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.train()
    model.requires_grad_(False)
    params = _qk(model)
    for p in params:
        p.requires_grad_(True)
    ids = torch.tensor(tiny_tokenizer()(TEXT, add_special_tokens=False)["input_ids"][: SEQ * WINDOWS]).view(WINDOWS, SEQ)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        logits = model(ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return {name: p.detach() for name, p in model.state_dict().items()}


def test_lambda_changes_the_updates_and_zero_is_the_plain_fine_tune(tiny_dir: Path, text_file: Path,
                                                                     tmp_path: Path) -> None:
    before = load_file(str(tiny_dir / "model.safetensors"))
    plain = _run(tiny_dir, text_file, tmp_path / "lam0", lam=0.0)
    condensed = _run(tiny_dir, text_file, tmp_path / "lam", lam=20.0)
    reference = _plain_fine_tune(tiny_dir)
    qk = [name for name in before if name.endswith(("q_proj.weight", "k_proj.weight"))]
    for name in qk:
        step = (reference[name] - before[name]).abs().max()
        assert step > 1e-3  # the weights moved
        torch.testing.assert_close(plain[name], reference[name], rtol=0, atol=1e-3 * float(step))
        assert (condensed[name] - plain[name]).abs().max() > 0.1 * step  # the term changes the update
    for name in before:
        if name not in qk:
            assert torch.equal(plain[name], before[name]) and torch.equal(condensed[name], before[name]), name
    windows = torch.randint(1, 97, (2, SEQ), generator=torch.Generator().manual_seed(3))
    masses = {}
    for label, weights in (("before", before), ("plain", plain), ("condensed", condensed)):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir)
        model.load_state_dict(weights, strict=False)
        with torch.no_grad():
            masses[label] = _tail_and_cond(model, windows)[1]
    gain = {label: masses[label] - masses["before"] for label in ("plain", "condensed")}
    assert gain["condensed"] > 1.5 * max(gain["plain"], 0.0) + 1e-3  # λ·cond pushed mass into the top K keys
