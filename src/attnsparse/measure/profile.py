"""Mergeable streaming accumulators of per-head sparsity metrics, the `Recorder` observer, and profile.json.

Nothing here stores attention matrices: every chunk of rows is reduced at once to per-(layer, head) sums,
counts, an exact integer histogram of k at coverage (for quantiles) and the sufficient statistics of the
least-squares fit of log k_{1-δ} against log n_i. Two profiles of the same config merge by adding their
accumulators, so a run split over windows, processes or machines gives the same numbers as one pass.
Definitions and the JSON schema: docs/measure.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnsparse.errors import AttnsparseError
from attnsparse.measure.rowstats import MetricSpec, RowMetrics, default_ks, row_metrics

SCHEMA_VERSION = 1
QUANTILES = (0.1, 0.5, 0.9, 0.99)


@dataclass(frozen=True)
class ProfileConfig:
    """Everything that defines what a profile measures (recorded in config.json and profile.json)."""

    ctx: int
    ks: tuple[int, ...] = ()  # empty = 1, 2, 4, ... up to ctx
    deltas: tuple[float, ...] = (0.01, 0.05, 0.1)
    eps: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    sink_tokens: int = 4
    local_window: int = 64
    stream_delta: float = 0.1  # streaming head: mean sink+local mass >= 1 - stream_delta
    fit_delta: float = 0.05  # C is the slope of log k_{1-fit_delta} against log n_i
    fit_min_n: int = 16  # rows with n_i < fit_min_n are left out of the C fit
    bins_per_octave: int = 4  # query-position bins for the k-versus-position curves

    def __post_init__(self) -> None:
        if self.ctx < 2:
            raise AttnsparseError(f"context length {self.ctx} is too small; use --ctx 2 or more")
        ks = tuple(int(k) for k in self.ks) if self.ks else default_ks(self.ctx)
        object.__setattr__(self, "ks", tuple(sorted(set(ks))))
        object.__setattr__(self, "deltas", tuple(float(d) for d in self.deltas))
        object.__setattr__(self, "eps", tuple(float(e) for e in self.eps))
        if min(self.ks) < 1:
            raise AttnsparseError(f"every k must be >= 1, got {min(self.ks)}")
        if not self.deltas or not all(0.0 < d < 1.0 for d in self.deltas):
            raise AttnsparseError(f"coverage deltas must lie in (0, 1), got {list(self.deltas)}")
        if self.fit_delta not in self.deltas:
            raise AttnsparseError(f"fit delta {self.fit_delta} must be one of the deltas {list(self.deltas)}")
        if not self.eps or not all(0.0 < e < 1.0 for e in self.eps):
            raise AttnsparseError(f"epsilon grid must lie in (0, 1), got {list(self.eps)}")
        if self.sink_tokens < 0 or self.local_window < 1:
            raise AttnsparseError("sink tokens must be >= 0 and the local window >= 1")
        if not 0.0 < self.stream_delta < 1.0:
            raise AttnsparseError(f"stream delta must lie in (0, 1), got {self.stream_delta}")
        if self.fit_min_n < 1 or self.bins_per_octave < 1:
            raise AttnsparseError("fit_min_n and bins_per_octave must be >= 1")

    @property
    def spec(self) -> MetricSpec:
        return MetricSpec(self.ks, self.deltas, self.eps, self.sink_tokens, self.local_window)

    @property
    def position_bins(self) -> int:
        return math.floor(math.log2(self.ctx) * self.bins_per_octave) + 1

    @property
    def fit_index(self) -> int:
        return self.deltas.index(self.fit_delta)

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileConfig:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})


def coverage_key(delta: float) -> str:
    """"0.95" for δ = 0.05: profile.json keys k at coverage by the coverage 1 - δ."""
    return f"{round(1.0 - delta, 10):g}"


class LayerAccumulator:
    """Sums over rows for every head of one layer; `update` reduces a RowMetrics block, `merge` adds another.

    The sums live on `device`, the device of the rows they reduce: a measure on a GPU accumulates there and copies
    the sums to the host once, when they are read (`Profile.stacked`).
    """

    def __init__(self, config: ProfileConfig, heads: int, device: torch.device | str = "cpu") -> None:
        nk, nd, ne, nb = len(config.ks), len(config.deltas), len(config.eps), config.position_bins
        self.config = config
        self.heads = heads
        self.device = torch.device(device)
        i64 = torch.int64

        def _zeros(heads: int, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
            return torch.zeros(heads, *shape, dtype=dtype, device=self.device)

        self.t: dict[str, torch.Tensor] = {
            "rows": _zeros(heads, dtype=i64),
            "topk_sum": _zeros(heads, nk),
            "long_rows": _zeros(heads, nk, dtype=i64),  # rows with n_i > k
            "long_tail_sum": _zeros(heads, nk),  # sum of 1 - m_k over those rows
            "eps_k_sparse": _zeros(heads, ne, nk, dtype=i64),
            "kcov_sum": _zeros(heads, nd),
            "kcov_frac_sum": _zeros(heads, nd),  # sum of k_{1-δ} / n_i
            "kcov_hist": _zeros(heads, nd, config.ctx + 1, dtype=i64),
            "entropy_sum": _zeros(heads),
            "support_sum": _zeros(heads),  # sum of exp(H)
            "sink_sum": _zeros(heads),
            "local_sum": _zeros(heads),
            "stream_sum": _zeros(heads),
            "stream_long_rows": _zeros(heads, dtype=i64),  # rows with n_i > sink + window
            "stream_long_sum": _zeros(heads),
            "fit_n": _zeros(heads, dtype=i64),
            "fit_sx": _zeros(heads),
            "fit_sxx": _zeros(heads),
            "fit_sy": _zeros(heads, nd),
            "fit_syy": _zeros(heads, nd),
            "fit_sxy": _zeros(heads, nd),
            "pos_rows": _zeros(heads, nb, dtype=i64),
            "pos_logn": _zeros(heads, nb),
            "pos_logk": _zeros(heads, nd, nb),
        }

    def update(self, m: RowMetrics, keys: int | None = None) -> None:
        """Add a block of rows shaped (B, H, Qc, ...) to the sums; rows with n_i = 0 (padding) are skipped.

        `keys`, the rows' width when known, bounds k at coverage without reading it back from the device.
        """
        cfg = self.config
        n = m.n.to(self.device, torch.int64)
        valid = n > 0
        heads = n.shape[1]
        if heads != self.heads:
            raise ValueError(f"layer accumulator has {self.heads} heads, the block {heads}")
        v = valid.to(torch.float64)
        vi = valid.to(torch.int64)

        def hsum(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            """Sum over batch and query axes of x (B, H, Qc, ...) weighted by a (B, H, Qc) mask."""
            w = weight.reshape(*weight.shape, *([1] * (x.dim() - weight.dim())))
            return (x * w).sum(dim=(0, 2))

        t = self.t
        top = m.topk_mass.to(self.device, torch.float64)
        kcov = m.k_cov.to(self.device, torch.int64)
        ks = torch.tensor(cfg.ks, dtype=torch.int64, device=self.device)
        eps_counts = m.count_above.to(self.device, torch.int64)
        t["rows"] += vi.sum(dim=(0, 2))
        t["topk_sum"] += hsum(top, v)
        longer = (n[..., None] > ks) & valid[..., None]
        t["long_rows"] += longer.sum(dim=(0, 2))
        t["long_tail_sum"] += ((1.0 - top).clamp_min(0.0) * longer).sum(dim=(0, 2))
        t["eps_k_sparse"] += ((eps_counts[..., :, None] <= ks) & valid[..., None, None]).sum(dim=(0, 2))
        t["kcov_sum"] += hsum(kcov.to(torch.float64), v)
        n_safe = n.clamp_min(1).to(torch.float64)
        t["kcov_frac_sum"] += hsum(kcov.to(torch.float64) / n_safe[..., None], v)
        self._add_hist(kcov, valid, keys)
        ent = m.entropy.to(self.device, torch.float64)
        t["entropy_sum"] += hsum(ent, v)
        t["support_sum"] += hsum(torch.exp(ent), v)
        t["sink_sum"] += hsum(m.sink.to(self.device, torch.float64), v)
        t["local_sum"] += hsum(m.local.to(self.device, torch.float64), v)
        stream = m.streaming.to(self.device, torch.float64)
        t["stream_sum"] += hsum(stream, v)
        long_stream = valid & (n > cfg.sink_tokens + cfg.local_window)
        t["stream_long_rows"] += long_stream.sum(dim=(0, 2))
        t["stream_long_sum"] += hsum(stream, long_stream.to(torch.float64))
        # C fit on per-row points x = log n_i, y = log k_{1-δ}(row), rows with n_i >= fit_min_n.
        fit = (valid & (n >= cfg.fit_min_n)).to(torch.float64)
        x = torch.log(n_safe)
        y = torch.log(kcov.clamp_min(1).to(torch.float64))
        t["fit_n"] += (fit > 0).sum(dim=(0, 2))
        t["fit_sx"] += hsum(x, fit)
        t["fit_sxx"] += hsum(x * x, fit)
        t["fit_sy"] += hsum(y, fit)
        t["fit_syy"] += hsum(y * y, fit)
        t["fit_sxy"] += hsum(x[..., None] * y, fit)
        self._add_positions(n, valid, x, y)

    def _add_hist(self, kcov: torch.Tensor, valid: torch.Tensor, keys: int | None = None) -> None:
        """Count every valid row's k at coverage; k <= n <= keys, so a known width sizes the histogram without
        a device sync (and without one, the largest k is read back)."""
        hist = self.t["kcov_hist"]
        size = hist.shape[-1]
        top = keys if keys is not None else (int(kcov.max()) if kcov.numel() else 0)
        if top >= size:  # cannot happen for rows of length <= ctx; grow rather than lose counts
            hist = torch.nn.functional.pad(hist, (0, top + 1 - size))
            self.t["kcov_hist"] = hist
            size = hist.shape[-1]
        heads, nd = hist.shape[0], hist.shape[1]
        head_idx = torch.arange(heads, device=self.device).view(1, heads, 1, 1)
        d_idx = torch.arange(nd, device=self.device).view(1, 1, 1, nd)
        flat = (head_idx * nd + d_idx) * size + kcov
        counts = valid[..., None].expand_as(kcov).to(torch.int64)  # padded rows add 0 (no boolean indexing: no sync)
        hist.view(-1).index_add_(0, flat.reshape(-1), counts.reshape(-1))

    def _add_positions(self, n: torch.Tensor, valid: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        """Rows, log n and log k per query-position bin; each chunk is summed apart, then added (as bincount did)."""
        nb, nd = self.config.position_bins, y.shape[-1]
        bins = torch.floor(x * (self.config.bins_per_octave / math.log(2)) + 1e-9).to(torch.int64).clamp(0, nb - 1)
        heads = n.shape[1]
        head_idx = torch.arange(heads, device=self.device).view(1, heads, 1)
        flat = (head_idx * nb + bins).reshape(-1)
        weight = valid.to(torch.float64)  # padded rows add 0 (no boolean indexing: no device sync)
        t = self.t
        t["pos_rows"] += torch.zeros_like(t["pos_rows"]).view(-1).index_add_(
            0, flat, valid.to(torch.int64).reshape(-1)).view(heads, nb)
        t["pos_logn"] += torch.zeros_like(t["pos_logn"]).view(-1).index_add_(
            0, flat, (x * weight).reshape(-1)).view(heads, nb)
        d_idx = torch.arange(nd, device=self.device).view(1, 1, 1, nd)
        flat_k = ((head_idx[..., None] * nd + d_idx) * nb + bins[..., None]).reshape(-1)
        t["pos_logk"] += torch.zeros_like(t["pos_logk"]).view(-1).index_add_(
            0, flat_k, (y * weight[..., None]).reshape(-1)).view(heads, nd, nb)

    def merge(self, other: LayerAccumulator) -> None:
        for name, value in other.t.items():
            mine = self.t[name]
            value = value.to(mine.device)
            if name == "kcov_hist" and value.shape[-1] != mine.shape[-1]:
                width = max(value.shape[-1], mine.shape[-1])
                mine = torch.nn.functional.pad(mine, (0, width - mine.shape[-1]))
                value = torch.nn.functional.pad(value, (0, width - value.shape[-1]))
            self.t[name] = mine + value


@dataclass
class ProfileRetrieval:
    """Per-head retrieval scores measured beside a profile (`measure(..., retrieval=True)`), and how."""

    scores: list[list[float]]  # (layers, heads)
    threshold: float = 0.1  # a head scoring at least this is a retrieval head
    info: dict[str, Any] = field(default_factory=dict)  # tasks, length, depths, trials, seed, samples, ...


@dataclass
class Profile:
    """A model's per-layer, per-head sparsity profile: config, model facts and mergeable accumulators (plus, when
    measured, retrieval scores, which describe the model rather than the windows and are not part of the state)."""

    config: ProfileConfig
    model: str = ""
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    windows: int = 0
    accumulators: dict[int, LayerAccumulator] = field(default_factory=dict)
    retrieval: ProfileRetrieval | None = None

    # --- accumulating -------------------------------------------------------------------------------------
    def layer(self, layer_idx: int, heads: int, device: torch.device | str = "cpu") -> LayerAccumulator:
        """Layer `layer_idx`'s accumulator, created on `device` at its first rows."""
        acc = self.accumulators.get(layer_idx)
        if acc is None:
            acc = self.accumulators[layer_idx] = LayerAccumulator(self.config, heads, device)
            self.layers = max(self.layers, layer_idx + 1)
            self.heads = max(self.heads, heads)
        return acc

    def merge(self, other: Profile) -> Profile:
        """Add `other`'s rows to this profile (same config); returns self."""
        if other.config != self.config:
            raise AttnsparseError("cannot merge profiles measured with different configs")
        for layer_idx, acc in other.accumulators.items():
            mine = self.accumulators.get(layer_idx)
            if mine is None:
                mine = self.layer(layer_idx, acc.heads)
            mine.merge(acc)
        self.windows += other.windows
        self.layers = max(self.layers, other.layers)
        self.heads = max(self.heads, other.heads)
        self.kv_heads = self.kv_heads or other.kv_heads
        self.model = self.model or other.model
        self.retrieval = self.retrieval or other.retrieval
        return self

    # --- reading ------------------------------------------------------------------------------------------
    def stacked(self, name: str) -> torch.Tensor:
        """Accumulator `name` for all layers stacked: (layers, heads, ...), on the host (the one copy back from a
        device that measuring makes)."""
        if not self.accumulators:
            raise AttnsparseError("the profile holds no rows; nothing was measured")
        return torch.stack([self.accumulators[i].t[name].cpu() for i in sorted(self.accumulators)])

    def head_stats(self) -> dict[str, np.ndarray]:
        """Per (layer, head) summary arrays (numpy, layers x heads [x grid]) that the JSON, CSV and plots share."""
        cfg = self.config
        rows = self.stacked("rows").to(torch.float64)
        denom = rows.clamp_min(1)
        out: dict[str, np.ndarray] = {"rows": rows.numpy()}
        out["topk_mass"] = (self.stacked("topk_sum") / denom[..., None]).numpy()
        long_rows = self.stacked("long_rows").to(torch.float64)
        tail = self.stacked("long_tail_sum") / long_rows.clamp_min(1)
        out["tail_mass_long"] = torch.where(long_rows > 0, tail, torch.nan).numpy()
        out["eps_k_sparse"] = (self.stacked("eps_k_sparse") / denom[..., None, None]).numpy()
        out["kcov_mean"] = (self.stacked("kcov_sum") / denom[..., None]).numpy()
        out["kcov_frac_mean"] = (self.stacked("kcov_frac_sum") / denom[..., None]).numpy()
        out["kcov_quantiles"] = _hist_quantiles(self.stacked("kcov_hist"), QUANTILES)
        out["kcov_max"] = _hist_max(self.stacked("kcov_hist"))
        for name in ("entropy", "support", "sink", "local", "stream"):
            out[name] = (self.stacked(f"{name}_sum") / denom).numpy()
        long_stream = self.stacked("stream_long_rows").to(torch.float64)
        stream_long = self.stacked("stream_long_sum") / long_stream.clamp_min(1)
        out["stream_long"] = torch.where(long_stream > 0, stream_long, self.stacked("stream_sum") / denom).numpy()
        slope, intercept, r2 = _fit(self)
        out["C"], out["C_intercept"], out["C_r2"] = slope.numpy(), intercept.numpy(), r2.numpy()
        out["fit_points"] = self.stacked("fit_n").numpy()
        out["streaming"] = out["stream_long"] >= 1.0 - cfg.stream_delta
        return out

    def position_curves(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-bin mean log n, mean log k_{1-fit_delta} per (layer, head), and row counts (layers, heads, bins)."""
        rows = self.stacked("pos_rows").to(torch.float64)
        logn = self.stacked("pos_logn") / rows.clamp_min(1)
        logk = self.stacked("pos_logk")[:, :, self.config.fit_index] / rows.clamp_min(1)
        return logn.numpy(), logk.numpy(), rows.numpy()

    def to_dict(self) -> dict[str, Any]:
        """profile.json: model facts, config, per-head and per-layer summaries (schema in docs/measure.md)."""
        cfg = self.config
        st = self.head_stats()
        fit_i = cfg.fit_index
        per_head = []
        for layer in range(st["rows"].shape[0]):
            for head in range(st["rows"].shape[1]):
                entry = _head_entry(cfg, st, layer, head)
                if self.kv_heads and self.heads % self.kv_heads == 0:
                    entry["kv_head"] = head // (self.heads // self.kv_heads)
                per_head.append(entry)
        per_layer = []
        fit_key = coverage_key(cfg.fit_delta)
        for layer in range(st["rows"].shape[0]):
            c = st["C"][layer]
            per_layer.append({
                "layer": layer,
                f"k_{fit_key}_mean": float(np.mean(st["kcov_mean"][layer, :, fit_i])),
                "C_mean": _nanmean(c),
                "streaming_share": float(np.mean(st["streaming"][layer])),
                "entropy_mean": float(np.mean(st["entropy"][layer])),
            })
        logn, logk, pos_rows = self.position_curves()
        out = {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "ctx": cfg.ctx,
            "windows": self.windows,
            "layers": self.layers,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "rows_per_head": int(st["rows"].max()) if st["rows"].size else 0,
            "config": cfg.to_dict(),
            "density": {str(k): density(k, cfg.ctx) for k in cfg.ks},
            "summary": {
                f"k_{fit_key}_mean": float(np.mean(st["kcov_mean"][..., fit_i])),
                "C_mean": _nanmean(st["C"]),
                "C_median": _nanmedian(st["C"]),
                "streaming_share": float(np.mean(st["streaming"])),
                "streaming_heads": int(np.sum(st["streaming"])),
                "heads_total": int(st["streaming"].size),
            },
            "per_layer": per_layer,
            "per_head": per_head,
            "k_vs_position": _position_summary(logn, logk, pos_rows),
        }
        if self.retrieval is not None:
            attach_retrieval(out, self.retrieval.scores, self.retrieval.info, self.retrieval.threshold)
        return out

    def csv_rows(self) -> tuple[list[str], list[list[object]]]:
        """One CSV row per (layer, head) with the scalar metrics (what a spreadsheet user wants)."""
        cfg = self.config
        st = self.head_stats()
        header = ["layer", "head", "class", "rows", "C", "C_r2"]
        header += [f"k{coverage_key(d)}_{s}" for d in cfg.deltas for s in ("mean", "p50", "p90")]
        header += ["entropy", "effective_support", "sink_mass", "local_mass", "sink_local_mass"]
        header += [f"topk_mass_{k}" for k in cfg.ks]
        scored = self.retrieval
        if scored is not None:
            header.append("retrieval_score")
        rows: list[list[object]] = []
        p50, p90 = QUANTILES.index(0.5), QUANTILES.index(0.9)
        for layer in range(st["rows"].shape[0]):
            for head in range(st["rows"].shape[1]):
                streaming = bool(st["streaming"][layer, head])
                kind = "streaming" if streaming else "other"
                if scored is not None:
                    kind = head_class(streaming, scored.scores[layer][head], scored.threshold)
                row: list[object] = [layer, head, kind,
                                     int(st["rows"][layer, head]), _num(st["C"][layer, head]),
                                     _num(st["C_r2"][layer, head])]
                for d in range(len(cfg.deltas)):
                    row += [float(st["kcov_mean"][layer, head, d]), int(st["kcov_quantiles"][layer, head, d, p50]),
                            int(st["kcov_quantiles"][layer, head, d, p90])]
                row += [float(st[name][layer, head]) for name in ("entropy", "support", "sink", "local", "stream_long")]
                row += [float(v) for v in st["topk_mass"][layer, head]]
                if scored is not None:
                    row.append(round(float(scored.scores[layer][head]), 6))
                rows.append(row)
        return header, rows

    # --- persistence of the mergeable state ----------------------------------------------------------------
    def save_state(self, path: str | Path) -> None:
        """Write the raw accumulators (npz) so a later run can `merge` more windows into this profile."""
        arrays = {f"{layer}/{name}": value.cpu().numpy() for layer, acc in self.accumulators.items()
                  for name, value in acc.t.items()}
        meta = np.array([self.layers, self.heads, self.kv_heads, self.windows], dtype=np.int64)
        with open(path, "wb") as handle:
            np.savez_compressed(handle, __meta__=meta, **arrays)

    @classmethod
    def load_state(cls, path: str | Path, config: ProfileConfig, model: str = "") -> Profile:
        with np.load(path) as data:
            layers, heads, kv_heads, windows = (int(v) for v in data["__meta__"])
            profile = cls(config, model, layers, heads, kv_heads, windows)
            for key in data.files:
                if key == "__meta__":
                    continue
                layer, name = key.split("/", 1)
                acc = profile.accumulators.get(int(layer))
                if acc is None:
                    acc = profile.accumulators[int(layer)] = LayerAccumulator(config, int(data[key].shape[0]))
                acc.t[name] = torch.from_numpy(data[key].copy())
        return profile


PROFILE_HELP = "pass the profile.json written by `attnsparse measure`"
HEAD_CLASSES = ("streaming", "retrieval", "other")


@dataclass(frozen=True)
class HeadSummary:
    """One `per_head` row of profile.json: the fields readers rely on, typed; `data` is the whole row."""

    layer: int
    head: int
    kind: str  # "streaming", "retrieval" or "other" (the JSON's "class", see HEAD_CLASSES)
    C: float | None  # None: too few rows to fit the exponent
    k_at_coverage: dict[str, dict[str, Any]]  # coverage "0.95" -> {"mean", "p50", ...}
    data: dict[str, Any]
    retrieval_score: float | None = None  # None: the profile has no retrieval scores

    @property
    def streaming(self) -> bool:
        return self.kind == "streaming"


@dataclass(frozen=True)
class ProfileView:
    """profile.json read back, typed and checked: every reader (decode plans, the theory overlay, the pipeline,
    benchmarks) goes through `read_json`, so a profile missing a field fails in one line naming it.

    `data` is the whole document, written back unchanged by `to_json`.
    """

    model: str
    ctx: int
    layers: int
    heads: int
    kv_heads: int
    summary: dict[str, Any]
    per_layer: list[dict[str, Any]]
    per_head: list[HeadSummary]
    data: dict[str, Any]

    @property
    def coverage_keys(self) -> list[str]:
        """The coverages every head reports k at ("0.99", "0.95", ...)."""
        return list(self.per_head[0].k_at_coverage)

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> ProfileView:
        """Check and type a profile document; `source` names it in errors (its path)."""
        if not isinstance(data, dict):
            raise AttnsparseError(f"{source} is not a measure profile (a JSON object); {PROFILE_HELP}")
        rows = data.get("per_head")
        if not isinstance(rows, list) or not rows:
            raise AttnsparseError(f"{source} has no per_head list; {PROFILE_HELP}")
        scored = isinstance(data.get("retrieval"), dict)
        heads = [_head_summary(row, f"{source}: per_head[{i}]", scored) for i, row in enumerate(rows)]
        keys = list(heads[0].k_at_coverage)
        for i, head in enumerate(heads):
            if list(head.k_at_coverage) != keys:
                raise AttnsparseError(f"{source}: per_head[{i}] gives k at coverages {list(head.k_at_coverage)}, "
                                      f"per_head[0] at {keys}; {PROFILE_HELP}")
        summary, per_layer = data.get("summary", {}), data.get("per_layer", [])
        if not isinstance(summary, dict) or not isinstance(per_layer, list):
            raise AttnsparseError(f"{source}: summary must be an object and per_layer a list; {PROFILE_HELP}")
        return cls(
            model=str(data.get("model") or ""),
            ctx=_int_field(data, "ctx", source),
            layers=_int_field(data, "layers", source),
            heads=_int_field(data, "heads", source),
            kv_heads=_int_field(data, "kv_heads", source),
            summary=summary,
            per_layer=per_layer,
            per_head=heads,
            data=data,
        )

    @classmethod
    def read_json(cls, path: str | Path) -> ProfileView:
        """Read and check a profile.json; a missing, unreadable or incomplete file is a one-line error."""
        path = Path(path)
        if not path.is_file():
            raise AttnsparseError(f"profile {path} does not exist; {PROFILE_HELP}")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise AttnsparseError(f"profile {path} is not readable JSON ({error.__class__.__name__}); "
                                  f"{PROFILE_HELP}") from None
        return cls.from_dict(data, f"profile {path}")

    def to_json(self, path: str | Path) -> Path:
        """Write the document atomically (what `read_json` reads back)."""
        from attnsparse.core.runs import atomic_write_json

        path = Path(path)
        atomic_write_json(path, self.data)
        return path


def _int_field(data: dict[str, Any], name: str, where: str) -> int:
    if name not in data:
        raise AttnsparseError(f"{where} lacks '{name}'; {PROFILE_HELP}")
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise AttnsparseError(f"{where}: '{name}' is {value!r}, not an integer; {PROFILE_HELP}")
    return int(value)


def _head_summary(row: Any, where: str, scored: bool = False) -> HeadSummary:
    """Type one per_head row; names the first missing or malformed field. Without retrieval scores (`scored`), a
    `retrieval` class is a profile written before they existed, where it meant "not streaming": read as `other`."""
    if not isinstance(row, dict):
        raise AttnsparseError(f"{where} is not an object; {PROFILE_HELP}")
    for name in ("layer", "head", "class", "C", "k_at_coverage"):
        if name not in row:
            raise AttnsparseError(f"{where} lacks '{name}'; {PROFILE_HELP}")
    c = row["C"]
    if c is not None and (isinstance(c, bool) or not isinstance(c, int | float)):
        raise AttnsparseError(f"{where}: 'C' is {c!r}, not a number or null; {PROFILE_HELP}")
    coverage = row["k_at_coverage"]
    if not isinstance(coverage, dict) or not coverage or not all(
            isinstance(v, dict) and "mean" in v for v in coverage.values()):
        raise AttnsparseError(f"{where}: 'k_at_coverage' must map coverages to objects with a 'mean'; "
                              f"{PROFILE_HELP}")
    for key in coverage:
        try:
            float(key)
        except ValueError:
            raise AttnsparseError(f"{where}: k_at_coverage key {key!r} is not a coverage such as '0.95'; "
                                  f"{PROFILE_HELP}") from None
    if row["class"] not in HEAD_CLASSES:
        raise AttnsparseError(f"{where}: 'class' is {row['class']!r}, not one of {', '.join(HEAD_CLASSES)}; "
                              f"{PROFILE_HELP}")
    score = row.get("retrieval_score") if scored else None
    if scored and (isinstance(score, bool) or not isinstance(score, int | float)):
        raise AttnsparseError(f"{where}: 'retrieval_score' is {score!r}, not a number (the profile has a retrieval "
                              f"section); {PROFILE_HELP}")
    kind = "other" if row["class"] == "retrieval" and not scored else row["class"]
    return HeadSummary(
        layer=_int_field(row, "layer", where), head=_int_field(row, "head", where), kind=kind,
        C=None if c is None else float(c), k_at_coverage=coverage, data=row,
        retrieval_score=None if score is None else float(score),
    )


def head_class(streaming: bool, retrieval_score: float | None, threshold: float) -> str:
    """`retrieval` when the head's retrieval score reaches the threshold (whatever its attention pattern: its keys are
    copied from, so it must not be evicted), else `streaming` when its sink+local mass passes, else `other`."""
    if retrieval_score is not None and retrieval_score >= threshold:
        return "retrieval"
    return "streaming" if streaming else "other"


def attach_retrieval(data: dict[str, Any], scores: Any, info: dict[str, Any], threshold: float = 0.1) -> dict[str, Any]:
    """Store (layers, heads) retrieval scores in a profile document: `retrieval_score` per head, classes relabelled
    (`head_class`), a `retrieval` section (`info`: how they were measured, plus the threshold and the heads above
    it) and `summary.retrieval_heads`. Returns the document, changed in place."""
    if not 0.0 <= threshold <= 1.0:
        raise AttnsparseError(f"retrieval threshold {threshold} must be in [0, 1]")
    stream_delta = float(data.get("config", {}).get("stream_delta", 0.1))
    above = []
    for row in data["per_head"]:
        score = round(float(scores[row["layer"]][row["head"]]), 6)
        streaming = (float(row["sink_local_mass"]) >= 1.0 - stream_delta if "sink_local_mass" in row
                     else row["class"] == "streaming")
        row["retrieval_score"] = score
        row["class"] = head_class(streaming, score, threshold)
        if score >= threshold:
            above.append([row["layer"], row["head"]])
    data["retrieval"] = dict(info) | {"threshold": threshold, "heads_above_threshold": len(above),
                                      "heads_above": above}
    data.setdefault("summary", {})["retrieval_heads"] = len(above)
    return data


class Recorder:
    """Backend observer: reduces every AttentionChunk into the profile's accumulators (no matrices kept)."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.spec = profile.config.spec
        self.chunks = 0

    def __call__(self, chunk: Any) -> None:
        probs = chunk.probs.detach()
        metrics = row_metrics(probs, chunk.visible, chunk.query_positions, self.spec)
        self.profile.layer(int(chunk.layer_idx), int(probs.shape[1]), probs.device).update(metrics, probs.shape[-1])
        self.chunks += 1


