"""The learned block gate (SeerAttention's AttnGate): per layer, a rank-r projection of block-pooled queries and keys.

For query block i of head h and key block j, the gate's logit is (pooled_q[h, i] @ Wq[h]) . (pooled_k[g, j] @ Wk[g])
/ sqrt(r), g the kv head of h; a softmax over the causally visible key blocks (j <= i) estimates the share of
block i's attention that falls on block j. Pooled queries are the mean of the block's queries, pooled keys the
element-wise [mean | max | min] of its keys, both after RoPE as the attention backend sees them. The model's own
weights are never touched; only Wq and Wk are trained (`attnsparse.gate.train`). A gate is a directory holding
`gate.safetensors` and `gate.json` (its config), written atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from attnsparse.errors import AttnsparseError

GATE_FORMAT = "attnsparse-gate"
GATE_VERSION = 1
WEIGHTS_FILE = "gate.safetensors"
CONFIG_FILE = "gate.json"
KEY_FEATURES = 3  # pooled keys are [mean | max | min]


@dataclass(frozen=True)
class GateConfig:
    """The model shape a gate was trained for, its block size and rank, and where it came from (`notes`)."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    block: int = 64
    rank: int = 16
    model: str = ""

    def __post_init__(self) -> None:
        if min(self.layers, self.heads, self.kv_heads, self.head_dim) < 1 or self.heads % self.kv_heads:
            raise AttnsparseError(f"gate shape {self.layers} layers x {self.heads} heads / {self.kv_heads} kv heads "
                                  f"x {self.head_dim} dims is not a model's attention shape")
        if self.block < 1 or self.rank < 1:
            raise AttnsparseError(f"gate block {self.block} and rank {self.rank} must be >= 1")

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    def check_model(self, layers: int, heads: int, kv_heads: int, head_dim: int, where: str = "the gate") -> None:
        """One-line error when this gate was trained for another attention shape."""
        if (self.layers, self.heads, self.kv_heads, self.head_dim) != (layers, heads, kv_heads, head_dim):
            raise AttnsparseError(
                f"{where} was trained for {self.layers} layers x {self.heads} heads / {self.kv_heads} kv heads x "
                f"{self.head_dim} dims ({self.model or 'unknown model'}) but the model has {layers} x {heads} / "
                f"{kv_heads} x {head_dim}; train a gate for this model with `attnsparse gate MODEL --out DIR`")

    def check_block(self, block: int, where: str) -> None:
        if block != self.block:
            raise AttnsparseError(f"{where} uses blocks of {block} tokens but the gate was trained on blocks of "
                                  f"{self.block}; train a gate with --block {block} or use block size {self.block}")


