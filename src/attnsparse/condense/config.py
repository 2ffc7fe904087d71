"""Settings of a condensation run, their validation, and named presets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from attnsparse.attention.policies import parse_policy
from attnsparse.attention.policies.budget import read_budget
from attnsparse.condense.losses import parse_loss
from attnsparse.condense.schedules import K_SCHEDULES, LAMBDA_SCHEDULES
from attnsparse.condense.trainable import TRAINABLE_SETS
from attnsparse.core.devices import resolve_device, resolve_dtype
from attnsparse.errors import AttnsparseError

DISTILL_MODES: tuple[str, ...] = ("none", "add", "only")
# Settings that may differ between the first run and a resume without changing the result.
RESUME_FREE: tuple[str, ...] = ("save_steps", "save_total_limit", "query_chunk", "fsdp", "preset", "device",
                                "gradient_checkpointing")
# transformers' learning-rate schedulers that need nothing beyond warmup and step counts (the others want an
# evaluation loop or extra scheduler arguments this command does not take).
LR_SCHEDULERS: tuple[str, ...] = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
)
# Words of Trainer's `fsdp` string under FSDP2, transformers' default (the other sharding modes are FSDP1-only).
FSDP_OPTIONS: tuple[str, ...] = ("full_shard", "shard_grad_op", "offload", "auto_wrap")


# `--data none`: no text, the run trains on its `--sampled` windows from the original alone
NO_TEXT = "none"


@dataclass
class CondenseConfig:
    """Everything that decides a condensation run's result (saved in config.json; resume checks it)."""

    model: str = "smollm2-135m"
    data: str | None = None
    # condensation loss
    k: int = 16
    loss: str = "tail"  # variant spec without k (k comes from `k` and its schedule)
    lam: float = 1.0
    lambda_schedule: str = "constant"
    lambda_ramp_steps: int = 0
    k_start: int | None = None
    k_anneal_steps: int = 0
    k_schedule: str = "geometric"
    layers: list[int] | None = None  # regularised (and trained, for attn/qk/lora) layers; None = all
    # constrained λ (None = off)
    margin: float | None = None
    lambda_rate: float = 1.0
    baseline_windows: int = 8
    # distillation
    distill: str = "none"
    # the model distilled to (embedded name, hub id, directory or .gguf); None: the student's own starting weights.
    # Refining a condensed model further then still distils to the original instead of to the condensed start.
    teacher: str | None = None
    distill_weight: float = 1.0
    temperature: float = 1.0
    # weight of a second, dense forward of the student distilled to the original on the same batch (sparse-aware
    # runs only): the sparse forward alone leaves the dense rows free to drift, this term holds them
    dense_weight: float = 0.0
    # decoupled decay of the trained weights toward the original's (anchor.py): after each step w -= lr·α·(w - w0)
    anchor_weight: float = 0.0
    # per-head budgets and the training mixture
    budget: str | None = None  # head-budget file (attnsparse budget); its allocation is rescaled to the current k
    synthetic: float = 0.0  # share of the training text made of synthetic retrieval/copy documents (mixture.py)
    sampled: int = 0  # windows of seq_len tokens sampled from the original model, added to the text's (sampled.py)
    # forward policy and trainable set
    sparse_aware: bool = False
    sparse_policy: str | None = None  # the sparse-aware forward's policy spec (None: top-k at the current k, or --budget)
    trainable: str = "qk"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "qk"
    # optimisation
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 5e-5
    lr_scheduler: str = "cosine"
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "float32"  # float32, or bfloat16 / float16 mixed precision (autocast; weights and AdamW stay float32)
    # bookkeeping (does not change the result)
    save_steps: int = 25
    save_total_limit: int | None = 2  # checkpoints kept, at least 1 (None: all)
    query_chunk: int | None = None
    gradient_checkpointing: bool = False  # recompute each layer in backward (condense/recompute.py): less memory
    fsdp: str = ""
    preset: str | None = None
    device: str | None = None  # cpu or cuda (None: cuda when available); under torchrun each process its local GPU

    def validate(self) -> None:
        """Raise AttnsparseError on the first bad setting, with what to do."""
        loss = parse_loss(self.loss)
        if "k=" in self.loss.replace(" ", ""):
            raise AttnsparseError(f"give k with --k, not inside the loss spec ('{self.loss}')")
        del loss
        _positive_int("k", self.k)
        _positive_int("steps", self.steps)
        _positive_int("batch size", self.batch_size)
        _positive_int("gradient accumulation", self.grad_accum)
        _positive_int("save steps", self.save_steps)
        if self.save_total_limit is not None and (not isinstance(self.save_total_limit, int)
                                                  or self.save_total_limit < 1):
            raise AttnsparseError(f"--keep-checkpoints {self.save_total_limit}: keep at least 1 checkpoint (the one "
                                  "--resume continues from)")
        if self.query_chunk is not None and (not isinstance(self.query_chunk, int) or self.query_chunk < 1):
            raise AttnsparseError(f"query chunk {self.query_chunk} must be >= 1")
        _positive_int("baseline windows", self.baseline_windows)
        if self.seq_len < 2:
            raise AttnsparseError(f"sequence length {self.seq_len} must be >= 2")
        if self.k_start is not None and self.k_start < self.k:
            raise AttnsparseError(f"--k-start {self.k_start} must be >= --k {self.k} (k anneals downwards)")
        for name, value in (("lr", self.lr), ("λ", self.lam), ("distill weight", self.distill_weight),
                            ("dense weight", self.dense_weight), ("anchor weight", self.anchor_weight)):
            if not (value >= 0 and math.isfinite(value)):
                raise AttnsparseError(f"{name} must be a finite number >= 0, got {value}")
        if self.lr <= 0:
            raise AttnsparseError(f"learning rate must be > 0, got {self.lr}")
        if self.temperature <= 0:
            raise AttnsparseError(f"distillation temperature must be > 0, got {self.temperature}")
        _choice("k schedule", self.k_schedule, K_SCHEDULES)
        _choice("λ schedule", self.lambda_schedule, LAMBDA_SCHEDULES)
        _choice("distillation mode", self.distill, DISTILL_MODES)
        _choice("trainable set", self.trainable, TRAINABLE_SETS)
        _choice("LoRA targets", self.lora_targets, ("qk", "attn"))
        _choice("learning-rate scheduler (--lr-scheduler)", self.lr_scheduler, LR_SCHEDULERS)
        for word in self.fsdp.split():
            _choice("FSDP option (--fsdp)", word, FSDP_OPTIONS)
        if "full_shard" in self.fsdp.split() and "shard_grad_op" in self.fsdp.split():
            raise AttnsparseError("--fsdp: choose one of full_shard and shard_grad_op")
        device = resolve_device(self.device)
        if device.type == "cuda" and device.index not in (None, 0):
            raise AttnsparseError(f"--device {self.device}: condense trains on the first visible GPU per process; "
                                  f"pick GPU {device.index} with CUDA_VISIBLE_DEVICES={device.index} and --device cuda")
        if device.type == "meta":
            raise AttnsparseError("--device meta cannot train; use cpu or cuda")
        if resolve_dtype(self.dtype) == torch.float16 and device.type != "cuda":
            raise AttnsparseError("--dtype float16 training (mixed precision with loss scaling) needs CUDA; use "
                                  "--dtype bfloat16 or float32 on the CPU")
        if self.margin is not None:
            if not (self.margin >= 0 and math.isfinite(self.margin)):
                raise AttnsparseError(f"--margin must be a number of nats >= 0, got {self.margin}")
            if self.lam <= 0:
                raise AttnsparseError("constrained mode (--margin) needs an initial --lambda > 0")
            if self.lambda_schedule != "constant":
                raise AttnsparseError("constrained mode adapts λ itself; leave --lambda-schedule constant")
        if not 0.0 <= self.synthetic < 1.0:
            raise AttnsparseError(f"--synthetic {self.synthetic} must be a share in [0, 1)")
        if not isinstance(self.sampled, int) or self.sampled < 0:
            raise AttnsparseError(f"--sampled {self.sampled} must be a number of windows >= 0")
        if self.data == NO_TEXT and not self.sampled:
            raise AttnsparseError("--data none trains on windows sampled from the original alone; give --sampled N")
        if self.data == NO_TEXT and self.synthetic:
            raise AttnsparseError(f"--synthetic {self.synthetic} builds documents from the text's sentences; "
                                  "--data none has no text (use --synthetic 0)")
        if self.budget is not None:
            if not hasattr(parse_loss(self.loss), "per_head"):
                raise AttnsparseError(f"--budget needs a loss with per-head k (tail), not '{self.loss}'")
            read_budget(self.budget)
        if self.sparse_policy is not None:
            if not self.sparse_aware:
                raise AttnsparseError(f"--sparse-policy {self.sparse_policy} is the sparse-aware forward's policy; "
                                      "add --sparse-aware")
            if parse_policy(self.sparse_policy).is_dense:
                raise AttnsparseError(f"--sparse-policy {self.sparse_policy} keeps every key; give a sparse policy "
                                      "or use --dense-forward")
        if self.dense_weight > 0 and (self.distill == "none" or not self.sparse_aware):
            raise AttnsparseError(f"--dense-weight {self.dense_weight} distils a dense forward of the student to the "
                                  "original beside the sparse-aware one; it needs --distill add|only and --sparse-aware")
        if self.anchor_weight > 0 and (self.trainable == "lora" or self.fsdp):
            raise AttnsparseError(f"--anchor-weight {self.anchor_weight} pulls whole weights towards the original's; "
                                  "it needs --trainable all|attn|qk and no --fsdp")
        if self.teacher is not None and self.distill == "none":
            raise AttnsparseError(f"--teacher {self.teacher} is the model distilled to; it needs --distill add|only")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise AttnsparseError(f"--layers must be non-negative layer indices, got {self.layers}")

    def loss_spec(self, k: int | None = None) -> str:
        """The canonical loss spec at budget `k` (default: the target k), e.g. `tail:k=16`; losses without a
        budget (adaptive, entropy) ignore k."""
        return parse_loss(self.loss).with_budget(self.k if k is None else k).spec

    def result_fields(self) -> dict[str, Any]:
        """Settings that decide the result (compared on resume)."""
        return {k: v for k, v in self.to_json().items() if k not in RESUME_FREE}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CondenseConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise AttnsparseError(f"{name} must be a positive integer, got {value}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise AttnsparseError(f"unknown {name} '{value}'; choose one of {', '.join(allowed)}")


# Presets: documented starting points. Sized from measured step times on 2 CPU cores (docs/condense.md).
PRESETS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M on 2 CPU cores in about 15 minutes: q/k projections of all 30 layers (~13.3 M parameters),
    # batch 4 x 256 tokens, 90 steps (~92k tokens; ~8.5 s a step when the cores are free), k annealed 64 -> 16
    # over the first half, λ = 10 warmed up over 10 steps, cosine learning rate 2e-4. Checkpoints every 30 steps.
    # λ = 10 was chosen from 40-step probes (batch 2 x 128, lr 2e-4): top-16 tail mass 0.081 -> 0.058 for +0.045
    # nats of LM loss against the same run with λ = 0.
    "smollm2-cpu-15min": {
        "model": "smollm2-135m", "k": 16, "loss": "tail", "lam": 10.0, "lambda_schedule": "warmup",
        "lambda_ramp_steps": 10, "k_start": 64, "k_anneal_steps": 45, "k_schedule": "geometric", "trainable": "qk",
        "steps": 90, "batch_size": 4, "seq_len": 256, "lr": 2e-4, "lr_scheduler": "cosine", "warmup_steps": 5,
        "save_steps": 30, "query_chunk": 256,
    },
    # The issue-4 benchmark recipe (about 1.5 h on 2 CPU cores): sparse-aware training, i.e. the forward already
    # uses top-k attention (k annealed 64 -> 8 over the first 60 steps), so the model learns to predict with only
    # its top-k keys; the tail-mass loss (λ = 5) keeps dense attention consistent with it. All weights train, at
    # the evaluation length (1 x 1024 tokens, 2 accumulated per step). LM loss on the training text.
    "smollm2-sparse-aware-top8": {
        "model": "smollm2-135m", "k": 8, "loss": "tail", "lam": 5.0, "lambda_schedule": "warmup",
        "lambda_ramp_steps": 20, "k_start": 64, "k_anneal_steps": 60, "k_schedule": "geometric",
        "sparse_aware": True, "trainable": "all", "steps": 200, "batch_size": 1, "grad_accum": 2, "seq_len": 1024,
        "lr": 1e-4, "lr_scheduler": "cosine", "warmup_steps": 10, "save_steps": 20, "save_total_limit": 2,
        "query_chunk": 128,
    },
    # The same recipe with distillation instead of the LM loss (about 70 min on 2 CPU cores): the student, already
    # running top-k attention, is trained to match the ORIGINAL model's dense next-token distribution (KL, T = 1),
    # so condensation is learned without adapting to the training text, which is what made the LM-loss recipe lose
    # the instruct model's behaviour. 90 steps (k annealed 64 -> 8 over 45), the cosine schedule run to its end.
    "smollm2-distill-top8": {
        "model": "smollm2-135m", "k": 8, "loss": "tail", "lam": 5.0, "lambda_schedule": "warmup",
        "lambda_ramp_steps": 15, "k_start": 64, "k_anneal_steps": 45, "k_schedule": "geometric",
        "sparse_aware": True, "distill": "only", "trainable": "all", "steps": 90, "batch_size": 1, "grad_accum": 2,
        "seq_len": 1024, "lr": 1e-4, "lr_scheduler": "cosine", "warmup_steps": 10, "save_steps": 20,
        "save_total_limit": 2, "query_chunk": 128,
    },
    # Keep the model (docs/condense.md, "Keeping the model"): distillation only (no domain credit), sparse-aware top-k
    # annealed 64 -> 16, only the q/k projections train (the narrowest full-rank set), and a quarter of the training
    # text is synthetic retrieval/copy documents so in-context copying is exercised. 90 steps of 2 x 1024 tokens
    # (~184k tokens; ~45 s a step on one free core, ~80 min).
    "smollm2-keep-top16": {
        "model": "smollm2-135m", "k": 16, "loss": "tail", "lam": 5.0, "lambda_schedule": "warmup",
        "lambda_ramp_steps": 15, "k_start": 64, "k_anneal_steps": 45, "k_schedule": "geometric",
        "sparse_aware": True, "distill": "only", "trainable": "qk", "synthetic": 0.25, "steps": 90, "batch_size": 1,
        "grad_accum": 2, "seq_len": 1024, "lr": 2e-4, "lr_scheduler": "cosine", "warmup_steps": 10, "save_steps": 15,
        "save_total_limit": 2, "query_chunk": 128,
    },
    # The keep recipe trained under the selection decoding runs: the sparse-aware forward keeps, row by row, the keys
    # `block:16:0.0625` decoding reads (decodeblock, attention/policies/decodeblock.py) instead of the exact top-k,
    # and the condensation loss stays the top-k tail (64 -> 16). At 1024 tokens the last row reads 64 keys (4 blocks:
    # the sink, the 2 recent, the best by mean key) and every row at least 48 (3 blocks): 8.5 % of causal pairs
    # against top-16's 3.1 % (16 keys a row), more keys than top-16 but whole blocks picked by an estimate.
    "smollm2-keep-block16": {
        "model": "smollm2-135m", "k": 16, "loss": "tail", "lam": 5.0, "lambda_schedule": "warmup",
        "lambda_ramp_steps": 15, "k_start": 64, "k_anneal_steps": 45, "k_schedule": "geometric",
        "sparse_aware": True, "sparse_policy": "decodeblock:16:0.0625", "distill": "only", "trainable": "qk",
        "synthetic": 0.25, "steps": 90, "batch_size": 1, "grad_accum": 2, "seq_len": 1024, "lr": 2e-4,
        "lr_scheduler": "cosine", "warmup_steps": 10, "save_steps": 15, "save_total_limit": 2, "query_chunk": 128,
    },
    # Its control: the same data, steps and optimiser with no condensation (λ = 0, dense forward). Under
    # distillation only, the student then starts at KL 0 with zero gradient, so the control is the original model
    # itself; the preset exists so that this is checked rather than assumed.
    "smollm2-keep-control": {
        "model": "smollm2-135m", "k": 16, "lam": 0.0, "sparse_aware": False, "distill": "only", "trainable": "qk",
        "synthetic": 0.25, "steps": 90, "batch_size": 1, "grad_accum": 2, "seq_len": 1024, "lr": 2e-4,
        "lr_scheduler": "cosine", "warmup_steps": 10, "save_steps": 15, "save_total_limit": 2, "query_chunk": 128,
    },
    # The main job's recipe (`attnsparse run`, about 15 minutes on 2 CPU cores in all): the keep recipe shortened to
    # what fits, aimed at top-8: distillation only (no domain credit), sparse-aware top-k annealed 64 -> 8, q/k
    # projections only, a quarter synthetic retrieval/copy text; 40 steps of 2 x 512 tokens (~41k tokens).
    "smollm2-keep-15min": {
        "model": "smollm2-135m", "k": 8, "loss": "tail", "lam": 5.0, "lambda_schedule": "warmup",
        "lambda_ramp_steps": 8, "k_start": 64, "k_anneal_steps": 24, "k_schedule": "geometric",
        "sparse_aware": True, "distill": "only", "trainable": "qk", "synthetic": 0.25, "steps": 40, "batch_size": 1,
        "grad_accum": 2, "seq_len": 512, "lr": 3e-4, "lr_scheduler": "cosine", "warmup_steps": 4, "save_steps": 10,
        "save_total_limit": 2, "query_chunk": 128,
    },
    # All weights, held dense: the distillation recipe's trainable set (all weights cut top-8's cost most) with the
    # retrieval/copy mixture and the dense forward distilled too, so neither the dense predictions nor in-context
    # copying is given up for the sparse ones. λ = 1 and dense_weight 3: in the main job's 40-step recipe that pair
    # ended at a dense KL to the original of 0.0085 against 0.056 with λ = 5 and weight 1, and a lower sparse KL
    # (0.175 against 0.205). 40 steps of 2 x 1024 tokens (~82k tokens), k 64 -> 8 over 20; 47-85 s a step at 2
    # threads on shared cores.
    "smollm2-keep-all-anchored": {
        "model": "smollm2-135m", "k": 8, "loss": "tail", "lam": 1.0, "lambda_schedule": "warmup",
        "lambda_ramp_steps": 8, "k_start": 64, "k_anneal_steps": 20, "k_schedule": "geometric",
        "sparse_aware": True, "distill": "only", "dense_weight": 3.0, "trainable": "all", "synthetic": 0.25,
        "steps": 40, "batch_size": 1, "grad_accum": 2, "seq_len": 1024, "lr": 1e-4, "lr_scheduler": "cosine",
        "warmup_steps": 4, "save_steps": 10, "save_total_limit": 2, "query_chunk": 128,
    },
    # A short smoke run of the 15-minute recipe (a few minutes): 12 steps, batch 2 x 128.
    "smollm2-cpu-smoke": {
        "model": "smollm2-135m", "k": 16, "loss": "tail", "lam": 10.0, "trainable": "qk", "steps": 12,
        "batch_size": 2, "seq_len": 128, "lr": 2e-4, "lr_scheduler": "constant", "warmup_steps": 0, "save_steps": 6,
        "query_chunk": 128,
    },
}


