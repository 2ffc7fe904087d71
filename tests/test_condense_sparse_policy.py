"""condense --sparse-policy: the sparse-aware forward trains under a given policy (decodeblock: what decoding reads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnsparse.attention.backend import AttentionChunk
from attnsparse.attention.policies import DecodeBlock
from attnsparse.condense import CondenseConfig, condense, preset_config
from attnsparse.condense.trainer import CondenseTrainer
from attnsparse.core.data import builtin_text
from attnsparse.errors import AttnsparseError
from tests.reference import decode_block_keep

SPEC = "decodeblock:4:12"


def test_forward_keeps_what_decoding_reads(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = tmp_path / "train.txt"
    text.write_text(builtin_text()[:20000])
    config = CondenseConfig(model=str(tiny_dir), data=str(text), k=4, steps=1, batch_size=1, seq_len=48, lr=1e-3,
                            lam=1.0, sparse_aware=True, sparse_policy=SPEC, save_steps=1, warmup_steps=0,
                            lr_scheduler="constant", query_chunk=16)
    checked: list[int] = []

    def check(chunk: AttentionChunk) -> None:
        """Each chunk's kept keys are the row-by-row decode selection of its queries over the layer's keys."""
        assert chunk.kept is not None and chunk.query is not None and chunk.key is not None
        positions, width = chunk.query_positions, chunk.kept.shape[-1]
        query = chunk.query.new_zeros(*chunk.query.shape[:2], chunk.key.shape[2], chunk.query.shape[-1])
        query[:, :, positions] = chunk.query.detach()
        expected = decode_block_keep(query, chunk.key.detach(), 4, budget=12, rows=positions.tolist())
        expected = expected[:, :, positions, :width]
        assert torch.equal(chunk.kept, expected)
        checked.append(int(chunk.kept.sum()))

    original = CondenseTrainer.compute_loss
    policies: list[object] = []

    def spy(self, *args, **kwargs):
        if check not in self.backend_state.observers:
            self.backend_state.observers.append(check)
        out = original(self, *args, **kwargs)
        policies.append(self.backend_state.policy)
        return out

    monkeypatch.setattr(CondenseTrainer, "compute_loss", spy)
    result = condense(config, tmp_path / "run", progress=False)
    assert result.steps == 1 and all(isinstance(p, DecodeBlock) and p.spec == SPEC for p in policies)
    assert checked and (tmp_path / "run" / "model").is_dir()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config"]["settings"]["sparse_policy"] == SPEC


def test_sparse_policy_is_checked_up_front() -> None:
    for settings, message in (({"sparse_policy": SPEC}, "--sparse-aware"),
                              ({"sparse_policy": "decodeblock:4", "sparse_aware": True}, "decodeblock"),
                              ({"sparse_policy": "dense", "sparse_aware": True}, "every key")):
        with pytest.raises(AttnsparseError, match=message) as error:
            CondenseConfig(**settings).validate()
        assert "\n" not in str(error.value)
    preset = preset_config("smollm2-keep-block16")
    assert preset.sparse_policy == "decodeblock:16:0.0625" and preset.k == 16 and preset.sparse_aware
    assert {**preset.to_json(), "sparse_policy": None, "preset": None} == \
        {**preset_config("smollm2-keep-top16").to_json(), "preset": None}
