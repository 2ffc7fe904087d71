"""The condensation `Trainer`: LM (or distillation) loss + λ·condensation loss computed inside the attention backend.

The regularizer is an observer of the attnsparse backend, attached to the model's config object before the
Trainer wraps the model; DDP, FSDP and peft wrappers keep the inner attention modules and their `config`, so the
backend finds the same state however the model is wrapped. Each step's loss components are averaged over
gradient-accumulation micro-batches and over processes, drive the constrained λ, and are appended to a JSONL log.
Checkpoints are written into a staging directory and renamed into place, so `checkpoint-N` is complete or absent.
Three private Trainer methods are overridden because no public hook exists for them: `_save_checkpoint` and
`_get_output_dir` (to write each checkpoint under a staging directory), `_get_grad_norm` (the gradient norm before
clipping, to stop on a non-finite one). pyproject.toml pins transformers to the range tested with them (5.23-5.24).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from attnsparse.attention.backend import BackendState
from attnsparse.attention.policies import DENSE, HeadBudget, TopK, parse_policy, read_budget
from attnsparse.condense.anchor import anchor_pairs, pull_toward_anchor
from attnsparse.condense.checkpoints import CHECKPOINT_PREFIX, STATE_FILE, checkpoints, rotate
from attnsparse.condense.config import CondenseConfig
from attnsparse.condense.distill import distillation_kl, lm_loss
from attnsparse.condense.losses import CondensationLoss, CondensationRegularizer, parse_loss
from attnsparse.condense.schedules import ConstrainedLambda, k_at, lambda_at
from attnsparse.errors import AttnsparseError

__all__ = ["CondenseTrainer", "NonFiniteStop", "checkpoints", "install_callbacks"]  # checkpoints: kept importable
_COMPONENTS = ("loss", "lm", "cond", "kd", "kd_dense", "topk_mass", "teacher_lm")


class NonFiniteStop(AttnsparseError):
    """Training stopped on a NaN or infinite loss, gradient or weight; carries what the run directory records."""

    def __init__(self, reason: str, step: int, values: dict[str, float], last_checkpoint: Path | None) -> None:
        self.reason, self.step, self.values, self.last_checkpoint = reason, step, values, last_checkpoint
        shown = ", ".join(f"{name}={value:.4g}" for name, value in values.items())
        kept = ("no checkpoint was written yet" if last_checkpoint is None
                else f"the last good checkpoint is {last_checkpoint}")
        super().__init__(
            f"{reason} at step {step}{f' ({shown})' if shown else ''}; training stopped and config.json says status stopped; {kept}. "
            "Start a new run with a lower --lr or --lambda (--overwrite to replace this one, or a new --out); "
            "--resume would repeat the same steps"
        )

    def record(self) -> dict[str, Any]:
        """The stop as config.json keeps it (non-finite values as strings, so the file stays strict JSON)."""
        return {"reason": self.reason, "step": self.step,
                "values": {name: value if math.isfinite(value) else str(value) for name, value in self.values.items()},
                "last_checkpoint": None if self.last_checkpoint is None else str(self.last_checkpoint)}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


class CondenseTrainer(Trainer):
    """Trainer whose loss is `[LM] + λ·L_cond [+ β·KL(teacher‖student)]`, with the extras condensation needs."""

    def __init__(
        self,
        *args: Any,
        condense: CondenseConfig,
        regularizer: CondensationRegularizer,
        backend_state: BackendState,
        teacher: torch.nn.Module | None = None,
        controller: ConstrainedLambda | None = None,
        log_path: Path | None = None,
        last_checkpoint: Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; Trainer divides by GA steps
        self.condense = condense
        self.regularizer = regularizer
        self.backend_state = backend_state
        self.teacher = teacher
        self.controller = controller
        self.log_path = log_path
        self.last_checkpoint = last_checkpoint
        self.last_record: dict[str, Any] | None = None
        self._micro: list[dict[str, float]] = []
        self._grad_norm: float | None = None
        self._staging_root: Path | None = None
        self._losses: dict[int, CondensationLoss] = {}
        self._budget: HeadBudget | None = None
        self._budgets: dict[int, HeadBudget] = {}
        self._forward_policy = parse_policy(condense.sparse_policy) if condense.sparse_policy else None
        self._started = time.perf_counter()
        # the original's weights the trained ones decay towards (--anchor-weight): the frozen teacher's when there is one
        # (the original, or the starting weights), else a copy of the starting weights, taken before any resume
        self._anchor = anchor_pairs(self.model, teacher) if condense.anchor_weight > 0 else []

    # ---- FSDP on CPU ------------------------------------------------------------------------------

    def create_accelerator_and_postprocess(self) -> None:
        """Trainer's accelerator; FSDP requested across CPU processes (gloo) is switched on here, because accelerate
        enables its FSDP plugin only for accelerator devices while torch's FSDP2 (`fully_shard`) also shards over
        CPU processes. Anywhere else a requested FSDP that accelerate did not enable is a one-line error."""
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is None or self.is_fsdp_enabled:
            return
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if state.distributed_type != DistributedType.MULTI_CPU:
            raise AttnsparseError(f"--fsdp needs several processes (torchrun / accelerate launch); this run is "
                                  f"{state.distributed_type.value.lower()} with {state.num_processes} process(es)")
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        state.distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP every process gathers the full weights (a collective) and process 0 saves them as usual."""
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        state = full_state_dict(self.model)
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state)
        return None

    # ---- schedules ------------------------------------------------------------------------------

    def current_k(self) -> int:
        c = self.condense
        return k_at(self.state.global_step, c.k, c.k_start, c.k_anneal_steps, c.k_schedule)  # type: ignore[arg-type]

    def current_lambda(self) -> float:
        if self.controller is not None:
            return self.controller.lam
        c = self.condense
        return lambda_at(self.state.global_step, c.lam, c.lambda_schedule, c.lambda_ramp_steps, c.steps)  # type: ignore[arg-type]

    def _loss_at(self, k: int) -> CondensationLoss:
        if k not in self._losses:
            self._losses[k] = parse_loss(self.condense.loss_spec(k))
        return self._losses[k]

    def _budget_at(self, k: int) -> HeadBudget | None:
        """The head budget rescaled to mean k (None without --budget); the loss and the sparse forward follow it."""
        if self.condense.budget is None:
            return None
        if self._budget is None:
            self._budget = read_budget(self.condense.budget)
        if k not in self._budgets:
            self._budgets[k] = self._budget.scaled(k)
        return self._budgets[k]

    # ---- the loss -------------------------------------------------------------------------------

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Forward inside the backend with the regularizer attached; returns the combined loss."""
        c = self.condense
        k, lam = self.current_k(), self.current_lambda()
        self.regularizer.loss = self._loss_at(k)
        budget = self._budget_at(k)
        self.regularizer.budget = budget
        sparse = self._forward_policy or (budget if budget is not None else TopK(k))
        self.backend_state.policy = sparse if c.sparse_aware else DENSE
        self.regularizer.reset()
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        outputs = model(input_ids=ids, attention_mask=mask, use_cache=False)
        logits = outputs.logits
        cond = self.regularizer.value().to(logits.device)
        lm = lm_loss(logits, ids, mask)
        total = lam * cond + (lm if c.distill != "only" else 0.0)
        parts = {"lm": float(lm.detach()), "cond": float(cond.detach()), "kd": 0.0, "kd_dense": 0.0,
                 "teacher_lm": math.nan}
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
            kd = distillation_kl(logits, teacher_logits, c.temperature, mask)
            total = total + c.distill_weight * kd
            parts["kd"] = float(kd.detach())
            parts["teacher_lm"] = float(lm_loss(teacher_logits, ids, mask))
            if c.dense_weight > 0:
                kd_dense = distillation_kl(self._dense_logits(model, ids, mask), teacher_logits, c.temperature, mask)
                total = total + c.dense_weight * kd_dense
                parts["kd_dense"] = float(kd_dense.detach())
        parts["topk_mass"] = float(self.regularizer.diagnostics()["topk_mass"])
        parts["loss"] = float(total.detach())
        self._check_finite(total, parts)
        self._micro.append(parts | {"k": k, "lambda": lam, "lr": self._lr()})
        self.regularizer.reset()  # drop the graph references; backward keeps what it needs
        return (total, outputs) if return_outputs else total

    def _dense_logits(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The student's logits under dense attention with no observer (so the backend may take torch SDPA): the
        forward the `dense_weight` term distils, kept apart from the regularizer's rows of the sparse forward."""
        state = self.backend_state
        policy, observers = state.policy, state.observers
        state.policy, state.observers = DENSE, []
        try:
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            state.policy, state.observers = policy, observers

    def _lr(self) -> float:
        try:
            return float(self._get_learning_rate())
        except Exception:  # noqa: BLE001 - no scheduler yet
            return float(self.args.learning_rate)

    def _check_finite(self, total: torch.Tensor, parts: dict[str, float]) -> None:
        """Stop every process together with a clear error when the loss is NaN or infinite."""
        ok = torch.tensor([1.0 if torch.isfinite(total.detach()).item() else 0.0], device=total.device)
        if _distributed():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() < 1.0:
            shown = ("lm", "cond", "kd") if self.teacher is not None else ("lm", "cond")
            step = self.state.global_step + 1
            if torch.isfinite(total.detach()).item():  # this process is fine; another one is not
                raise NonFiniteStop("non-finite loss on another process", step, {}, self.last_checkpoint)
            raise NonFiniteStop("non-finite loss", step, {name: parts[name] for name in shown}, self.last_checkpoint)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        """Record the gradient norm for the log, and refuse to step with a non-finite gradient."""
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = float(norm) if norm is not None else math.nan
        self._grad_norm = value
        if norm is not None and not math.isfinite(value):
            raise NonFiniteStop("non-finite gradient norm (before the optimizer step)", self.state.global_step + 1,
                                {"grad_norm": value}, self.last_checkpoint)
        return norm

    # ---- end of step: averages, λ, log ------------------------------------------------------------

    def end_step(self) -> dict[str, Any]:
        """Pull the weights towards the anchor (--anchor-weight); average this step's micro-batches (and processes),
        update the constrained λ, append the log."""
        micro, self._micro = self._micro, []
        if not micro:
            return self.last_record or {}
        if self._anchor:
            pull_toward_anchor(self._anchor, micro[0]["lr"] * self.condense.anchor_weight)
        values = torch.tensor([[m[key] for key in _COMPONENTS] for m in micro], dtype=torch.float64).mean(0)
        if _distributed():
            world = dist.get_world_size()
            values = values.to(self.args.device)
            dist.all_reduce(values)
            values = (values / world).cpu()
        avg = dict(zip(_COMPONENTS, (float(v) for v in values)))
        record: dict[str, Any] = {"step": self.state.global_step, **avg, "lambda": micro[0]["lambda"],
                                  "k": micro[0]["k"], "lr": micro[0]["lr"], "grad_norm": self._grad_norm}
        if self.controller is not None:
            teacher_lm = avg["teacher_lm"] if self.teacher is not None else None
            record["lambda_next"] = self.controller.update(avg["lm"], teacher_lm)
            record["excess_ema"] = self.controller.excess_ema
        if self.teacher is None:
            record.pop("teacher_lm")
        record["elapsed_s"] = round(time.perf_counter() - self._started, 3)
        self.last_record = record
        if self.log_path is not None and self.is_world_process_zero():
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        return record

    # ---- atomic checkpoints --------------------------------------------------------------------

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging_root is not None:
            return str(self._staging_root)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Trainer's checkpoint, written under a staging directory and renamed to `checkpoint-N` when complete."""
        step = self.state.global_step
        self._check_finite_weights(step)
        root = Path(self.args.output_dir)
        staging = root / f".staging-{CHECKPOINT_PREFIX}{step}"
        final = root / f"{CHECKPOINT_PREFIX}{step}"
        if self.is_world_process_zero():
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        _barrier()
        self._staging_root = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        written = staging / final.name
        if self.is_world_process_zero():
            state = {"step": step, "controller": None if self.controller is None else self.controller.state_dict()}
            (written / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        _barrier()
        if self.is_world_process_zero():
            _fsync_tree(written)
            if final.exists():
                shutil.rmtree(final)
            os.replace(written, final)
            shutil.rmtree(staging, ignore_errors=True)
            _fsync_dir(root)
            rotate(root, self.condense.save_total_limit)
        _barrier()
        self.last_checkpoint = final

    def _check_finite_weights(self, step: int) -> None:
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad and not torch.isfinite(parameter.detach()).all():
                raise NonFiniteStop(f"parameter {name} is non-finite (no checkpoint written for it)", step, {},
                                    self.last_checkpoint)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on process 0's host when FSDP shards them (every process must call it), None
    when the model is not sharded (its own state_dict is whole)."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _fsync_tree(directory: Path) -> None:
    """Flush every file of a checkpoint to disk before it is renamed into place."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StepCallback(TrainerCallback):
    """Calls `CondenseTrainer.end_step` after every optimizer step (before logging and saving)."""

    def __init__(self, trainer: CondenseTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.end_step()


class CondenseProgress(ProgressCallback):
    """Trainer's progress bar, with the latest loss components as its postfix instead of printed log dicts."""

    def __init__(self, trainer: CondenseTrainer) -> None:
        super().__init__()
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_step_end(args, state, control, **kwargs)
        record = self.trainer.last_record
        if self.training_bar is not None and record:
            self.training_bar.set_postfix(
                lm=f"{record['lm']:.3f}", cond=f"{record['cond']:.3f}", kd=f"{record['kd']:.3f}",
                mass=f"{record['topk_mass']:.3f}", lam=f"{record['lambda']:.3g}", k=record["k"], refresh=False,
            )

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        return None


def install_callbacks(trainer: CondenseTrainer, progress: bool) -> None:
    """Replace Trainer's printing callbacks by the step hook and (optionally) the component progress bar."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(StepCallback(trainer))
    if progress:
        trainer.add_callback(CondenseProgress(trainer))