def density(k: int, n: int) -> float:
    """Kept causal pairs of fixed-k top-k attention at length n: Σ_i min(k, i+1) / Σ_i (i+1)."""
    kept = sum(min(k, i + 1) for i in range(n)) if k < n else n * (n + 1) // 2
    return kept / (n * (n + 1) / 2)


def _fit(profile: Profile) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares slope, intercept and R² of log k_{1-fit_delta} on log n_i from the sufficient statistics."""
    d = profile.config.fit_index
    return fit_from_sums(
        profile.stacked("fit_n").to(torch.float64), profile.stacked("fit_sx"), profile.stacked("fit_sxx"),
        profile.stacked("fit_sy")[..., d], profile.stacked("fit_syy")[..., d], profile.stacked("fit_sxy")[..., d],
    )


def fit_from_sums(
    count: torch.Tensor, sx: torch.Tensor, sxx: torch.Tensor, sy: torch.Tensor, syy: torch.Tensor, sxy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slope, intercept and R² of y on x; NaN where x does not vary, R² NaN where y does not vary (slope 0)."""
    c = count.clamp_min(1)
    var_x = sxx - sx * sx / c
    var_y = syy - sy * sy / c
    cov = sxy - sx * sy / c
    ok_x = (count >= 2) & (var_x > 1e-12 * c)
    ok_y = var_y > 1e-12 * c
    slope = torch.where(ok_x, cov / torch.where(ok_x, var_x, 1.0), torch.nan)
    slope = torch.where(ok_x & ~ok_y, 0.0, slope)
    intercept = torch.where(ok_x, (sy - slope * sx) / c, torch.nan)
    r2 = torch.where(ok_x & ok_y, cov * cov / (torch.where(ok_x, var_x, 1.0) * torch.where(ok_y, var_y, 1.0)), torch.nan)
    return slope, intercept, r2.clamp(max=1.0)