class BlockGate(torch.nn.Module):
    """Per-layer query and key projections; `log_probs` gives the gate's distribution over key blocks."""

    def __init__(self, config: GateConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        c = config
        generator = torch.Generator(device="cpu").manual_seed(seed)  # drawn on the CPU: one start on every device
        self.wq = torch.nn.Parameter(torch.randn(c.layers, c.heads, c.head_dim, c.rank, generator=generator,
                                                 device="cpu") / math.sqrt(c.head_dim))
        self.wk = torch.nn.Parameter(torch.randn(c.layers, c.kv_heads, KEY_FEATURES * c.head_dim, c.rank,
                                                 generator=generator, device="cpu")
                                     / math.sqrt(KEY_FEATURES * c.head_dim))

    def start_at_mean_key(self, scaling: float) -> BlockGate:
        """Set the weights so every logit is `scaling` x (pooled query . mean key): the training-free `mean`
        estimator, as a starting point training can only improve on. Needs rank >= head dim; the columns beyond the
        head dim keep small random values (zero ones would get no gradient)."""
        c = self.config
        if c.rank < c.head_dim:
            raise AttnsparseError(f"a gate started at the mean-key estimate needs --rank >= the head dim {c.head_dim}, "
                                  f"got {c.rank}; raise --rank or use --init random")
        with torch.no_grad():
            self.wq[..., c.head_dim:] *= 1e-2
            self.wk[..., c.head_dim:] *= 1e-2
            self.wq[..., : c.head_dim] = torch.eye(c.head_dim) * (scaling * math.sqrt(c.rank))
            self.wk[..., : c.head_dim] = 0.0
            self.wk[:, :, : c.head_dim, : c.head_dim] = torch.eye(c.head_dim)
        return self

    def project_queries(self, layer: int, pooled_q: torch.Tensor) -> torch.Tensor:
        """(B, H, N, D) pooled (or single) queries -> (B, H, N, r), scaled by 1 / sqrt(r)."""
        return pooled_q.to(self.wq.dtype) @ self.wq[layer] / math.sqrt(self.config.rank)

    def project_keys(self, layer: int, pooled_k: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, M, 3D) pooled keys -> (B, Hkv, M, r)."""
        return pooled_k.to(self.wk.dtype) @ self.wk[layer]

    def logits(self, layer: int, pooled_q: torch.Tensor, pooled_k: torch.Tensor,
               query_blocks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, Nq, Nk) gate logits, -inf on key blocks after the query's own block (causal).

        `query_blocks` (Nq,) is the key-block index of each pooled query; default: the last Nq key blocks."""
        batch, heads, queries, _ = pooled_q.shape
        kv_heads, keys = pooled_k.shape[1], pooled_k.shape[2]
        qp = self.project_queries(layer, pooled_q).view(batch, kv_heads, heads // kv_heads * queries, -1)
        kp = self.project_keys(layer, pooled_k)
        scores = (qp @ kp.transpose(-1, -2)).view(batch, heads, queries, keys)
        if query_blocks is None:
            query_blocks = torch.arange(keys - queries, keys, device=scores.device)
        hidden = torch.arange(keys, device=scores.device)[None, :] > query_blocks[:, None]
        return scores.masked_fill(hidden, float("-inf"))

    def log_probs(self, layer: int, pooled_q: torch.Tensor, pooled_k: torch.Tensor,
                  query_blocks: torch.Tensor | None = None) -> torch.Tensor:
        return torch.log_softmax(self.logits(layer, pooled_q, pooled_k, query_blocks), dim=-1)

    def save(self, directory: str | Path, notes: dict[str, Any] | None = None) -> Path:
        """Write gate.safetensors and gate.json into `directory` (atomically, weights first)."""
        from safetensors.torch import save

        from attnsparse.core.runs import atomic_write_bytes, atomic_write_json

        directory = Path(directory)
        tensors = {name: getattr(self, name).detach().float().to("cpu").contiguous() for name in ("wq", "wk")}
        atomic_write_bytes(directory / WEIGHTS_FILE, save(tensors, metadata={"format": GATE_FORMAT}))
        atomic_write_json(directory / CONFIG_FILE, {"format": GATE_FORMAT, "version": GATE_VERSION,
                                                    "config": asdict(self.config), "notes": notes or {}})
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> BlockGate:
        """A gate saved by `save`; one-line errors for a missing, foreign or inconsistent directory."""
        directory = Path(directory)
        hint = "train one with `attnsparse gate MODEL --out DIR`"
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise AttnsparseError(f"gate {directory} has no {CONFIG_FILE} and {WEIGHTS_FILE}; {hint}")
        try:
            stored = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise AttnsparseError(f"gate config {config_path} is not valid JSON: {error}") from None
        if not isinstance(stored, dict) or stored.get("format") != GATE_FORMAT:
            raise AttnsparseError(f"{config_path} is not a gate config (expected \"format\": \"{GATE_FORMAT}\")")
        if stored.get("version") != GATE_VERSION:
            raise AttnsparseError(f"gate version {stored.get('version')} is not supported (need {GATE_VERSION})")
        known = {f.name for f in fields(GateConfig)}
        try:
            config = GateConfig(**{k: v for k, v in dict(stored.get("config", {})).items() if k in known})
        except TypeError as error:
            raise AttnsparseError(f"gate config {config_path} is incomplete: {error}") from None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError) as error:
            raise AttnsparseError(f"gate weights {weights_path} cannot be read: {error}") from None
        gate = cls(config)
        for name in ("wq", "wk"):
            expected = getattr(gate, name).shape
            if name not in tensors or tensors[name].shape != expected:
                got = tuple(tensors[name].shape) if name in tensors else "missing"
                raise AttnsparseError(f"gate weights {weights_path}: {name} is {got}, its config needs "
                                      f"{tuple(expected)}; the two files are from different gates")
            getattr(gate, name).data.copy_(tensors[name])
        return gate.requires_grad_(False)


def pool_queries(query: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, Q, D) -> (B, H, ceil(Q / block), D): the mean query of each block (a partial last block: its own)."""
    batch, heads, length, dim = query.shape
    blocks = -(-length // block)
    pad = blocks * block - length
    padded = torch.nn.functional.pad(query.float(), (0, 0, 0, pad)) if pad else query.float().contiguous()
    counts = torch.full((blocks,), float(block), device=query.device)
    counts[-1] = length - (blocks - 1) * block
    return padded.view(batch, heads, blocks, block, dim).sum(3) / counts[:, None]


def pool_keys(key: torch.Tensor, block: int) -> torch.Tensor:
    """(B, Hkv, K, D) -> (B, Hkv, ceil(K / block), 3D): each block's [mean | max | min] key over its own keys."""
    batch, heads, length, dim = key.shape
    blocks = -(-length // block)
    pad = blocks * block - length
    k = key.float().contiguous()
    mean = pool_queries(k, block)
    if not pad:  # no padding: one view serves both extremes
        top = bottom = k.view(batch, heads, blocks, block, dim)
    else:
        top = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("-inf")).view(batch, heads, blocks, block, dim)
        bottom = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("inf")).view(batch, heads, blocks, block, dim)
    return torch.cat([mean, top.amax(3), bottom.amin(3)], dim=-1)


