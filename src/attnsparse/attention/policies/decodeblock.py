"""`decodeblock:B:BUDGET[:SCORE]`: each query row keeps exactly the keys block top-k decoding reads for it.

Row t keeps what `block:B:BUDGET[:SCORE]` (decode.policies.block) reads at the decode step that produces position
t's output: context t + 1, block summaries by the same scorer, the first `sink_blocks` and last `recent_blocks`
blocks always, then the best-scored blocks up to BUDGET tokens (or that density of t + 1) with ties to the lower
block, one choice per kv head scored by the max over its G query heads. Sparse-aware training under it trains the
attention that runs when the model decodes, not exact top-k. The selection is a mask (no gradient); attention over
the kept keys is the backend's, differentiable. The block summaries are made once per call (`prepare`), the block
scores per query chunk, so memory stays O(chunk x keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnsparse.attention.policies.base import POLICIES, Policy
from attnsparse.decode import kernels as K
from attnsparse.decode.policies.block import BlockPolicy
from attnsparse.decode.scorers import BoundScore, ChannelScore, MeanScore
from attnsparse.errors import AttnsparseError
from attnsparse.specs import ParsedSpec

PREFILL_SCORES = (MeanScore, BoundScore, ChannelScore)  # decode scorers whose block scores a prefill reproduces


@POLICIES.register("decodeblock", usage="decodeblock:B:BUDGET[:mean|bound|channelsR] (as decode's block:B:BUDGET)",
                   help="the keys block top-k decoding reads at each position (train what decoding runs)")
@dataclass(frozen=True)
class DecodeBlock(Policy):
    """The decode rule `rule` applied to every query row of a prefill."""

    rule: BlockPolicy
    name: ClassVar[str] = "decodeblock"

    def __post_init__(self) -> None:
        if not isinstance(self.rule.score, PREFILL_SCORES):
            names = ", ".join(score.name for score in PREFILL_SCORES)  # type: ignore[attr-defined]
            raise AttnsparseError(f"decodeblock has no prefill form of block score '{self.rule.score.spec}'; "
                                  f"use one of {names}")

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> DecodeBlock:
        return cls(BlockPolicy.from_spec(spec))

    @property
    def spec(self) -> str:
        return "decode" + self.rule.spec

    def prepare(self, query: torch.Tensor, key: torch.Tensor, *, scaling: float, layer_idx: int) -> Policy:
        with torch.no_grad():
            return DecodeBlockCall(self.rule, query.detach(), key.detach(), block_summary(self.rule, key.detach()),
                                   key.shape[2] - query.shape[2])

    def keep_mask(self, scores: torch.Tensor, visible: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
        raise AttnsparseError("decodeblock selects from the call's queries and keys: the backend calls prepare() first")

    def kept_per_row(self, rows: torch.Tensor) -> torch.Tensor:
        """All blocks but the (total - count) unselected ones, which are full: the partial block is always recent."""
        rule = self.rule
        total, count = blocks_at(rule, rows)
        return rows - (total - count) * rule.block_size


def blocks_at(rule: BlockPolicy, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks in a context of n tokens and blocks read there (`BlockPolicy.selected_blocks`, elementwise)."""
    size = rule.block_size
    total = torch.div(n + size - 1, size, rounding_mode="floor")
    if rule.budget:
        tokens = torch.full_like(n, rule.budget)
    else:  # float64, as math.ceil(density * n) in the decode rule
        tokens = torch.ceil(n.to(torch.float64) * rule.density).to(n.dtype)
    wanted = torch.div(tokens + size - 1, size, rounding_mode="floor").clamp(min=rule.sink_blocks + rule.recent_blocks)
    return total, torch.minimum(total, wanted)