def _hist_quantiles(hist: torch.Tensor, qs: Iterable[float]) -> np.ndarray:
    """Lower quantiles from integer histograms (..., size): the smallest k whose CDF reaches q (0 if empty)."""
    cdf = torch.cumsum(hist, dim=-1).to(torch.float64)
    total = cdf[..., -1:].clamp_min(1)
    out = [torch.searchsorted(cdf.contiguous(), (q * total).expand(*cdf.shape[:-1], 1).contiguous() - 1e-9)
           for q in qs]
    result = torch.cat(out, dim=-1)
    return torch.where(cdf[..., -1:] > 0, result, 0).numpy()


def _hist_max(hist: torch.Tensor) -> np.ndarray:
    size = hist.shape[-1]
    index = torch.arange(size, device=hist.device).expand_as(hist)
    return torch.where(hist > 0, index, 0).amax(-1).numpy()


def _num(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _nanmean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _nanmedian(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else None


def _head_entry(cfg: ProfileConfig, st: dict[str, np.ndarray], layer: int, head: int) -> dict[str, Any]:
    kcov = {}
    for d, delta in enumerate(cfg.deltas):
        entry = {"mean": float(st["kcov_mean"][layer, head, d]),
                 "mean_fraction": float(st["kcov_frac_mean"][layer, head, d])}
        for q, value in zip(QUANTILES, st["kcov_quantiles"][layer, head, d]):
            entry[f"p{round(q * 100):d}"] = int(value)
        entry["max"] = int(st["kcov_max"][layer, head, d])
        kcov[coverage_key(delta)] = entry
    return {
        "layer": layer,
        "head": head,
        "kv_head": None,  # filled by measure when the GQA grouping is known
        "rows": int(st["rows"][layer, head]),
        "C": _num(st["C"][layer, head]),
        "C_r2": _num(st["C_r2"][layer, head]),
        "C_intercept": _num(st["C_intercept"][layer, head]),
        "C_points": int(st["fit_points"][layer, head]),
        "k_at_coverage": kcov,
        "topk_mass": {str(k): float(v) for k, v in zip(cfg.ks, st["topk_mass"][layer, head])},
        "tail_mass": {str(k): max(0.0, 1.0 - float(v)) for k, v in zip(cfg.ks, st["topk_mass"][layer, head])},
        "tail_mass_long_rows": {str(k): _num(v) for k, v in zip(cfg.ks, st["tail_mass_long"][layer, head])},
        "eps_k_sparse_fraction": {
            f"{e:g}": {str(k): float(v) for k, v in zip(cfg.ks, st["eps_k_sparse"][layer, head, i])}
            for i, e in enumerate(cfg.eps)
        },
        "entropy": float(st["entropy"][layer, head]),
        "effective_support": float(st["support"][layer, head]),
        "sink_mass": float(st["sink"][layer, head]),
        "local_mass": float(st["local"][layer, head]),
        "sink_local_mass": float(st["stream_long"][layer, head]),
        "class": "streaming" if st["streaming"][layer, head] else "other",
    }


def _position_summary(logn: np.ndarray, logk: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
    """Per layer, the geometric-mean k_{1-fit_delta} (over heads and rows) in each query-position bin."""
    counts = rows.sum(axis=1)  # (layers, bins)
    used = counts.sum(axis=0) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        n_centre = np.exp((logn * rows).sum(axis=(0, 1)) / rows.sum(axis=(0, 1)))
        k_layer = np.exp((logk * rows).sum(axis=1) / counts)
    return {
        "n": [float(v) for v in n_centre[used]],
        "k_geomean_per_layer": [[_num(v) for v in layer[used]] for layer in k_layer],
    }
