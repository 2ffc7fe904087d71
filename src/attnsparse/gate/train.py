"""Train a block gate by self-distillation on the frozen model (`attnsparse gate MODEL --out DIR`).

Two phases. Collect: each training window goes through the model once, forward only (inference mode), with the
`BlockPoolRecorder` observer; its per-layer targets and gate inputs are saved to `features/window-NNNN.safetensors`
as they come, so an interrupted run started again with the same settings reuses them (the model's forward is the
whole cost). Fit: Adam on the gate's projections only, full batch over the training windows, loss = mean over
layers of KL(block-pooled attention || gate); the last `holdout` windows are never trained on and report the
held-out KL, beside the KL of the training-free estimate softmax(pooled q . mean key / sqrt(D)) on them.
The run directory follows `attnsparse.core.runs.RunDir` (config.json status running, then finished) and ends with
gate.safetensors + gate.json, loadable by `BlockGate.load(DIR)`.
Both phases run on the model's device (`--device`, default cuda when available): windows, the recorder's
features (kept there for the fit; each window is copied to the host once, to its feature file) and the gate.
`--dtype` is the frozen model's precision; the features and the gate stay float32 (the recorder pools float32
attention), and the gate's first weights are drawn on the CPU, so a seed starts the same gate on every device.
"""

from __future__ import annotations

import json
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attnsparse.attention.backend import sparse_attention
from attnsparse.core.devices import check_placement, model_device, model_dtype, placement, resolve_device, resolve_dtype
from attnsparse.core.runs import RunDir, atomic_write_bytes, atomic_write_text
from attnsparse.errors import AttnsparseError
from attnsparse.gate.kept import gate_report, mean_key_logits
from attnsparse.gate.model import (
    BlockGate,
    GateConfig,
    PreparedTarget,
    block_kl,
    forced_mask,
    merged_kl,
    prepare_target,
    prepared_kl,
)
from attnsparse.gate.observer import BlockPoolRecorder, PooledLayer

KIND = "gate"
Features = list[PooledLayer]  # one window: a record per layer, in layer order


@dataclass(frozen=True)
class GateTrainConfig:
    """Everything a gate run depends on (its config.json); equal settings let an unfinished run reuse features."""

    model: str = "smollm2-135m"
    data: str | None = None  # text spec (attnsparse.core.data.load_text); None: the built-in text
    synthetic: float = 0.25  # share of synthetic retrieval/copy documents (attnsparse.condense.mixture)
    ctx: int = 2048
    positions: int = 0  # windows start at random positions in [0, positions - ctx] (0: at position 0)
    windows: int = 16  # windows in all, `holdout` of them held out
    holdout: int = 2
    block: int = 64
    rank: int = 0  # 0: the model's head dim (what `init="mean"` needs)
    steps: int = 300
    lr: float = 1e-2
    seed: int = 0
    loss: str = "merged"  # GateLoss.kind
    init: str = "mean"  # INITS
    sink: int = 1  # the always-kept blocks the merged loss pools (blocksparse's and decode's defaults)
    local: int = 1
    density: float = 0.1  # the block density at which held-out kept mass is reported (attnsparse.gate.kept)

    def check(self) -> None:
        """One-line errors for settings that cannot work, before the model is loaded."""
        if self.ctx < 2 * self.block:
            raise AttnsparseError(f"--ctx {self.ctx} must hold at least two blocks of --block {self.block}")
        if self.block < 1 or self.rank < 0:
            raise AttnsparseError(f"--block {self.block} must be >= 1 and --rank {self.rank} >= 1 (0: the head dim)")
        if self.loss not in LOSSES or self.init not in INITS:
            raise AttnsparseError(f"--loss {self.loss} / --init {self.init}: choose a loss of {', '.join(LOSSES)} and "
                                  f"an init of {', '.join(INITS)}")
        if not 0.0 < self.density <= 1.0:
            raise AttnsparseError(f"--density {self.density} must be a share of block pairs in (0, 1]")
        if self.sink < 0 or self.local < 1:
            raise AttnsparseError(f"--sink {self.sink} must be >= 0 and --local {self.local} >= 1")
        if not 0 <= self.holdout < self.windows:
            raise AttnsparseError(f"--holdout {self.holdout} must leave training windows of --windows {self.windows}")
        if self.steps < 1 or not self.lr > 0:
            raise AttnsparseError(f"--steps {self.steps} must be >= 1 and --lr {self.lr} > 0")
        if self.positions and self.positions < self.ctx:
            raise AttnsparseError(f"--positions {self.positions} must be 0 or at least --ctx {self.ctx}")
        if not 0.0 <= self.synthetic < 1.0:
            raise AttnsparseError(f"--synthetic {self.synthetic} must be a share in [0, 1)")


