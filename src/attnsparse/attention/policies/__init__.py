"""Prefill attention policies: which keys each query keeps, parsed from short specs such as `topk:16`.

Each policy is one file here: a frozen dataclass of its parameters registered by name in `POLICIES`, with
`from_spec`, `spec`, `keep_mask`, `kept_per_row` (hence `kept_pairs`, `density`) and `is_dense`. Adding a
policy means adding its file and importing it below; parsing and error messages pick it up, and tests/test_cli_help.py fails until `evaluate --help` names it.
"""

from __future__ import annotations

from attnsparse.attention.policies.base import POLICIES, Policy
from attnsparse.attention.policies.blocksparse import BlockSparse, KeptBlocks
from attnsparse.attention.policies.budget import HeadBudget, HeadTopK, head_topk_keep_mask, read_budget
from attnsparse.attention.policies.decodeblock import DecodeBlock
from attnsparse.attention.policies.dense import Dense
from attnsparse.attention.policies.sink_window import SinkWindow, sink_window_keep_mask
from attnsparse.attention.policies.topk import TopK, topk_keep_mask
from attnsparse.errors import AttnsparseError
from attnsparse.specs import split_specs

__all__ = [
    "DENSE",
    "POLICIES",
    "POLICY_HELP",
    "BlockSparse",
    "DecodeBlock",
    "Dense",
    "HeadBudget",
    "HeadTopK",
    "KeptBlocks",
    "Policy",
    "SinkWindow",
    "TopK",
    "head_topk_keep_mask",
    "parse_policies",
    "parse_policy",
    "read_budget",
    "sink_window_keep_mask",
    "topk_keep_mask",
]

DENSE = Dense()
POLICY_HELP = POLICIES.usage()


def parse_policy(spec: str | Policy) -> Policy:
    """A Policy from `dense`, `topk:K`, `sink+window:S:W` or `streaming:S:W` (a Policy passes through unchanged)."""
    return spec if isinstance(spec, Policy) else POLICIES.parse(spec)


def parse_policies(specs: str) -> list[Policy]:
    """Parse a comma-separated list such as `dense,topk:8,sink+window:4:64`."""
    items = split_specs(specs)
    if not items:
        raise AttnsparseError(f"empty policy list '{specs}'; {POLICY_HELP}")
    return [parse_policy(item) for item in items]
