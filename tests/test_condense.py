"""condense end to end on a tiny Llama: outputs, resume = uninterrupted, non-finite stop, LoRA, distillation, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback
from typer.testing import CliRunner

from attnsparse.attention.backend import sparse_attention
from attnsparse.cli.condense import condense_command
from attnsparse.condense import CondenseConfig, condense
from attnsparse.condense.losses import CondensationRegularizer
from attnsparse.condense.trainable import add_lora, projection_names, set_trainable
from attnsparse.core.models import load_model
from attnsparse.core.tiny import tiny_gpt2, tiny_llama
from attnsparse.errors import AttnsparseError

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 30


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _config(tiny_dir: Path, text_file: Path, **overrides) -> CondenseConfig:
    settings = {"model": str(tiny_dir), "data": str(text_file), "k": 4, "steps": 6, "batch_size": 2, "seq_len": 48, "lr": 5e-3,
                    "lam": 2.0, "save_steps": 2, "save_total_limit": None, "warmup_steps": 1, "lr_scheduler": "linear"}
    return CondenseConfig(**(settings | overrides))


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


class Crash(TrainerCallback):
    """Simulates a killed process at the start of a given step."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def test_run_outputs_and_only_qk_change(tiny_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = condense(_config(tiny_dir, text_file, save_total_limit=2), out, progress=False)
    assert result.steps == 6 and result.model_dir == out / "model"
    for name in ("config.json", "train_log.jsonl", "curves.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 7))
    assert {"loss", "lm", "cond", "kd", "topk_mass", "lambda", "k", "lr", "grad_norm"} <= set(log[0])
    assert log[-1]["topk_mass"] > log[0]["topk_mass"]  # condensation is working
    stored = json.loads((out / "config.json").read_text())
    assert stored["kind"] == "condense" and stored["config"]["status"] == "finished"
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config._attn_implementation != "attnsparse"
    before, after = _weights(tiny_dir), _weights(out / "model")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith(("q_proj.weight", "k_proj.weight")) for name in changed)
    with pytest.raises(AttnsparseError, match="finished condense run.*--overwrite"):
        condense(_config(tiny_dir, text_file), out, progress=False)


def test_resume_matches_uninterrupted_run(tiny_dir: Path, text_file: Path, tmp_path: Path) -> None:
    config = _config(tiny_dir, text_file, margin=0.05, lam=1.0, k_start=16, k_anneal_steps=4)
    condense(config, tmp_path / "a", progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        condense(config, tmp_path / "b", progress=False, callbacks=[Crash(at_step=3)])
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "b" / "model").exists()
    resumed = condense(config, tmp_path / "b", resume=True, progress=False)
    assert resumed.resumed_from == tmp_path / "b" / "checkpoints" / "checkpoint-2"
    a, b = _weights(tmp_path / "a" / "model"), _weights(tmp_path / "b" / "model")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)
    log_a, log_b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["step"] for r in log_b] == list(range(1, 7))
    for ra, rb in zip(log_a, log_b):
        assert ra["lambda"] == pytest.approx(rb["lambda"]) and ra["k"] == rb["k"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    with pytest.raises(AttnsparseError, match="different settings"):
        condense(_config(tiny_dir, text_file, k=3), tmp_path / "b", resume=True, progress=False)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_dir: Path, text_file: Path,
                                                              tmp_path: Path) -> None:
    loaded = load_model(str(tiny_dir))
    poison = {"on": False}

    class PoisonAt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            poison["on"] = state.global_step == 2

    loaded.model.model.embed_tokens.register_forward_hook(
        lambda module, inputs, output: output * float("nan") if poison["on"] else output)
    out = tmp_path / "run"
    with pytest.raises(AttnsparseError, match=r"non-finite loss at step 3.*checkpoint-2") as caught:
        condense(_config(tiny_dir, text_file), out, model=loaded, progress=False, callbacks=[PoisonAt()])
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert all(torch.isfinite(t).all() for t in _weights(out / "checkpoints" / "checkpoint-2").values())
    assert loaded.model.config._attn_implementation == "sdpa"  # the backend was removed on the way out
    # the message shows the bad values and advice that works; config.json records the stop
    message = str(caught.value)
    assert "lm=nan" in message and "cond=nan" in message and "\n" not in message
    assert "new run with a lower --lr" in message and "resume from it" not in message
    stored = json.loads((out / "config.json").read_text())["config"]
    assert stored["status"] == "stopped"
    assert stored["stopped"]["reason"] == "non-finite loss" and stored["stopped"]["step"] == 3
    assert stored["stopped"]["values"] == {"lm": "nan", "cond": "nan"}
    assert stored["stopped"]["last_checkpoint"].endswith("checkpoint-2")
    poison["on"] = False
    with pytest.raises(AttnsparseError, match="with different settings"):  # why the advice is not --resume
        condense(_config(tiny_dir, text_file, lr=1e-3), out, resume=True, progress=False)
    again = condense(_config(tiny_dir, text_file, lr=1e-3, steps=2), out, overwrite=True, progress=False)
    assert again.steps == 2


