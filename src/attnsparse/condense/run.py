"""`condense`: fine-tune a causal LM so that each query's attention mass concentrates in its top-k keys.

Run directory layout (OUT):

    config.json          the run's settings, status (running, then finished), environment and final metrics
    train_log.jsonl      one record per optimizer step: loss components, mean top-k mass, λ, k, lr, grad norm
    curves.png           the log drawn as curves
    checkpoints/checkpoint-N/   Trainer checkpoints (atomic: complete or absent) + attnsparse_state.json
    sampled/             windows sampled from the original (--sampled), one tensor file per seeded batch
    model/               the condensed model: from_pretrained-loadable safetensors + tokenizer (LoRA merged)

It runs unchanged as one process or under `torchrun` / `accelerate launch` (DDP; FSDP via `fsdp=`): every
process calls `condense` with the same arguments, process 0 writes the files.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments, default_data_collator, set_seed

from attnsparse.attention.backend import sparse_attention
from attnsparse.condense.anchor import check_reference
from attnsparse.condense.checkpoints import checkpoints, clean, load_state, problem
from attnsparse.condense.config import NO_TEXT, CondenseConfig
from attnsparse.condense.distill import lm_loss
from attnsparse.condense.losses import CondensationRegularizer
from attnsparse.condense.mixture import mix_synthetic
from attnsparse.condense.plots import plot_curves, read_log
from attnsparse.condense.recompute import enable_recompute
from attnsparse.condense.sampled import cached_sampled_windows
from attnsparse.condense.schedules import ConstrainedLambda
from attnsparse.condense.trainable import add_lora, merged, set_trainable
from attnsparse.condense.trainer import CondenseTrainer, NonFiniteStop, _barrier, full_state_dict, install_callbacks
from attnsparse.core.data import check_context, load_text, tokenize, windows
from attnsparse.core.devices import device_name, resolve_device, resolve_dtype
from attnsparse.core.models import LoadedModel, ModelShape, load_model, save_atomically
from attnsparse.core.runs import RunDir, RunRecord
from attnsparse.errors import AttnsparseError

KIND = "condense"
LOG_NAME = "train_log.jsonl"
SAMPLED_DIR = "sampled"  # windows sampled from the original (--sampled), one file per seeded batch


@dataclass
class CondenseResult:
    """What a finished run produced."""

    out: Path
    model_dir: Path
    model: PreTrainedModel | None  # the condensed model (LoRA merged) on its original attention implementation;
    steps: int                      # None when the run was already finished (nothing trained; see model_dir)
    final: dict[str, Any]  # the last step's log record
    resumed_from: Path | None
    already_finished: bool = False


class WindowDataset(torch.utils.data.Dataset):
    """Fixed-length token windows as Trainer examples ({"input_ids": (T,)})."""

    def __init__(self, token_windows: torch.Tensor) -> None:
        self.windows = token_windows

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[index]}


def _fsdp_config(words: str) -> dict[str, Any] | None:
    """--fsdp words as Trainer's FSDP2 settings: full_shard (default) reshards after the forward, shard_grad_op keeps
    the gathered weights until the backward, offload keeps them on the host; auto_wrap (transformers' default
    policy) shards each decoder layer."""
    chosen = words.split()
    if not chosen:
        return None
    return {"version": 2, "reshard_after_forward": "shard_grad_op" not in chosen, "cpu_offload": "offload" in chosen}


def training_arguments(config: CondenseConfig, out: Path, progress: bool) -> TrainingArguments:
    """Trainer settings; creating them also sets up torch.distributed under torchrun / accelerate launch.

    `config.device` cpu trains on the CPU (gloo between processes), cuda on each process's GPU (nccl); `config.dtype`
    bfloat16 / float16 is autocast mixed precision over float32 weights.
    """
    cpu = resolve_device(config.device).type == "cpu"
    dtype = resolve_dtype(config.dtype)
    fsdp = _fsdp_config(config.fsdp)
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
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        ddp_backend="gloo" if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        fsdp=fsdp is not None,
        fsdp_config=fsdp,
    )


def _check_out(run: RunDir, config: CondenseConfig, resume: bool, overwrite: bool) -> RunRecord | None:
    """Read-only checks of the run directory (identical on every process); returns the previous run in it."""
    if resume and overwrite:
        raise AttnsparseError("--resume continues the run in --out and --overwrite replaces it; pass only one")
    out = run.path
    previous = run.inspect()
    if resume:
        if previous is None:
            raise AttnsparseError(f"--resume: {out} holds no condense run to resume; start one without --resume")
        before = CondenseConfig.from_json(previous.config.get("settings", {})).result_fields()
        now = config.result_fields()
        changed = [f"{key}={before.get(key)!r} (now {value!r})" for key, value in now.items()
                   if before.get(key) != value]
        if changed:
            raise AttnsparseError(f"--resume: the run in {out} was started with different settings: "
                                  f"{'; '.join(changed)}; pass the same options, or start a new --out")
    elif previous is not None and not overwrite:
        if previous.finished:
            raise AttnsparseError(f"output directory {out} holds a finished condense run "
                                  f"({previous.config.get('steps', '?')} steps); pass --overwrite to replace it")
        found = checkpoints(out / "checkpoints")
        if found:
            raise AttnsparseError(f"output directory {out} holds an unfinished condense run (status "
                                  f"{previous.status}, last checkpoint {found[-1].name}); pass --resume to continue "
                                  "it or --overwrite to replace it")
        # an interrupted run without a checkpoint (e.g. a failed start) has nothing to keep: it is replaced
    return previous


def _resume_point(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that can be resumed from, and the newer ones that cannot (with why)."""
    broken = []
    for checkpoint in reversed(checkpoints(root)):
        why = problem(checkpoint)
        if why is None:
            return checkpoint, broken
        broken.append((checkpoint, why))
    return None, broken