# The main job's recipe with its dense predictions held: a dense forward of the student distilled to the original on
# each batch (dense_weight 3), λ = 1 instead of 5, peak learning rate 6e-4 over 34 steps instead of 3e-4 over 40: the
# sparse-aware forward alone left dense perplexity at x1.084 of the original's, λ = 5 with weight 1 at x1.018; at
# 3e-4 (40 steps) top-8 stopped at x1.232 of the model's own dense (λ = 2: x1.235); 5e-4 reached x1.212 but 40 steps
# overran 15 minutes on a slow host; 34 steps at 6e-4: x1.217, dense x1.004, 14 min 38 s (docs/condense.md).
PRESETS["smollm2-keep-15min-anchored"] = {**PRESETS["smollm2-keep-15min"], "lam": 1.0, "dense_weight": 3.0,
                                          "lr": 6e-4, "steps": 34}
# The main job's control: the same data, steps and optimiser with no condensation (λ = 0, dense forward). The
# student starts at KL 0, but Adam rescales the tiny gradients, so it does move a little.
PRESETS["smollm2-keep-15min-control"] = {**PRESETS["smollm2-keep-15min"], "lam": 0.0, "sparse_aware": False,
                                         "lr": 6e-4, "steps": 34}


# The all-weights held-dense recipe aimed at top-16 and trained longer at a higher peak learning rate: k 64 -> 16
# over 30 steps, 60 steps of 2 x 1024 tokens (~123k tokens) at peak lr 3e-4 (the main job's recipe gained from
# 3e-4 -> 6e-4). Measured: WikiText-2 test top-16 x1.014 of the original's dense (the 40-step k 8 run at 1e-4:
# x1.033); a median 126 s a step at 2 threads on shared cores, 1 h 54 min (docs/condense.md).
PRESETS["smollm2-keep-all-top16"] = {**PRESETS["smollm2-keep-all-anchored"], "k": 16, "k_anneal_steps": 30,
                                     "steps": 60, "lr": 3e-4, "warmup_steps": 6}