def test_lora_distill_sparse_aware(tiny_dir: Path, text_file: Path, tmp_path: Path) -> None:
    config = _config(tiny_dir, text_file, trainable="lora", lora_rank=4, distill="add", sparse_aware=True,
                     lam=1.0, margin=0.0, steps=4, save_steps=4, lr=1e-2)
    result = condense(config, tmp_path / "run", progress=False)
    log = _log(tmp_path / "run")
    assert all(r["kd"] >= 0 for r in log) and log[-1]["kd"] > 0 and "teacher_lm" in log[0]
    assert len({r["lambda"] for r in log}) > 1  # the constrained λ moved
    assert not (result.model_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    before = _weights(tiny_dir)
    after = _weights(result.model_dir)
    assert any(not torch.equal(before[n], after[n]) for n in before if n.endswith("q_proj.weight"))
    assert all(torch.equal(before[n], after[n]) for n in before if "mlp" in n)


def test_teacher_distils_to_another_model(tiny_dir: Path, text_file: Path, tmp_path: Path) -> None:
    from attnsparse.core.tiny import save_tiny

    teacher_dir = save_tiny(str(tmp_path / "teacher"), tiny_llama(seed=1))
    first = {}
    for name, teacher in (("self", None), ("other", teacher_dir)):
        config = _config(tiny_dir, text_file, distill="only", teacher=teacher, lam=0.0, steps=1, save_steps=1)
        condense(config, tmp_path / name, progress=False)
        first[name] = _log(tmp_path / name)[0]
    # the student starts as its own teacher (KL 0); a different teacher is what the KL then measures against
    assert first["self"]["kd"] == pytest.approx(0.0, abs=1e-6)
    assert first["other"]["kd"] > 0.01
    assert first["other"]["teacher_lm"] != pytest.approx(first["self"]["teacher_lm"], rel=1e-4)
    with pytest.raises(AttnsparseError, match="--teacher.*needs --distill"):
        _config(tiny_dir, text_file, teacher=teacher_dir).validate()
    alien = save_tiny(str(tmp_path / "alien"), tiny_llama(seed=1, vocab=60))
    with pytest.raises(AttnsparseError, match="--teacher.*vocabulary differs"):
        condense(_config(tiny_dir, text_file, distill="only", teacher=alien), tmp_path / "alien-run", progress=False)
    assert not (tmp_path / "alien-run" / "config.json").exists()  # refused before the run directory was written


def test_trainable_sets_and_peft_keeps_backend_state() -> None:
    llama = tiny_llama()
    assert len(projection_names(llama, "qk")) == 4 and len(projection_names(llama, "attn")) == 8
    names = set_trainable(llama, "qk", layers={1})
    assert names == ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"]
    gpt2 = tiny_gpt2()
    assert set_trainable(gpt2, "attn") and all(".attn." in n for n in set_trainable(gpt2, "attn"))
    with pytest.raises(AttnsparseError, match="unknown trainable"):
        set_trainable(llama, "mlp")
    wrapped = add_lora(tiny_llama(), "qk", rank=2)
    reg = CondensationRegularizer("tail:k=2")
    with sparse_attention(wrapped.base_model.model, "dense", observers=[reg]):
        out = wrapped(input_ids=torch.randint(0, 90, (1, 12)))
        (out.logits.mean() + reg.value()).backward()
    assert reg.count > 0
    assert all(p.grad is not None for n, p in wrapped.named_parameters() if "lora_A" in n and "q_proj" in n)


def test_cli(tiny_dir: Path, text_file: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("condense")(condense_command)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["condense", str(tiny_dir), "--data", str(text_file), "--out", str(out), "--k", "4", "--steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--save-steps", "1", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "condensed model written to" in result.output and (out / "model" / "model.safetensors").is_file()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output and "Traceback" not in again.output
    bad = runner.invoke(app, ["condense", str(tiny_dir), "--data", str(text_file), "--out", str(tmp_path / "x"),
                              "--k", "0", "--no-progress"])
    assert bad.exit_code == 2 and "error:" in bad.output


@pytest.mark.parametrize("option, value, message", [
    ("--lr-scheduler", "bogus", "unknown learning-rate scheduler (--lr-scheduler) 'bogus'; choose one of linear"),
    ("--lr-scheduler", "reduce_lr_on_plateau", "unknown learning-rate scheduler"),  # needs an evaluation loop
    ("--fsdp", "bogus", "unknown FSDP option (--fsdp) 'bogus'; choose one of full_shard"),
    ("--fsdp", "full_shard bogus", "unknown FSDP option (--fsdp) 'bogus'"),
])
def test_cli_bad_trainer_option_is_one_line_before_any_write(tiny_dir: Path, text_file: Path, tmp_path: Path,
                                                             option: str, value: str, message: str) -> None:
    """Options passed through to Trainer are checked by CondenseConfig.validate, not by a TrainingArguments crash."""
    app = typer.Typer()
    app.command("condense")(condense_command)
    app.command("noop")(lambda: None)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["condense", str(tiny_dir), "--data", str(text_file), "--out", str(out),
                                      option, value, "--no-progress"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and message in result.output
    assert not out.exists()


@pytest.mark.parametrize("seq_len, text, message", [
    (100_000, TEXT, "use --seq-len 512 or less"),  # longer than the model holds
    (64, "too short a text", "use a longer text or a smaller --seq-len"),  # longer than the text
])
def test_seq_len_errors_name_seq_len(tiny_dir: Path, tmp_path: Path, seq_len: int, text: str, message: str) -> None:
    """condense's window length is --seq-len; its errors must not advise measure's --ctx."""
    data = tmp_path / "text.txt"
    data.write_text(text, encoding="utf-8")
    with pytest.raises(AttnsparseError, match=message) as caught:
        condense(_config(tiny_dir, data, seq_len=seq_len), tmp_path / "run", progress=False)
    assert "--ctx" not in str(caught.value)