def _settings(config: CondenseConfig, status: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `config` part of condense's config.json: its settings, its status and, when finished, its results."""
    return {"settings": config.to_json(), "status": status, **(extra or {})}


def _kept(out: Path) -> str:
    found = checkpoints(out / "checkpoints")
    if not found:
        return f"no checkpoint of the condense run in {out} was written yet; run the same command again to start over"
    return f"the condense run in {out} keeps {found[-1]}; pass --resume to continue from it"


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


def _load_teacher(spec: str, tokenizer: Any) -> torch.nn.Module:
    """Load the --teacher model on the host; its vocabulary must be the student's token for token (the KL compares
    the two next-token distributions position by position)."""
    loaded = load_model(spec, device="cpu")
    if loaded.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise AttnsparseError(f"--teacher {spec}: its tokenizer's vocabulary differs from the student's; distil to a "
                              "model with the same tokenizer")
    return loaded.model


def condense(
    config: CondenseConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    model: LoadedModel | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    echo: Callable[[str], None] | None = print,
) -> CondenseResult:
    """Fine-tune `config.model` on `config.data` with the condensation loss; see the module docstring for outputs.

    `model` may pass an already loaded model (tests, notebooks); `callbacks` are added to the Trainer; `echo`
    prints notes such as a checkpoint skipped on resume. Resuming a finished run trains nothing and returns it
    with `already_finished` set (and no model loaded).
    """
    config.validate()
    out = Path(out)
    run = RunDir(out, KIND)
    previous = _check_out(run, config, resume, overwrite)
    if resume and previous is not None and previous.finished:
        stored = previous.config
        return CondenseResult(out, out / "model", None, int(stored.get("steps", 0)), stored.get("final") or {}, None,
                              already_finished=True)
    args = training_arguments(config, out, progress)  # sets up torch.distributed when launched that way
    main = args.process_index == 0

    set_seed(config.seed)
    # loaded on the host in float32 (the master weights); Trainer moves it to its device, autocast gives the dtype
    loaded = model if model is not None else load_model(config.model, device="cpu")
    net, tokenizer = loaded.model, loaded.tokenizer
    shape = ModelShape.of(net)
    check_context(config.seq_len, shape.need("max_context"), option="--seq-len")
    if config.data == NO_TEXT:
        token_windows = torch.empty(0, config.seq_len, dtype=torch.long)  # the sampled windows, added below, alone
    else:
        text = mix_synthetic(load_text(config.data), config.synthetic, config.seed)
        token_windows = windows(tokenize(tokenizer, text), config.seq_len, option="--seq-len")
    layers = None if config.layers is None else set(config.layers)
    if layers is not None and max(layers) >= shape.need("layers"):
        raise AttnsparseError(f"--layers {sorted(layers)}: the model has {shape.layers} layers (0-based)")
    checkpoint, broken = _resume_point(out / "checkpoints") if resume else (None, [])
    external_teacher = _load_teacher(config.teacher, tokenizer) if config.teacher is not None else None
    if external_teacher is not None and config.anchor_weight > 0:
        check_reference(net, external_teacher)

    _barrier()  # every process has read the directory before process 0 changes it
    if main:
        run.start(_settings(config, "running", _placement(args, config)), clear=not resume)
        if resume:
            for bad, why in broken:
                shutil.rmtree(bad, ignore_errors=True)
                if echo is not None:
                    echo(f"{bad.name} cannot be resumed from ({why}); removed it, resuming from "
                         f"{checkpoint.name if checkpoint is not None else 'the start'}")
            clean(out / "checkpoints")
            if checkpoint is None:
                for stale in ("checkpoints", "model", LOG_NAME, "curves.png"):
                    target = out / stale
                    shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    _barrier()
    if config.sampled:
        # process 0 samples (or reads its cache); the others then read that cache, so every process holds the same data
        def sampled() -> torch.Tensor:
            return cached_sampled_windows(net.to(args.device), tokenizer, config.sampled, config.seq_len, config.seed,
                                          out / SAMPLED_DIR, echo=echo if main else None)

        drawn = sampled() if main else None
        _barrier()
        token_windows = torch.cat([token_windows, drawn if drawn is not None else sampled()])

    saved = load_state(checkpoint) if checkpoint is not None else {}
    controller = _controller(config, net, token_windows, saved)
    teacher = None
    if external_teacher is not None:
        teacher = external_teacher.eval().to(args.device)
        teacher.requires_grad_(False)
    elif config.distill != "none":
        teacher = copy.deepcopy(net).eval().to(args.device)
        teacher.requires_grad_(False)

    regularizer = CondensationRegularizer(config.loss_spec(), layers)
    # peft wraps `net` in place and merging hands `net` back, so restoring `net` on exit restores the final model
    with run.guard(lambda: _kept(out)), sparse_attention(
            net, observers=[regularizer], query_chunk=config.query_chunk, fast_dense=False) as state:
        if config.gradient_checkpointing:
            enable_recompute(net, state)
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
                run.stop(_settings(config, "stopped", {"stopped": stop.record()}))
            raise
        final_model = merged(trainer.model)
    final_model.requires_grad_(False)
    final_model.eval()

    model_dir = out / "model"
    _barrier()
    record = trainer.last_record or {}
    weights = full_state_dict(final_model)  # FSDP: every process takes part in gathering the whole weights
    if main:
        with run.guard(lambda: _kept(out)):
            _save_model(final_model, tokenizer, model_dir, weights)
            plot_curves(read_log(out / LOG_NAME), out / "curves.png", title=f"condense {config.model} k={config.k}")
            run.finish(_settings(config, "finished", _placement(args, config) | {
                "final": record, "steps": trainer.state.global_step,
                "resumed_from": None if checkpoint is None else str(checkpoint)}))
    _barrier()
    return CondenseResult(out, model_dir, final_model, trainer.state.global_step, record, checkpoint)


def _placement(args: TrainingArguments, config: CondenseConfig) -> dict[str, Any]:
    """Where the run trains and in what precision, as config.json records it."""
    precision = "float32" if config.dtype == "float32" else f"{config.dtype} autocast, float32 weights"
    return {"device": device_name(args.device), "dtype": config.dtype, "precision": precision,
            "processes": args.world_size, "fsdp": config.fsdp or None}


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


def _save_model(model: PreTrainedModel, tokenizer: Any, target: Path,
                state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """save_pretrained (safetensors) + tokenizer, atomically (see models.save_atomically)."""
    save_atomically(model, tokenizer, target, state_dict)