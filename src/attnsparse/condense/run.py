"""`condense`: fine-tune a causal LM so that each query's attention mass concentrates in its top-k keys.

Run directory layout (OUT):

    config.json          the run's settings, environment and (when finished) its final metrics
    train_log.jsonl      one record per optimizer step: loss components, mean top-k mass, λ, k, lr, grad norm
    curves.png           the log drawn as curves
    checkpoints/checkpoint-N/   Trainer checkpoints (atomic: complete or absent) + attnsparse_state.json
    model/               the condensed model: from_pretrained-loadable safetensors + tokenizer (LoRA merged)

It runs unchanged as one process or under `torchrun` / `accelerate launch` (DDP; FSDP via `fsdp=`): every
process calls `condense` with the same arguments, process 0 writes the files.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments, default_data_collator, set_seed

from attnsparse.attention.backend import sparse_attention
from attnsparse.condense.config import CondenseConfig
from attnsparse.condense.distill import lm_loss
from attnsparse.condense.losses import CondensationRegularizer
from attnsparse.condense.plots import plot_curves, read_log
from attnsparse.condense.schedules import ConstrainedLambda
from attnsparse.condense.trainable import add_lora, merged, set_trainable
from attnsparse.condense.trainer import (
    CondenseTrainer,
    NonFiniteStop,
    _barrier,
    checkpoints,
    install_callbacks,
    load_state,
)
from attnsparse.core.data import check_context, load_text, tokenize, windows
from attnsparse.core.models import LoadedModel, ModelShape, load_model, save_atomically
from attnsparse.core.runs import RUN_MARKER, atomic_write_json, environment, prepare_run_dir
from attnsparse.errors import AttnsparseError

KIND = "condense"
LOG_NAME = "train_log.jsonl"


@dataclass
class CondenseResult:
    """What a finished run produced."""

    out: Path
    model_dir: Path
    model: PreTrainedModel  # the condensed model (LoRA merged), back on its original attention implementation
    steps: int
    final: dict[str, Any]  # the last step's log record
    resumed_from: Path | None


class WindowDataset(torch.utils.data.Dataset):
    """Fixed-length token windows as Trainer examples ({"input_ids": (T,)})."""

    def __init__(self, token_windows: torch.Tensor) -> None:
        self.windows = token_windows

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[index]}


def training_arguments(config: CondenseConfig, out: Path, progress: bool) -> TrainingArguments:
    """Trainer settings; creating them also sets up torch.distributed under torchrun / accelerate launch."""
    cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_strategy="no",
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=None,  # rotation happens after the atomic rename (CondenseTrainer)
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        disable_tqdm=not progress,
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        fsdp=config.fsdp,
    )


def _check_out(out: Path, config: CondenseConfig, resume: bool, overwrite: bool) -> Path | None:
    """Read-only checks of the run directory (identical on every process); returns the checkpoint to resume."""
    marker = out / RUN_MARKER
    if not resume:
        if out.exists() and not out.is_dir():
            raise AttnsparseError(f"output path {out} exists and is not a directory; choose another --out")
        if out.is_dir() and any(out.iterdir()):
            kind = _stored(marker).get("kind")
            if kind != KIND:
                raise AttnsparseError(f"output directory {out} exists and is not a previous condense run; "
                                      "choose an empty or new --out")
            if not overwrite:
                raise AttnsparseError(f"output directory {out} holds a previous condense run; pass --resume to "
                                      "continue it or --overwrite to replace it")
        return None
    stored = _stored(marker)
    if stored.get("kind") != KIND:
        raise AttnsparseError(f"--resume: {out} holds no condense run to resume; start one without --resume")
    before = CondenseConfig.from_json(stored.get("config", {}).get("settings", {})).result_fields()
    now = config.result_fields()
    changed = [f"{key}={before.get(key)!r} (now {value!r})" for key, value in now.items() if before.get(key) != value]
    if changed:
        raise AttnsparseError(f"--resume: the run in {out} was started with different settings: {'; '.join(changed)}; "
                              "pass the same options, or start a new --out")
    found = checkpoints(out / "checkpoints")
    return found[-1] if found else None


def _stored(marker: Path) -> dict[str, Any]:
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _write_config(out: Path, config: CondenseConfig, status: str, extra: dict[str, Any] | None = None) -> None:
    payload = {"kind": KIND, "config": {"settings": config.to_json(), "status": status, **(extra or {})},
               "environment": environment()}
    atomic_write_json(out / RUN_MARKER, payload)


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log records after the checkpoint being resumed (they will be produced again)."""
    if not path.is_file():
        return
    kept = [r for r in read_log(path) if r.get("step", 0) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


@torch.no_grad()
def original_lm_loss(model: torch.nn.Module, token_windows: torch.Tensor, batch_size: int) -> float:
    """The unmodified model's mean LM loss on the given windows (the constrained mode's reference)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, token_windows.shape[0], batch_size):
        batch = token_windows[start:start + batch_size].to(device)
        total += float(lm_loss(model(input_ids=batch, use_cache=False).logits, batch)) * batch.shape[0]
        count += batch.shape[0]
    model.train(was_training)
    return total / max(count, 1)


def condense(
    config: CondenseConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    model: LoadedModel | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> CondenseResult:
    """Fine-tune `config.model` on `config.data` with the condensation loss; see the module docstring for outputs.

    `model` may pass an already loaded model (tests, notebooks); `callbacks` are added to the Trainer.
    """
    config.validate()
    out = Path(out)
    args = training_arguments(config, out, progress)  # sets up torch.distributed when launched that way
    main = args.process_index == 0
    checkpoint = _check_out(out, config, resume, overwrite)
    if main:
        if not resume:
            prepare_run_dir(out, KIND, overwrite=True)
            for stale in ("checkpoints", "model", LOG_NAME, "curves.png"):
                target = out / stale
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        _write_config(out, config, "running")
    _barrier()

    set_seed(config.seed)
    loaded = model if model is not None else load_model(config.model)
    net, tokenizer = loaded.model, loaded.tokenizer
    shape = ModelShape.of(net)
    check_context(config.seq_len, shape.need("max_context"), option="--seq-len")
    token_windows = windows(tokenize(tokenizer, load_text(config.data)), config.seq_len, option="--seq-len")
    layers = None if config.layers is None else set(config.layers)
    if layers is not None and max(layers) >= shape.need("layers"):
        raise AttnsparseError(f"--layers {sorted(layers)}: the model has {shape.layers} layers (0-based)")

    saved = load_state(checkpoint) if checkpoint is not None else {}
    controller = _controller(config, net, token_windows, saved)
    teacher = None
    if config.distill != "none":
        teacher = copy.deepcopy(net).eval().to(args.device)
        teacher.requires_grad_(False)

    regularizer = CondensationRegularizer(config.loss_spec(), layers)
    # peft wraps `net` in place and merging hands `net` back, so restoring `net` on exit restores the final model
    with sparse_attention(net, observers=[regularizer], query_chunk=config.query_chunk, fast_dense=False) as state:
        if config.trainable == "lora":
            train_model = add_lora(net, config.lora_targets, config.lora_rank, config.lora_alpha, layers)
        else:
            set_trainable(net, config.trainable, layers)
            train_model = net
        if main and checkpoint is not None:
            _truncate_log(out / LOG_NAME, int(saved.get("step", 0)))
        trainer = CondenseTrainer(
            model=train_model, args=args, train_dataset=WindowDataset(token_windows),
            data_collator=default_data_collator, processing_class=tokenizer,
            condense=config, regularizer=regularizer, backend_state=state, teacher=teacher,
            controller=controller, log_path=out / LOG_NAME, last_checkpoint=checkpoint,
        )
        install_callbacks(trainer, progress)
        for callback in callbacks:
            trainer.add_callback(callback)
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        except NonFiniteStop as stop:
            if main:
                _write_config(out, config, "stopped", {"stopped": stop.record()})
            raise
        final_model = merged(trainer.model)
    final_model.requires_grad_(False)
    final_model.eval()

    model_dir = out / "model"
    _barrier()
    record = trainer.last_record or {}
    if main:
        _save_model(final_model, tokenizer, model_dir)
        plot_curves(read_log(out / LOG_NAME), out / "curves.png", title=f"condense {config.model} k={config.k}")
        _write_config(out, config, "finished", {"final": record, "steps": trainer.state.global_step,
                                                "resumed_from": None if checkpoint is None else str(checkpoint)})
    _barrier()
    return CondenseResult(out, model_dir, final_model, trainer.state.global_step, record, checkpoint)


def _controller(config: CondenseConfig, net: torch.nn.Module, token_windows: torch.Tensor,
                saved: dict[str, Any]) -> ConstrainedLambda | None:
    """The constrained-λ controller: restored from the checkpoint, or with the original LM loss measured now."""
    if config.margin is None:
        return None
    controller = ConstrainedLambda(lam=config.lam, margin=config.margin, rate=config.lambda_rate)
    if saved.get("controller"):
        controller.load_state_dict(saved["controller"])
    elif config.distill == "none":
        spread = torch.linspace(0, token_windows.shape[0] - 1, min(config.baseline_windows, token_windows.shape[0]))
        sample = token_windows[spread.round().long().unique()]  # evenly spread over the text, like random batches
        controller.baseline = original_lm_loss(net, sample, config.batch_size)
    return controller


def _save_model(model: PreTrainedModel, tokenizer: Any, target: Path) -> None:
    """save_pretrained (safetensors) + tokenizer, atomically (see models.save_atomically)."""
    save_atomically(model, tokenizer, target)