def preset_config(name: str, **overrides: Any) -> CondenseConfig:
    """A preset's config with `overrides` applied (None values are ignored); a refining preset needs its start model."""
    if name not in PRESETS:
        raise AttnsparseError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    if name in REFINES and overrides.get("model") in (None, PRESETS[name]["model"]):
        raise AttnsparseError(f"preset '{name}' refines a model condensed by preset '{REFINES[name]}': give that "
                              f"run's model/ directory as MODEL (attnsparse condense RUN/model --preset {name} ...)")
    base = CondenseConfig(**PRESETS[name], preset=name)
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


# The top-8 all-weights recipe with 160 windows sampled from the original itself beside WikiText-2 valid's 358 (31 %
# of the batches): the teacher's own text carries no corpus's domain, against the other-domain gap of distilling on
# WikiText alone (top-8 x1.059 on WikiText-2 test, x1.203 on builtin:test; docs/condense.md).
PRESETS["smollm2-keep-all-top8-sampled"] = {**PRESETS["smollm2-keep-all-top16"], "k": 8, "sampled": 160}
# The top-8 recipe on windows of 2048 tokens (one a step, the same tokens a step as 2 x 1024): trained at 1024, every
# all-weights recipe loses the passkey wherever the question is past 1K tokens and the needle within ~1.2K of it
# (benchmarks/results/passkey_position_smollm2.json). Trained at 2048 it reads them all (4K passkey 30/30, top-8
# x1.049 of the original's dense on WikiText-2 test; condense_keep_smollm2_top8_2k.json, docs/condense.md).
PRESETS["smollm2-keep-all-top8-2k"] = {**PRESETS["smollm2-keep-all-top16"], "k": 8, "seq_len": 2048, "grad_accum": 1}
# The 2K top-8 model refined at 4096 tokens, still distilled to the original (the teacher is named, or the KL would
# pull towards the condensed start): 20 steps x 4096 tokens (82k) at k 8 throughout, constant lambda, gradient
# checkpointing (peak RSS 16.4 GiB at 4096). Measured: WikiText-2 test top-8 x1.024 of the original's dense (x1.048
# before), 8K decode under block:16:0.0625:channels32 x0.994 of the original's dense decode; 83 min on 2 cores
# (condense_keep_smollm2_top8_refine4k.json, docs/condense.md). MODEL is the 2K run's model/ directory.
PRESETS["smollm2-keep-all-top8-4k-refine"] = {
    **PRESETS["smollm2-keep-all-top8-2k"], "teacher": "smollm2-135m", "seq_len": 4096, "k_start": 8,
    "k_anneal_steps": 0, "lambda_schedule": "constant", "steps": 20, "lr": 1.5e-4, "warmup_steps": 2, "seed": 1,
    "save_steps": 5, "gradient_checkpointing": True,
}
# Presets that continue another preset's condensed model (preset -> the preset that made their start).
REFINES: dict[str, str] = {"smollm2-keep-all-top8-4k-refine": "smollm2-keep-all-top8-2k"}
