"""`measure`: a model's per-layer, per-head attention sparsity profile over windows of a text.

Every window goes through the attnsparse backend under the dense policy with a `Recorder` observer, which
reduces each chunk of attention rows into streaming accumulators at once, so memory stays at one query
chunk's rows no matter how many windows are measured. With `out`, the run directory gets config.json,
profile.json, profile.csv, the mergeable accumulator state, PNG plots and a self-contained report.html.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from attnsparse.core.devices import (
    check_placement,
    model_device,
    model_dtype,
    placement,
    resolve_device,
    resolve_dtype,
)
from attnsparse.core.runs import RunDir
from attnsparse.errors import AttnsparseError
from attnsparse.measure.profile import Profile, ProfileConfig, ProfileRetrieval, ProfileView, Recorder
from attnsparse.measure.report import summary_table, write_report

KIND = "measure"
DEFAULT_QUERY_CHUNK = 128
RETRIEVAL_TASKS = "passkey,niah-multikey,niah-multivalue,variable-tracking"  # the tasks that copy from a needle
RETRIEVAL_DEPTHS = (0.1, 0.5, 0.9)
RETRIEVAL_SEED = 1  # not evaluate's default seed 0: heads are chosen on other prompts than the ones they are tested on


def _model_facts(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, query heads, kv heads) recorded in the profile."""
    from attnsparse.core.models import ModelShape

    shape = ModelShape.of(model)
    return shape.need("layers"), shape.need("heads"), shape.need("kv_heads")


def _forward_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """Skip what measure does not need: full-vocabulary logits (GBs at long context) and the KV cache."""
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