def forced_mask(query_blocks: torch.Tensor, key_blocks: int, sink: int, local: int) -> torch.Tensor:
    """(Nq, Nk) bool: the blocks selection keeps whatever the estimate says, for query blocks at key-block indices
    `query_blocks`: the first `sink` key blocks and the `local` blocks ending at the diagonal (square blocks)."""
    cols = torch.arange(key_blocks, device=query_blocks.device)[None, :]
    rows = query_blocks[:, None]
    return (cols <= rows) & ((cols < sink) | (cols > rows - local))


def merged_kl(target: torch.Tensor, log_probs: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """KL(target || gate) with the `forced` blocks (Nq, Nk) of each row merged into one outcome.

    Selection keeps the forced blocks anyway, so how mass splits among them is nothing the gate must learn; what
    remains is the forced blocks' total share and the distribution over the other blocks, each weighted by the
    mass it carries. By the chain rule this is the row KL minus the forced share times the KL among forced blocks."""
    hidden = torch.full_like(log_probs, float("-inf"))
    forced_target = torch.where(forced, target, torch.zeros_like(target)).sum(-1, keepdim=True)
    forced_gate = torch.logsumexp(torch.where(forced, log_probs, hidden), dim=-1, keepdim=True)
    free_target = torch.where(forced, torch.zeros_like(target), target)
    return block_kl(torch.cat([free_target, forced_target], -1), torch.cat([log_probs, forced_gate], -1))


@dataclass
class PreparedTarget:
    """A layer's target reduced once, before the fit, to what the merged KL needs of it: a step then builds only
    the logits, their log-sum-exp and one product (not the ~10 full-size maps `merged_kl` allocates from scratch)."""

    free: torch.Tensor  # (B, H, Nq, Nk) the target with the forced blocks zeroed (0 after the diagonal)
    free_share: torch.Tensor  # (B, H, Nq) its row sums
    forced_share: torch.Tensor  # (B, H, Nq) the forced blocks' total share
    forced_index: torch.Tensor  # (Nq, F) long, each row's forced key blocks, padded where a row has fewer
    forced_valid: torch.Tensor  # (Nq, F) bool
    visible: torch.Tensor  # (Nq, Nk) bool, causal
    constant: torch.Tensor  # (B, H, Nq) sum of t log t over the merged outcomes (the KL's target-only part)


def prepare_target(target: torch.Tensor, query_blocks: torch.Tensor, forced: torch.Tensor,
                   in_place: bool = False) -> PreparedTarget:
    """`PreparedTarget` of a (B, H, Nq, Nk) target with `forced` (Nq, Nk) blocks merged (none: whole-row KL);
    `in_place` zeroes the forced blocks in `target` itself instead of a copy (the caller no longer needs it)."""
    visible = torch.arange(target.shape[-1], device=target.device)[None, :] <= query_blocks[:, None]
    forced_share = torch.where(forced, target, torch.zeros((), device=target.device)).sum(-1)
    free = target.masked_fill_(forced, 0.0) if in_place else target.masked_fill(forced, 0.0)
    counts = forced.sum(-1)
    width = int(counts.max()) if counts.numel() else 0
    forced_index = torch.sort(forced.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :width]
    forced_valid = torch.arange(width, device=target.device)[None, :] < counts[:, None]
    constant = torch.xlogy(free, free).sum(-1) + torch.xlogy(forced_share, forced_share)
    return PreparedTarget(free, free.sum(-1), forced_share, forced_index, forced_valid, visible, constant)


def prepared_kl(logits: torch.Tensor, prepared: PreparedTarget) -> torch.Tensor:
    """`merged_kl` (mean over rows) from the gate's logits (B, H, Nq, Nk), -inf after the diagonal, and a
    `PreparedTarget`: constant - sum_j free_j log g_j - forced_share log g(forced), with log g = logits - lse."""
    lse = torch.logsumexp(logits, dim=-1)
    cross = (prepared.free * logits.masked_fill(~prepared.visible, 0.0)).sum(-1) - prepared.free_share * lse
    if prepared.forced_index.shape[-1]:
        index = prepared.forced_index.expand(*logits.shape[:-2], -1, -1)
        chosen = logits.gather(-1, index).masked_fill(~prepared.forced_valid, float("-inf"))
        forced_gate = torch.logsumexp(chosen, dim=-1) - lse  # -inf only on rows with nothing forced (share 0)
        cross = cross + torch.where(prepared.forced_share > 0, prepared.forced_share * forced_gate, 0.0)
    return (prepared.constant - cross).mean()


def block_kl(target: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(target || gate) = sum_j t_j (log t_j - log g_j), with 0 log 0 = 0.

    Rows are the last axis; entries where the target is 0 contribute nothing (also where the gate is -inf)."""
    positive = target > 0
    log_target = torch.where(positive, target, torch.ones_like(target)).log()
    gate = torch.where(positive, log_probs, torch.zeros_like(log_probs))
    return (target * (log_target - gate)).sum(-1).mean()