LOSSES = ("merged", "whole")
INITS = ("mean", "random")


@dataclass(frozen=True)
class GateLoss:
    """The fit's per-layer loss: KL to the block-pooled attention over whole rows (`whole`), or with the blocks
    selection always keeps (sink, local) merged into one outcome (`merged`, `merged_kl`): whole-row KL spends the
    gate's capacity on how mass splits between the sink and the diagonal, which no selection reads."""

    kind: str = "merged"
    sink: int = 1
    local: int = 1

    def __call__(self, log_probs: torch.Tensor, record: PooledLayer) -> torch.Tensor:
        if self.kind == "whole":
            return block_kl(record.target, log_probs)
        return merged_kl(record.target, log_probs, self.forced(record))

    def forced(self, record: PooledLayer) -> torch.Tensor:
        """(Nq, Nk) the blocks merged into one outcome (none for `whole`)."""
        sink, local = (0, 0) if self.kind == "whole" else (self.sink, self.local)
        return forced_mask(record.query_blocks, record.target.shape[-1], sink, local)

    def prepare(self, record: PooledLayer, in_place: bool = False) -> FitLayer:
        """The record as the fit reads it (`PreparedTarget`); `in_place` reuses the record's target tensor."""
        prepared = prepare_target(record.target, record.query_blocks, self.forced(record), in_place)
        return FitLayer(prepared, record.pooled_q, record.pooled_k, record.query_blocks)


@dataclass
class FitLayer:
    """One layer's training rows with their target prepared once (`GateLoss.prepare`)."""

    target: PreparedTarget
    pooled_q: torch.Tensor
    pooled_k: torch.Tensor
    query_blocks: torch.Tensor


@dataclass
class GateResult:
    gate: BlockGate
    notes: dict[str, Any]
    out: Path | None


def collect_features(model: PreTrainedModel, ids: torch.Tensor, block: int, offset: int = 0) -> Features:
    """One window (1, T) through the frozen model with the recorder: its per-layer records, in layer order.

    `offset` shifts the window's positions (RoPE sees positions offset..offset + T - 1): post-RoPE queries and keys
    depend on absolute position, so a gate meant for long contexts must see long positions, at short-window cost."""
    recorder = BlockPoolRecorder(block)
    positions = torch.arange(offset, offset + ids.shape[1], device=ids.device)[None]
    with torch.no_grad(), sparse_attention(model, "dense", observers=[recorder]):
        model(ids, position_ids=positions)
    layers = recorder.layers()
    return [layers[index] for index in sorted(layers)]


def stack_windows(features: list[Features]) -> Features:
    """Windows of one length batched per layer (one gate call per layer and step instead of one per window)."""
    if not features:
        return []
    return [PooledLayer(*(torch.cat([getattr(window[layer], name) for window in features])
                          for name in ("target", "pooled_q", "pooled_k")), features[0][layer].query_blocks)
            for layer in range(len(features[0]))]


def layer_kl(gate: BlockGate, layer: int, record: PooledLayer | FitLayer, loss: GateLoss = GateLoss()) -> torch.Tensor:
    """The loss (default: merged KL) over one layer's rows; from a `FitLayer` without rebuilding the target's parts."""
    if isinstance(record, FitLayer):
        return prepared_kl(gate.logits(layer, record.pooled_q, record.pooled_k, record.query_blocks), record.target)
    return loss(gate.log_probs(layer, record.pooled_q, record.pooled_k, record.query_blocks), record)


def fit_layers(train: Features | list[FitLayer], loss: GateLoss, in_place: bool = False) -> list[FitLayer]:
    """The training records prepared for the fit (those already prepared pass through)."""
    return [record if isinstance(record, FitLayer) else loss.prepare(record, in_place) for record in train]


def features_kl(gate: BlockGate, batched: Features | list[FitLayer], loss: GateLoss = GateLoss()) -> torch.Tensor:
    """Mean over layers of the loss, each layer's rows being every window's (`stack_windows`)."""
    return torch.stack([layer_kl(gate, layer, record, loss) for layer, record in enumerate(batched)]).mean()


