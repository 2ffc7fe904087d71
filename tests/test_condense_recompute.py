"""Activation checkpointing in condensation: the same gradients and the same training run, with less held for backward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnsparse.attention.backend import sparse_attention
from attnsparse.attention.policies import DENSE
from attnsparse.attention.policies.topk import TopK
from attnsparse.condense import CondenseConfig, condense
from attnsparse.condense.losses import CondensationRegularizer
from attnsparse.condense.recompute import enable_recompute
from attnsparse.core.data import builtin_text
from tests.model_reference import sharpened_llama


def _step_gradients(recompute: bool) -> tuple[dict[str, torch.Tensor], int]:
    """One trainer-like step on a tiny Llama: a top-2 forward with the tail loss, then a dense forward (policy and
    observers switched, as the dense_weight term does), one backward. Returns the gradients and the rows the
    regularizer holds after the backward."""
    torch.manual_seed(0)
    model = sharpened_llama(factor=4.0, layers=3, heads=4, kv_heads=2, max_positions=128).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    regularizer = CondensationRegularizer("tail:k=2")
    with sparse_attention(model, TopK(2), observers=[regularizer], fast_dense=False) as state:
        if recompute:
            enable_recompute(model, state)
        sparse_logits = model(input_ids=ids, use_cache=False).logits
        cond = regularizer.value()
        regularizer.reset()
        state.policy, state.observers = DENSE, []
        dense_logits = model(input_ids=ids, use_cache=False).logits
        state.policy, state.observers = TopK(2), [regularizer]
        loss = sparse_logits.logsumexp(-1).mean() + 0.5 * dense_logits.square().mean() + 3.0 * cond
        loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}, regularizer.count


def test_recomputed_step_has_the_same_gradients_and_leaves_the_regularizer_empty():
    plain, _ = _step_gradients(recompute=False)
    recomputed, rows_after_backward = _step_gradients(recompute=True)
    for name, grad in plain.items():
        assert torch.allclose(recomputed[name], grad, rtol=1e-4, atol=1e-6), name
    assert rows_after_backward == 0  # the recompute counted into a scratch copy, not into the step's loss


def test_condense_run_with_recompute_matches_the_plain_run(tiny_dir: Path, tmp_path: Path):
    text = tmp_path / "train.txt"
    text.write_text(builtin_text("train")[:20000])
    settings = {"model": str(tiny_dir), "data": str(text), "k": 2, "steps": 3, "batch_size": 1, "seq_len": 48,
                "lr": 1e-2, "lam": 1.0, "sparse_aware": True, "distill": "only", "dense_weight": 2.0,
                "save_steps": 3, "warmup_steps": 0, "lr_scheduler": "constant"}
    logs = {}
    for flag in (False, True):
        out = tmp_path / f"run-{flag}"
        condense(CondenseConfig(**settings, gradient_checkpointing=flag), out, progress=False)
        logs[flag] = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    for plain, recomputed in zip(logs[False], logs[True], strict=True):
        for key in ("loss", "kd", "kd_dense", "cond", "grad_norm"):
            assert recomputed[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-7), key