def block_summary(rule: BlockPolicy, key: torch.Tensor) -> torch.Tensor:
    """The scorer's per-block data for keys (B, Hkv, N, D), as the decode store holds it after N tokens."""
    size, n = rule.block_size, key.shape[2]
    blocks = -(-n // size)
    padded = torch.nn.functional.pad(key, (0, 0, 0, blocks * size - n))
    key_blocks = padded.view(*key.shape[:2], blocks, size, key.shape[-1])
    score = rule.score
    if isinstance(score, MeanScore):
        return K.block_sums(key_blocks, n)
    if isinstance(score, BoundScore):
        kmin, kmax = K.block_summaries(key_blocks, n)
        return torch.cat([kmax, kmin], dim=-1)
    if isinstance(score, ChannelScore):
        return key.to(torch.float16).float()  # the decode store's float16 key copy, read back as float32
    raise AttnsparseError(f"decodeblock has no prefill form of block score '{score.spec}'")


@dataclass(frozen=True, eq=False)
class DecodeBlockCall(Policy):
    """One attention call under `rule`: its queries (B, H, Q, D), keys (B, Hkv, N, D) and the block summary."""

    rule: BlockPolicy
    query: torch.Tensor
    key: torch.Tensor
    summary: torch.Tensor
    offset: int  # key-axis position of query row 0
    name: ClassVar[str] = "decodeblock-call"

    @property
    def spec(self) -> str:
        return "decode" + self.rule.spec

    def keep_mask(self, scores: torch.Tensor, visible: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
        rule, size = self.rule, self.rule.block_size
        batch, heads, queries, _ = self.query.shape
        kv_heads, width = self.key.shape[1], scores.shape[-1]
        groups, blocks = heads // kv_heads, -(-width // size)
        rows = query_positions - self.offset
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= queries):
            raise AttnsparseError("decodeblock needs queries aligned to the end of the keys (a prefill or one-token "
                                  "steps); this call's causal mask is aligned to the start")
        with torch.no_grad():
            q = self.query[:, :, rows].view(batch, kv_heads, groups, -1, self.query.shape[-1]).transpose(2, 3)
            block_scores = self._block_scores(q, blocks, width)  # (B, Hkv, Qc, blocks)
            total, count = blocks_at(rule, query_positions + 1)
            index = torch.arange(blocks, device=scores.device)
            forced = (index < rule.sink_blocks) | (index >= (total - rule.recent_blocks)[:, None])
            block_scores = block_scores.masked_fill(forced, float("inf"))
            block_scores = block_scores.masked_fill(index >= total[:, None], float("-inf"))
            order = block_scores.argsort(dim=-1, descending=True, stable=True)  # ties: the lower block first
            rank = torch.empty_like(order).scatter_(-1, order, index.expand_as(order))
            kept_blocks = rank < count[:, None]
            kept = kept_blocks.repeat_interleave(size, dim=-1)[..., :width]
            kept = kept.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(batch, heads, -1, width)
        return kept & visible

    def _block_scores(self, q: torch.Tensor, blocks: int, width: int) -> torch.Tensor:
        """Each row's score of every block (B, Hkv, Qc, blocks) from its G heads q (B, Hkv, Qc, G, D): the decode
        scorer's own function, broadcast over the chunk's rows."""
        score = self.rule.score
        if isinstance(score, MeanScore):
            return K.block_means(q, self.summary[:, :, None, :blocks])
        if isinstance(score, BoundScore):
            return K.block_bounds(q, self.summary[:, :, None, :blocks])
        assert isinstance(score, ChannelScore)
        channels = min(score.channels, q.shape[-1])
        chosen = q.abs().sum(dim=-2).topk(channels, dim=-1).indices  # (B, Hkv, Qc, R)
        on = torch.zeros(q.shape[:3] + q.shape[-1:], dtype=q.dtype, device=q.device).scatter_(-1, chosen, 1.0)
        keys = self.summary[:, :, None, :width]
        per_key = (q * on.unsqueeze(-2)) @ keys.transpose(-1, -2)  # (B, Hkv, Qc, G, width)
        padded = per_key.new_full((*per_key.shape[:-1], blocks * self.rule.block_size), float("-inf"))
        padded[..., :width] = per_key
        return padded.view(*per_key.shape[:-1], blocks, self.rule.block_size).amax(dim=-1).amax(dim=-2)

    def kept_per_row(self, rows: torch.Tensor) -> torch.Tensor:
        raise AttnsparseError("a decodeblock call's selection belongs to one call; ask the decodeblock policy")