def mean_key_kl(batched: Features, scaling: float, loss: GateLoss = GateLoss()) -> float:
    """The loss of the training-free estimate softmax(scaling x pooled q . mean key) on the same rows (a baseline)."""
    return float(torch.stack([loss(torch.log_softmax(mean_key_logits(record, scaling), -1), record)
                              for record in batched]).mean())


def fit_gate(gate: BlockGate, train: Features | list[FitLayer], steps: int, lr: float,
             log: list[dict[str, Any]] | None = None, holdout: Features | None = None,
             loss: GateLoss = GateLoss()) -> BlockGate:
    """Adam on the gate's parameters only (the features carry no graph), full batch over `stack_windows` records
    (prepared once, `fit_layers`); appends the KL to `log` about ten times."""
    train = fit_layers(train, loss)
    gate.requires_grad_(True)
    optimizer = torch.optim.Adam(gate.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    every = max(1, steps // 10)
    for step in range(1, steps + 1):
        value = fit_step(gate, optimizer, train, loss)
        schedule.step()
        if log is not None and (step % every == 0 or step in (1, steps)):
            row: dict[str, Any] = {"step": step, "train_kl": float(value.detach())}
            if holdout:
                with torch.no_grad():
                    row["holdout_kl"] = float(features_kl(gate, holdout, loss))
            log.append(row)
    return gate.requires_grad_(False)


def fit_step(gate: BlockGate, optimizer: torch.optim.Optimizer, train: Features | list[FitLayer],
             loss: GateLoss = GateLoss()) -> torch.Tensor:
    """One full-batch step on the features' device: KL forward, backward, optimizer step; the loss, not synced.

    Each layer's KL is backpropagated on its own (the gradient of the mean is the sum of the layers' / L), so only
    one layer's graph is alive at a time: at 8K in blocks of 16 a layer's graph is ~0.2 GB per window."""
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=gate.wq.device)
    for layer, record in enumerate(train):
        value = layer_kl(gate, layer, record, loss)
        (value / len(train)).backward()
        total += value.detach()
    optimizer.step()
    return total / max(1, len(train))


def attention_scaling(model: PreTrainedModel, head_dim: int) -> float:
    """The score scale of the model's attention modules (transformers sets `scaling` on each), else 1 / sqrt(D)."""
    for module in model.modules():
        value = getattr(module, "scaling", None)
        if hasattr(module, "layer_idx") and isinstance(value, float):
            return value
    return head_dim**-0.5


def training_windows(tokenizer: PreTrainedTokenizerBase, config: GateTrainConfig) -> torch.Tensor:
    """(windows, ctx) evenly spaced windows of the text with the synthetic retrieval/copy documents mixed in."""
    from attnsparse.condense.mixture import mix_synthetic
    from attnsparse.core.data import load_text, tokenize, windows

    text = mix_synthetic(load_text(config.data), config.synthetic, seed=config.seed)
    return windows(tokenize(tokenizer, text), config.ctx, count=config.windows)


def window_offsets(config: GateTrainConfig) -> list[int]:
    """Each window's first position: 0, or seeded random multiples of the block in [0, positions - ctx]."""
    if not config.positions:
        return [0] * config.windows
    rng = random.Random(config.seed)
    slots = (config.positions - config.ctx) // config.block
    return [rng.randint(0, slots) * config.block for _ in range(config.windows)]


def train_gate(config: GateTrainConfig, out: str | Path | None = None, *, overwrite: bool = False,
               model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
               progress: bool = False, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> GateResult:
    """Collect the frozen model's block-pooled attention, fit the gate, save it into `out` (a run directory).

    `device` / `dtype` load `config.model` there (defaults: cuda when available, float32); a `model` passed in
    stays where it is (a device or dtype it does not have is an error)."""
    from attnsparse.core.data import check_context
    from attnsparse.core.models import ModelShape, load_model

    config.check()
    if device is not None:
        resolve_device(device)  # a device this machine lacks fails before anything is read or written
    if dtype is not None:
        resolve_dtype(dtype)
    run = RunDir(out, KIND) if out is not None else None
    previous = run.check(overwrite).previous if run is not None else None
    if model is None or tokenizer is None:
        loaded = load_model(config.model, dtype, device=device)
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        check_placement(model, device, dtype)
    where = model_device(model)
    record = asdict(config) | placement(where, model_dtype(model))
    shape = ModelShape.of(model)
    check_context(max(config.ctx, config.positions), shape.need("max_context"), "--ctx / --positions")
    gate_config = GateConfig(shape.need("layers"), shape.need("heads"), shape.need("kv_heads"), shape.need("head_dim"),
                             config.block, config.rank or shape.need("head_dim"), config.model)
    scaling = attention_scaling(model, gate_config.head_dim)
    gate = BlockGate(gate_config, seed=config.seed)
    if config.init == "mean":
        gate.start_at_mean_key(scaling)  # a rank below the head dim fails here, before anything is written
    gate = gate.to(where)
    loss = GateLoss(config.loss, config.sink, config.local)
    ids = training_windows(tokenizer, config)
    offsets = window_offsets(config)
    resume = previous is not None and not previous.finished and previous.config == record
    path = run.start(record, clear=not resume) if run is not None else None
    with run.guard(lambda: f"{path} keeps the features collected so far; run the same command again to go on"
                   ) if run is not None else nullcontext():
        cpu_started = time.process_time()
        started = time.perf_counter()
        features, reused = [], 0
        for index in range(len(ids)):
            stored = _read_features(path, index, where) if path is not None else None
            if stored is None:
                stored = collect_features(model, ids[index : index + 1].to(where), config.block, offsets[index])
                if path is not None:
                    _write_features(path, index, stored)
            else:
                reused += 1
            features.append(stored)
            if progress:
                print(f"collected window {index + 1}/{len(ids)}", flush=True)
        collect_seconds = time.perf_counter() - started
        # the stacked copy is the training rows' only copy: the fit reuses its target tensors in place
        train = fit_layers(stack_windows(features[: len(features) - config.holdout]), loss, in_place=True)
        held = stack_windows(features[len(features) - config.holdout:])
        del features
        log: list[dict[str, Any]] = []
        started = time.perf_counter()
        with torch.no_grad():
            initial = {"train_kl": float(features_kl(gate, train, loss))}
            if held:
                initial["holdout_kl"] = float(features_kl(gate, held, loss))
        fit_gate(gate, train, config.steps, config.lr, log, held, loss)
        fit_seconds = time.perf_counter() - started
        kept = gate_report(gate, held, scaling, block=config.block, ctx=config.ctx, density=config.density,
                           sink=config.sink, local=config.local) if held else None
        notes: dict[str, Any] = {
            "tokens": int(ids.numel()), "train_windows": config.windows - config.holdout, "holdout_windows": config.holdout,
            "ctx": config.ctx, "offsets": offsets, "data": config.data, "synthetic": config.synthetic,
            "collect_seconds": round(collect_seconds, 2), "fit_seconds": round(fit_seconds, 2),
            "windows_reused": reused, "threads": torch.get_num_threads(), **placement(where, model_dtype(model)),
            "cpu_seconds": round(time.process_time() - cpu_started, 2),  # this process's CPU time, both phases
            "initial": initial, "final": log[-1], "loss": config.loss, "init": config.init, "scaling": scaling,
            "mean_key_holdout_kl": mean_key_kl(held, scaling, loss) if held else None,
            "holdout_kept_mass": kept,
        }
        if path is not None:
            atomic_write_text(path / "train_log.jsonl", "".join(json.dumps(row) + "\n" for row in log))
            gate.save(path, notes)
            run.finish(record)  # type: ignore[union-attr]
    return GateResult(gate, notes, path)


def _feature_file(path: Path, index: int) -> Path:
    return path / "features" / f"window-{index:04d}.safetensors"


def _write_features(path: Path, index: int, features: Features) -> None:
    from safetensors.torch import save

    tensors = {}
    for layer, record in enumerate(features):
        for name in ("target", "pooled_q", "pooled_k", "query_blocks"):
            tensors[f"{layer}.{name}"] = getattr(record, name).to("cpu").contiguous()  # the window's one host copy
    atomic_write_bytes(_feature_file(path, index), save(tensors))


def _read_features(path: Path, index: int, device: torch.device) -> Features | None:
    """A window's stored features on `device`, or None when absent or unreadable (it is collected again)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = _feature_file(path, index)
    if not file.is_file():
        return None
    try:
        tensors = load_file(str(file), device=str(device))
    except (SafetensorError, OSError):
        return None
    layers = sorted({int(name.split(".")[0]) for name in tensors})
    try:
        return [PooledLayer(*(tensors[f"{layer}.{name}"] for name in ("target", "pooled_q", "pooled_k",
                                                                       "query_blocks"))) for layer in layers]
    except KeyError:
        return None
