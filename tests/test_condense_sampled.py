"""Windows sampled from the original model: its own distribution, reproducible per seed, cached for resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnsparse.condense import CondenseConfig, condense
from attnsparse.condense.sampled import cached_sampled_windows, sample_windows, start_token
from attnsparse.core.data import builtin_text
from attnsparse.core.tiny import tiny_llama, tiny_tokenizer
from attnsparse.errors import AttnsparseError


def peaked_llama(seed: int) -> torch.nn.Module:
    """A tiny Llama whose next-token laws are far from uniform (a random one's are nearly flat)."""
    model = tiny_llama(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    return model


def test_samples_follow_the_model_distribution() -> None:
    model = peaked_llama(seed=1)
    draws = 4000
    tokens = sample_windows(model, 5, draws, 2, torch.Generator().manual_seed(0))
    assert (tokens[:, 0] == 5).all()
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([[5]])).logits[0, -1], dim=-1)
    empirical = torch.bincount(tokens[:, 1], minlength=probs.numel()).double() / draws
    # total variation of the empirical law from the model's: ~sqrt(V / N) / 2 ~ 0.08 by chance at V 97, N 4000;
    # greedy or top-k truncation would be far above it
    assert 0.5 * (empirical - probs.double()).abs().sum() < 0.12


def test_later_tokens_are_conditioned_on_the_sampled_prefix() -> None:
    model = peaked_llama(seed=2)
    tokens = sample_windows(model, 5, 20000, 3, torch.Generator().manual_seed(1))
    prefix = torch.bincount(tokens[:, 1]).argmax()
    rows = tokens[tokens[:, 1] == prefix]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([[5, int(prefix)]])).logits[0, -1], dim=-1)
    empirical = torch.bincount(rows[:, 2], minlength=probs.numel()).double() / rows.shape[0]
    assert 0.5 * (empirical - probs.double()).abs().sum() < 0.5 * (2 * probs.numel() / rows.shape[0]) ** 0.5 + 0.05


def test_cache_is_reused_and_batches_are_seeded_alone(tmp_path: Path) -> None:
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    first = cached_sampled_windows(model, tokenizer, 5, 12, 3, tmp_path / "c", batch_size=2)
    assert first.shape == (5, 12) and len(list((tmp_path / "c").iterdir())) == 3
    again = cached_sampled_windows(model, tokenizer, 5, 12, 3, tmp_path / "fresh", batch_size=2)
    assert torch.equal(first, again)  # drawn anew, the same windows
    more = cached_sampled_windows(model, tokenizer, 7, 12, 3, tmp_path / "c", batch_size=2)
    assert torch.equal(more[:5], first) and more.shape == (7, 12)  # a larger count keeps the windows drawn
    other = cached_sampled_windows(model, tokenizer, 5, 12, 4, tmp_path / "c", batch_size=2)
    assert not torch.equal(other, first)
    assert not torch.equal(first[0:2], first[2:4])  # each batch has its own seed
    marked = sorted((tmp_path / "c").glob("seed3-*batch0001*"))[0]
    torch.save(torch.zeros(2, 12, dtype=torch.long), marked)
    assert (cached_sampled_windows(model, tokenizer, 5, 12, 3, tmp_path / "c", batch_size=2)[2:4] == 0).all()  # read


def test_start_token_and_bad_count() -> None:
    assert start_token(tiny_tokenizer()) == 0  # no BOS: the EOS token
    with pytest.raises(AttnsparseError, match="BOS or EOS"):
        start_token(object())
    with pytest.raises(AttnsparseError, match="--sampled"):
        CondenseConfig(sampled=-1).validate()


def test_condense_trains_on_text_and_sampled_windows(tiny_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from attnsparse.condense import run as run_module

    seen: list[torch.Tensor] = []
    dataset = run_module.WindowDataset
    monkeypatch.setattr(run_module, "WindowDataset", lambda windows: seen.append(windows) or dataset(windows))
    text = tmp_path / "train.txt"
    text.write_text(builtin_text()[:3000])
    config = CondenseConfig(model=str(tiny_dir), data=str(text), k=4, steps=2, batch_size=2, seq_len=48, lr=1e-3,
                            sampled=3, save_steps=2, warmup_steps=0, lr_scheduler="constant")
    result = condense(config, tmp_path / "run", progress=False, echo=None)
    assert result.steps == 2
    assert len(list((tmp_path / "run" / "sampled").glob("*.pt"))) == 1
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["config"]["settings"]["sampled"] == 3
    drawn = cached_sampled_windows(tiny_llama(), tiny_tokenizer(), 3, 48, 0, tmp_path / "run" / "sampled")
    assert seen[0].shape[0] == 3000 // 48 + 3 and torch.equal(seen[0][-3:], drawn)


def test_data_none_trains_on_sampled_windows_alone(tiny_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from attnsparse.condense import run as run_module

    seen: list[torch.Tensor] = []
    dataset = run_module.WindowDataset
    monkeypatch.setattr(run_module, "WindowDataset", lambda windows: seen.append(windows) or dataset(windows))
    config = CondenseConfig(model=str(tiny_dir), data="none", k=4, steps=2, batch_size=2, seq_len=48, lr=1e-3,
                            sampled=4, save_steps=2, warmup_steps=0, lr_scheduler="constant")
    assert condense(config, tmp_path / "run", progress=False, echo=None).steps == 2
    drawn = cached_sampled_windows(tiny_llama(), tiny_tokenizer(), 4, 48, 0, tmp_path / "run" / "sampled")
    assert torch.equal(seen[0], drawn)
    with pytest.raises(AttnsparseError, match="give --sampled N"):
        CondenseConfig(data="none").validate()
    with pytest.raises(AttnsparseError, match="--data none has no text"):
        CondenseConfig(data="none", sampled=4, synthetic=0.25).validate()