def measure(
    model: Any = "smollm2-135m",
    data: str | torch.Tensor | None = None,
    ctx: int = 1024,
    windows: int = 8,
    out: str | Path | None = None,
    *,
    ks: Sequence[int] | None = None,
    deltas: Sequence[float] = (0.01, 0.05, 0.1),
    eps: Sequence[float] = (1e-3, 1e-2, 1e-1),
    sink_tokens: int = 4,
    local_window: int = 64,
    stream_delta: float = 0.1,
    fit_delta: float = 0.05,
    fit_min_n: int = 16,
    batch_size: int = 1,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
    retrieval: bool = False,
    retrieval_trials: int = 2,
    retrieval_threshold: float = 0.1,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Profile:
    """Measure `model` (a spec for `load_model`, or a LoadedModel) on `windows` evenly spaced windows of `ctx` tokens.

    `data` is a text spec for `attnsparse.core.data.load_text` (file, hf:NAME, None = built-in), or token ids:
    a 1-D tensor (windows are cut from it) or a 2-D (M, ctx) tensor used as the windows themselves.
    `echo` prints the final summary table (None: silent). Returns the Profile; with `out`, writes the run directory.
    `retrieval` also measures per-head retrieval scores (docs/tasks.md) on the retrieval tasks at length ctx, depths
    0.1/0.5/0.9, `retrieval_trials` prompts each (seed 1, haystack `data` when it is a text spec), and stores them in
    the profile with the `retrieval` class for heads scoring at least `retrieval_threshold`.
    `device` / `dtype` load a model spec there (defaults: cuda when available, float32); a LoadedModel stays where
    it is, and a device or dtype it does not have is an error. Windows, attention rows and the profile's
    accumulators live on the model's device; the sums come back to the host once, at the end.
    """
    if ks is not None and len(list(ks)) == 0:
        raise AttnsparseError("the k list is empty; pass at least one k (e.g. --k 1,8,64)")
    if windows < 1:
        raise AttnsparseError(f"window count {windows} must be >= 1")
    if batch_size < 1:
        raise AttnsparseError(f"batch size {batch_size} must be >= 1")
    if query_chunk < 1:
        raise AttnsparseError(f"query chunk {query_chunk} must be >= 1")
    if retrieval and retrieval_trials < 1:
        raise AttnsparseError(f"--retrieval-trials {retrieval_trials} must be >= 1")
    if retrieval and not 0.0 <= retrieval_threshold <= 1.0:
        raise AttnsparseError(f"--retrieval-threshold {retrieval_threshold} must be in [0, 1]")
    config = ProfileConfig(
        ctx=ctx, ks=tuple(ks or ()), deltas=tuple(deltas), eps=tuple(eps), sink_tokens=sink_tokens,
        local_window=local_window, stream_delta=stream_delta, fit_delta=fit_delta, fit_min_n=fit_min_n,
    )
    if device is not None:
        resolve_device(device)  # a device this machine lacks fails before anything is read or written
    if dtype is not None:
        resolve_dtype(dtype)
    run = RunDir(out, KIND).check(overwrite) if out is not None else None  # read-only, before the slow load

    loaded = _load(model, device, dtype)
    hf_model, spec = loaded.model, loaded.spec
    if ctx > loaded.max_context:
        raise AttnsparseError(
            f"context {ctx} exceeds the model's maximum of {loaded.max_context} tokens; "
            f"use --ctx {loaded.max_context} or less"
        )
    batches = _windows(loaded, data, ctx, windows)
    grid = _retrieval_grid(loaded, data, ctx, retrieval_trials) if retrieval else None  # every prompt checked now
    layers, heads, kv_heads = _model_facts(hf_model)
    profile = Profile(config, model=spec, layers=layers, heads=heads, kv_heads=kv_heads)
    run_config = {
        "model": spec,
        "data": data if isinstance(data, str) or data is None else f"<token tensor {tuple(data.shape)}>",
        "ctx": ctx,
        "windows": int(batches.shape[0]),
        "window_placement": "evenly spaced: window i starts at i * (tokens // windows)",
        "batch_size": batch_size,
        "query_chunk": query_chunk,
        **placement(model_device(hf_model), model_dtype(hf_model)),
        "metrics": config.to_dict(),
    }
    if grid is not None:
        run_config["retrieval"] = grid.config | {"threshold": retrieval_threshold}
    if run is not None:
        run.start(run_config)
    with run.guard() if run is not None else nullcontext():
        recorder = Recorder(profile)
        started = time.perf_counter()
        _run(hf_model, batches, recorder, batch_size, query_chunk, progress)
        elapsed = time.perf_counter() - started
        profile.windows = int(batches.shape[0])
        check_finite(profile)
        if grid is not None:
            profile.retrieval = _measure_retrieval(loaded, grid, retrieval_threshold, progress)
        if run is not None:
            write_run(run.path, profile, run_config, elapsed)
            run.finish()
    if echo is not None:
        echo(summary_table(profile))
        if profile.retrieval is not None:
            heads = sum(score >= retrieval_threshold for row in profile.retrieval.scores for score in row)
            echo(f"retrieval heads (score >= {retrieval_threshold:g}): {heads} of {profile.layers * profile.heads}")
        echo(f"{profile.windows} windows x {ctx} tokens in {elapsed:.1f} s" + (f"; results in {out}" if out else ""))
    return profile


# Row statistics that are finite for any finite attention row (C and the long-row tails may be NaN by design).
_ALWAYS_FINITE = ("topk_mass", "entropy", "support", "sink", "local", "stream")


def check_finite(profile: Profile) -> None:
    """Refuse a profile whose attention was not finite (corrupt weights, overflow), naming the first layer, head
    and statistic, before anything but config.json is written."""
    import numpy as np

    stats = profile.head_stats()
    bad = {name: ~np.isfinite(stats[name]).reshape(*stats[name].shape[:2], -1).all(-1) for name in _ALWAYS_FINITE}
    affected = np.logical_or.reduce(list(bad.values()))
    if not affected.any():
        return
    layer, head = (int(i) for i in np.argwhere(affected)[0])
    names = [name for name in _ALWAYS_FINITE if bad[name][layer, head]]
    value = np.asarray(stats[names[0]][layer, head]).reshape(-1)[0]
    raise AttnsparseError(
        f"the model's attention is not finite: layer {layer} head {head} has {', '.join(names)} = {value} "
        f"({int(affected.sum())} of {affected.size} heads affected, from layer {layer} on); check the model's "
        "weights for NaN/inf, or load it in float32"
    )


def _retrieval_grid(loaded: Any, data: str | torch.Tensor | None, ctx: int, trials: int) -> Any:
    """The retrieval tasks at length ctx, every prompt built (and checked) before the first forward."""
    from attnsparse.evaluate.tasks.run import prepare_tasks

    haystack = data if isinstance(data, str) else None
    return prepare_tasks(loaded.model, loaded.tokenizer, RETRIEVAL_TASKS, [ctx], RETRIEVAL_DEPTHS, trials,
                         haystack=haystack, retrieval=True, seed=RETRIEVAL_SEED)


def _measure_retrieval(loaded: Any, grid: Any, threshold: float, progress: bool) -> ProfileRetrieval:
    """Answer every retrieval prompt densely with the retrieval observer on; mean score per (layer, head)."""
    from attnsparse.evaluate.tasks.run import run_grid

    result = run_grid(loaded.model, loaded.tokenizer, grid, progress)
    scores = result.retrieval
    assert scores is not None  # prepare_tasks(retrieval=True) on retrieval tasks always measures
    accuracy = {}
    for row in result.rows:
        correct, total = accuracy.get(row.task, (0, 0))
        accuracy[row.task] = (correct + row.correct, total + row.trials)
    info = {"definition": "docs/tasks.md#retrieval-scores", "tasks": grid.config["tasks"],
            "length": grid.config["lengths"][0], "depths": grid.config["depths"], "trials": grid.config["trials"],
            "seed": grid.seed, "haystack": grid.config["haystack"], "prompt_form": grid.config["prompt_form"],
            "samples": dict(scores.samples),
            "dense_accuracy": {task: round(c / max(t, 1), 4) for task, (c, t) in accuracy.items()}}
    return ProfileRetrieval([[float(x) for x in row] for row in scores.mean()], threshold, info)


def _load(model: Any, device: str | torch.device | None, dtype: str | torch.dtype | None) -> Any:
    if isinstance(model, (str, Path)):
        from attnsparse.core.models import load_model

        return load_model(str(model), dtype, device=device)
    if hasattr(model, "model") and hasattr(model, "max_context"):
        check_placement(model.model, device, dtype)
        return model
    raise AttnsparseError(f"measure needs a model spec or a LoadedModel, got {type(model).__name__}")


def _windows(loaded: Any, data: str | torch.Tensor | None, ctx: int, count: int) -> torch.Tensor:
    from attnsparse.core import data as data_mod

    if isinstance(data, torch.Tensor):
        if data.dim() == 2:
            if data.shape[1] != ctx:
                raise AttnsparseError(f"token windows have length {data.shape[1]}, not ctx {ctx}")
            if count > data.shape[0]:
                raise AttnsparseError(f"--windows {count}: the token windows given hold only {data.shape[0]}; "
                                      f"use --windows {data.shape[0]} or fewer")
            return data[:count].long()
        return data_mod.windows(data.long().reshape(-1), ctx, count=count)
    return data_mod.load_windows(loaded.tokenizer, data, ctx, max_context=loaded.max_context, count=count)


def _run(model: Any, batches: torch.Tensor, recorder: Recorder, batch_size: int, query_chunk: int,
         progress: bool) -> None:
    from tqdm.auto import tqdm

    from attnsparse.attention.backend import sparse_attention

    device = next(model.parameters()).device
    kwargs = _forward_kwargs(model)
    bar = tqdm(total=int(batches.shape[0]), unit="window", desc="measure", disable=not progress)
    try:
        with torch.inference_mode(), sparse_attention(model, "dense", observers=[recorder], query_chunk=query_chunk):
            for start in range(0, batches.shape[0], batch_size):
                batch = batches[start:start + batch_size].to(device)
                model(batch, **kwargs)
                bar.update(int(batch.shape[0]))
    finally:
        bar.close()


def write_run(out: str | Path, profile: Profile, run_config: dict[str, Any], elapsed: float) -> Path:
    """Write profile.json, profile.csv, profile_state.npz, plots/*.png and report.html into `out` (config.json is
    the RunDir's, see `measure`)."""
    import csv
    import io

    from attnsparse.core.runs import atomic_write_text
    from attnsparse.measure.plots import write_plots

    out = Path(out)
    data = profile.to_dict()
    data["elapsed_seconds"] = round(elapsed, 3)
    ProfileView.from_dict(data).to_json(out / "profile.json")
    header, rows = profile.csv_rows()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(out / "profile.csv", buffer.getvalue())
    profile.save_state(out / "profile_state.npz")
    figures = write_plots(profile, out / "plots")
    write_report(out / "report.html", profile, data, run_config, figures)
    return out
