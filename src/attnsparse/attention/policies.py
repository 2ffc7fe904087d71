"""Attention policies: which keys each query keeps. Parsed from short specs such as `topk:16`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnsparse.errors import AttnsparseError

POLICY_HELP = "use dense, topk:K (K >= 1) or sink+window:S:W (S >= 0, W >= 1)"


@dataclass(frozen=True)
class Policy:
    """A key-selection rule applied to every query row.

    - `dense`: keep every visible key.
    - `topk`: keep the k largest scores of the row (ties: the earlier key wins).
    - `sink+window`: keep the first `sink` visible keys and the last `window` keys up to the query.
    """

    name: str
    k: int = 0
    sink: int = 0
    window: int = 0

    @property
    def spec(self) -> str:
        if self.name == "topk":
            return f"topk:{self.k}"
        if self.name == "sink+window":
            return f"sink+window:{self.sink}:{self.window}"
        return "dense"

    @property
    def is_dense(self) -> bool:
        return self.name == "dense"

    def keep_mask(self, scores: torch.Tensor, visible: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
        """Bool mask (same shape as `scores`) of the keys this policy keeps; always a subset of `visible`."""
        visible = visible.expand_as(scores)
        if self.name == "dense":
            return visible
        if self.name == "topk":
            return topk_keep_mask(scores, visible, self.k)
        return sink_window_keep_mask(visible, query_positions, self.sink, self.window)

    def kept_pairs(self, n: int) -> int:
        """Kept (query, key) pairs for one causal sequence of n tokens with no padding."""
        rows = torch.arange(1, n + 1)
        if self.name == "dense":
            return int(rows.sum())
        if self.name == "topk":
            return int(rows.clamp(max=self.k).sum())
        return int(rows.clamp(max=self.sink + self.window).sum())

    def density(self, n: int) -> float:
        """Kept pairs over causal pairs, n(n+1)/2, for a causal sequence of n tokens."""
        return self.kept_pairs(n) / (n * (n + 1) / 2)


def parse_policy(spec: str | Policy) -> Policy:
    """Parse `dense`, `topk:K` or `sink+window:S:W` into a Policy; a clear error otherwise."""
    if isinstance(spec, Policy):
        return spec
    text = spec.strip().lower()
    name, _, rest = text.partition(":")
    try:
        if name == "dense" and not rest:
            return Policy("dense")
        if name == "topk":
            k = int(rest)
            if k < 1:
                raise AttnsparseError(f"policy '{spec}': k must be >= 1; {POLICY_HELP}")
            return Policy("topk", k=k)
        if name == "sink+window":
            sink_text, _, window_text = rest.partition(":")
            sink, window = int(sink_text), int(window_text)
            if sink < 0 or window < 1:
                raise AttnsparseError(f"policy '{spec}': need sink >= 0 and window >= 1; {POLICY_HELP}")
            return Policy("sink+window", sink=sink, window=window)
    except ValueError:
        pass
    raise AttnsparseError(f"unknown attention policy '{spec}'; {POLICY_HELP}")


def parse_policies(specs: str) -> list[Policy]:
    """Parse a comma-separated list such as `dense,topk:8,topk:16`."""
    items = [item for item in (part.strip() for part in specs.split(",")) if item]
    if not items:
        raise AttnsparseError(f"empty policy list '{specs}'; {POLICY_HELP}")
    return [parse_policy(item) for item in items]


def topk_keep_mask(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest visible scores; among equal scores at the threshold, the earliest keys win.

    Rows with at most k visible keys keep all of them. The result does not depend on torch.topk's tie order.
    """
    visible = visible.expand_as(scores)
    if k >= scores.shape[-1]:
        return visible
    masked = scores.masked_fill(~visible, float("-inf"))
    threshold = masked.topk(k, dim=-1).values[..., -1:]
    above = masked > threshold
    at_threshold = (masked == threshold) & visible
    still_needed = k - above.sum(dim=-1, keepdim=True)
    return above | (at_threshold & (at_threshold.cumsum(dim=-1) <= still_needed))


def sink_window_keep_mask(
    visible: torch.Tensor, query_positions: torch.Tensor, sink: int, window: int
) -> torch.Tensor:
    """Keep the first `sink` visible keys and the keys within `window` positions up to each query."""
    key_index = torch.arange(visible.shape[-1], device=visible.device)
    recent = key_index > (query_positions.to(visible.device)[:, None] - window)
    first = visible.cumsum(dim=-1) <= sink
    return visible & (recent | first)
