"""Per-head decoding plans: which KV policy each (layer, kv head) uses while generating, saved as JSON.

A plan assigns every key/value head a decode policy (`attnsparse.decode.policies`, see docs/decode.md): `dense`,
`topk:K`, `block:B:BUDGET[:SCORE]` or `streaming:S:W` (also `sink+window:S:W`). Policies are per kv head because the
KV cache is per kv head: the query heads of one group share its keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnsparse.decode import kernels as K
from attnsparse.decode.policies import POLICIES, BlockPolicy, HeadPolicy, StreamingPolicy, policy_from_dict
from attnsparse.errors import AttnsparseError

if TYPE_CHECKING:
    from attnsparse.measure.profile import ProfileView

PLAN_FORMAT = "attnsparse-decode-plan"
PLAN_VERSION = 1
SPEC_HELP = POLICIES.usage()


def parse_head_policy(spec: str) -> HeadPolicy:
    """Parse `dense`, `topk:K`, `block:B:BUDGET[:SCORE]` (BUDGET an int of tokens or a float density) or
    `streaming:S:W`; a one-line error listing every form otherwise."""
    return POLICIES.parse(spec)


@dataclass
class DecodePlan:
    """A policy for every (layer, kv head); `heads[layer][kv_head]`."""

    heads: list[list[HeadPolicy]]
    model: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return len(self.heads)

    @property
    def kv_heads(self) -> int:
        return len(self.heads[0]) if self.heads else 0

    @classmethod
    def uniform(cls, policy: HeadPolicy | str, layers: int, kv_heads: int, model: str = "") -> DecodePlan:
        head = parse_head_policy(policy) if isinstance(policy, str) else policy
        return cls([[head] * kv_heads for _ in range(layers)], model)

    def counts(self) -> dict[str, int]:
        """How many kv heads use each policy spec."""
        out: dict[str, int] = {}
        for row in self.heads:
            for head in row:
                out[head.spec] = out.get(head.spec, 0) + 1
        return out

    def with_gate(self, directory: str | Path) -> DecodePlan:
        """This plan with every block head scored by `gate` and naming no gate directory given `directory`."""
        from attnsparse.decode.scorers.gate import with_gate

        heads = [[replace(head, score=with_gate(head.score, str(directory))) if isinstance(head, BlockPolicy)
                  else head for head in row] for row in self.heads]
        return DecodePlan(heads, self.model, dict(self.notes))

    def uses_gate(self) -> bool:
        from attnsparse.decode.scorers.gate import GateScore

        return any(isinstance(head, BlockPolicy) and isinstance(head.score, GateScore) for row in self.heads
                   for head in row)

    def check_model(self, layers: int, kv_heads: int) -> None:
        if (self.layers, self.kv_heads) != (layers, kv_heads):
            raise AttnsparseError(
                f"the plan covers {self.layers} layers x {self.kv_heads} kv heads but the model has "
                f"{layers} x {kv_heads}; make a plan for this model"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the most common policy as `default`, then only the heads that differ."""
        counts = self.counts()
        default_spec = max(counts, key=counts.__getitem__)
        default = next(h for row in self.heads for h in row if h.spec == default_spec)
        overrides = [
            {"layer": layer, "kv_head": kv} | head.to_dict()
            for layer, row in enumerate(self.heads) for kv, head in enumerate(row) if head != default
        ]
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "model": self.model, "layers": self.layers,
                "kv_heads": self.kv_heads, "default": default.to_dict(), "heads": overrides, "notes": self.notes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecodePlan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise AttnsparseError(f"not a decode plan (expected \"format\": \"{PLAN_FORMAT}\")")
        if data.get("version") != PLAN_VERSION:
            raise AttnsparseError(f"decode plan version {data.get('version')} is not supported (need {PLAN_VERSION})")
        try:
            layers, kv_heads = int(data["layers"]), int(data["kv_heads"])
        except (KeyError, TypeError, ValueError) as error:
            raise AttnsparseError("decode plan needs integer 'layers' and 'kv_heads'") from error
        if layers < 1 or kv_heads < 1:
            raise AttnsparseError("decode plan needs layers >= 1 and kv_heads >= 1")
        default = policy_from_dict(data.get("default", {"policy": "dense"}))
        heads = [[default] * kv_heads for _ in range(layers)]
        for entry in data.get("heads", []):
            try:
                layer, kv = int(entry["layer"]), int(entry["kv_head"])
            except (KeyError, TypeError, ValueError) as error:
                raise AttnsparseError(f"plan entry {entry!r} needs integer 'layer' and 'kv_head'") from error
            if not (0 <= layer < layers and 0 <= kv < kv_heads):
                raise AttnsparseError(f"plan entry {entry!r} is outside {layers} layers x {kv_heads} kv heads")
            heads[layer][kv] = policy_from_dict(entry)
        return cls(heads, str(data.get("model", "")), dict(data.get("notes", {})))

    def save(self, path: str | Path) -> None:
        from attnsparse.core.runs import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> DecodePlan:
        path = Path(path)
        if not path.is_file():
            raise AttnsparseError(f"decode plan {path} does not exist; {SPEC_HELP}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise AttnsparseError(f"decode plan {path} is not valid JSON: {error}") from error
        return cls.from_dict(data)


def head_bytes(policy: HeadPolicy, n: int, head_dim: int, itemsize: int, groups: int = 1) -> int:
    """Bytes one decode step reads for one kv head under `policy` with `n` tokens in context: what the head's store
    counts in `SparseCache.bytes_read_per_step` (a streaming head reads the S + W tokens it holds)."""
    if isinstance(policy, StreamingPolicy):
        return K.dense_bytes(min(n, policy.sink + policy.window), head_dim, itemsize)
    return policy.bytes_read(n, head_dim, itemsize, groups)


def plan_density(plan: DecodePlan, context: int, head_dim: int, itemsize: int = 4, groups: int = 1) -> float:
    """The plan's share of the dense KV bytes one decode step reads at `context` tokens (the `density` decode reports:
    summaries, channel copies and selected keys and values of every kv head, over dense keys and values)."""
    if context < 1:
        raise AttnsparseError(f"density context {context} must be >= 1 token")
    read = sum(head_bytes(head, context, head_dim, itemsize, groups) for row in plan.heads for head in row)
    return read / (plan.layers * plan.kv_heads * K.dense_bytes(context, head_dim, itemsize))


def _policy(spec: HeadPolicy | str) -> HeadPolicy:
    return parse_head_policy(spec) if isinstance(spec, str) else spec


def kv_retrieval_scores(profile: ProfileView) -> list[list[float]] | None:
    """Per (layer, kv head), the highest retrieval score of its query heads; None when the profile has none."""
    scores = [head.retrieval_score for head in profile.per_head]
    if any(score is None for score in scores):
        return None
    groups = profile.heads // profile.kv_heads
    out = [[0.0] * profile.kv_heads for _ in range(profile.layers)]
    for head in profile.per_head:
        kv = head.head // groups
        out[head.layer][kv] = max(out[head.layer][kv], float(head.retrieval_score or 0.0))
    return out


def _protected_heads(profile: ProfileView, protect: int | float | None) -> set[tuple[int, int]]:  # noqa: PYI041
    """(layer, kv head) pairs to protect: the `protect` best by retrieval score (an int) or every kv head whose best
    query head scores at least `protect` (a float)."""
    if protect is None:
        return set()
    scores = kv_retrieval_scores(profile)
    if scores is None:
        raise AttnsparseError("the profile has no retrieval scores to protect heads by; measure them with "
                              "`attnsparse measure ... --retrieval`")
    ranked = sorted(((score, layer, kv) for layer, row in enumerate(scores) for kv, score in enumerate(row)),
                    key=lambda item: (-item[0], item[1], item[2]))
    if isinstance(protect, bool) or not isinstance(protect, int | float):
        raise AttnsparseError(f"protect {protect!r} must be a head count (an int) or a score threshold (a float)")
    if isinstance(protect, int):
        if not 0 <= protect <= len(ranked):
            raise AttnsparseError(f"cannot protect {protect} kv heads: the model has {len(ranked)}; give 0 to "
                                  f"{len(ranked)}, or a score threshold such as 0.1")
        return {(layer, kv) for _, layer, kv in ranked[:protect]}
    if not 0.0 <= protect <= 1.0:
        raise AttnsparseError(f"retrieval threshold {protect} must be in [0, 1] (or give a head count as an int)")
    return {(layer, kv) for score, layer, kv in ranked if score >= protect}


def plan_from_profile(
    profile: ProfileView,
    other: HeadPolicy | str = "block:16:0.0625",
    streaming: HeadPolicy | str | None = "streaming:4:1024",
    *,
    protect: int | float | None = None,  # noqa: PYI041 (an int counts heads, a float is a threshold)
    protected: HeadPolicy | str = "dense",
    average_density: float | None = None,
    context: int | None = None,
    head_dim: int | None = None,
    itemsize: int = 4,
    groups: int = 1,
) -> DecodePlan:
    """A plan from a `measure` profile: protected kv heads get `protected`, streaming kv heads `streaming`, the rest
    `other`.

    A kv head is streaming when every query head of its group is classified streaming (eviction is per kv head, so
    one non-streaming query head keeps the group whole); `streaming=None` streams none. `protect` picks kv heads by
    retrieval score, the best query head of the group counting: an int is how many (the best first), a float a
    threshold. With `average_density`, `other` must be a block policy and its token budget (whole blocks, the same
    for every such head) is the largest at which the plan reads at most that share of the dense KV bytes per
    decode step at `context` tokens (default: the profile's ctx), counted as `plan_density` does; `head_dim` (and
    `itemsize`, `groups`: query heads per kv head) are the model's. The budget found and the density reached are
    in the plan's notes.
    """
    other, protected = _policy(other), _policy(protected)
    streaming = None if streaming is None else _policy(streaming)
    layers, heads, kv_heads = profile.layers, profile.heads, profile.kv_heads
    if kv_heads < 1 or heads % kv_heads:
        raise AttnsparseError(f"profile has {heads} heads and {kv_heads} kv heads; heads must be a multiple")
    if len(profile.per_head) != layers * heads:
        raise AttnsparseError(f"profile lists {len(profile.per_head)} heads, expected {layers} x {heads}")
    per_group = heads // kv_heads
    is_streaming = [[streaming is not None] * kv_heads for _ in range(layers)]
    for entry in profile.per_head:
        if not (0 <= entry.layer < layers and 0 <= entry.head < heads):
            raise AttnsparseError(f"profile lists layer {entry.layer} head {entry.head}, outside its {layers} layers "
                                  f"x {heads} heads; pass the profile.json written by `attnsparse measure`")
        if not entry.streaming:
            is_streaming[entry.layer][entry.head // per_group] = False
    guarded = _protected_heads(profile, protect)
    kinds = [["protected" if (layer, kv) in guarded else "streaming" if is_streaming[layer][kv] else "other"
              for kv in range(kv_heads)] for layer in range(layers)]
    notes: dict[str, Any] = {"source": "profile", "other": other.spec,
                             "streaming": None if streaming is None else streaming.spec}
    if protect is not None:
        notes |= {"protect": protect, "protected": protected.spec, "protected_heads": len(guarded)}
    if average_density is not None:
        other, reached = _budget_for_density(kinds, other, protected, streaming, average_density,
                                             profile.ctx if context is None else context, head_dim, itemsize, groups)
        notes |= {"other": other.spec, "average_density": average_density, "density": reached,
                  "context": profile.ctx if context is None else context, "head_dim": head_dim, "itemsize": itemsize}
    chosen = {"protected": protected, "streaming": streaming, "other": other}
    return DecodePlan([[chosen[kind] for kind in row] for row in kinds], profile.model, notes)  # type: ignore[misc]


def _budget_for_density(
    kinds: list[list[str]], other: HeadPolicy, protected: HeadPolicy, streaming: HeadPolicy | None, target: float,
    context: int, head_dim: int | None, itemsize: int, groups: int,
) -> tuple[BlockPolicy, float]:
    """The `other` block policy with the most whole blocks per step at which the plan's density stays <= target."""
    if not isinstance(other, BlockPolicy):
        raise AttnsparseError(f"average_density sets the block budget of the other heads, but they use {other.spec}; "
                              "give them a block policy such as block:16:0.0625")
    if head_dim is None or head_dim < 1 or itemsize < 1:
        raise AttnsparseError("average_density needs the model's head_dim (and itemsize, bytes per KV element) to "
                              "count bytes read")
    if not 0.0 < target <= 1.0:
        raise AttnsparseError(f"average density {target} must be in (0, 1]")
    if context < 1:
        raise AttnsparseError(f"density context {context} must be >= 1 token")
    count = {kind: sum(row.count(kind) for row in kinds) for kind in ("protected", "streaming", "other")}
    if count["other"] == 0:
        raise AttnsparseError("every kv head is protected or streaming, so no head's budget is left to set "
                              "average_density with; protect fewer heads")
    dense = K.dense_bytes(context, head_dim, itemsize) * sum(len(row) for row in kinds)
    fixed = count["protected"] * head_bytes(protected, context, head_dim, itemsize, groups)
    if streaming is not None:
        fixed += count["streaming"] * head_bytes(streaming, context, head_dim, itemsize, groups)
    size = other.block_size
    least = max(other.sink_blocks + other.recent_blocks, 1)
    total_blocks = -(-context // size)

    def density(blocks: int) -> float:
        policy = replace(other, budget=blocks * size, density=0.0)
        return (fixed + count["other"] * head_bytes(policy, context, head_dim, itemsize, groups)) / dense

    lowest = density(least)
    if lowest > target * (1 + 1e-12):
        raise AttnsparseError(
            f"average density {target:g} at {context} tokens is too low: {count['protected']} protected "
            f"({protected.spec}) and {count['streaming']} streaming kv heads with the other {count['other']} at their "
            f"least {least} blocks already read {lowest:.4f}; protect fewer heads or raise the density")
    blocks = least
    while blocks < total_blocks and density(blocks + 1) <= target * (1 + 1e-12):
        blocks += 1
    if blocks == total_blocks and density(blocks) < target * (1 - 1e-12):
        raise AttnsparseError(f"average density {target:g} at {context} tokens is more than this plan reads with every "
                              f"block of the other heads ({density(blocks):.4f}); lower it")
    return replace(other, budget=blocks * size, density=0.0), density(blocks)


def resolve_plan(spec: str | Path | DecodePlan, layers: int, kv_heads: int, model: str = "") -> DecodePlan:
    """A plan from a DecodePlan, a JSON file path, or a single policy spec applied to every head."""
    if isinstance(spec, DecodePlan):
        plan = spec
    elif str(spec).endswith(".json") or Path(str(spec)).is_file():
        plan = DecodePlan.load(spec)
    else:
        plan = DecodePlan.uniform(parse_head_policy(str(spec)), layers, kv_heads, model)
    plan.check_model(layers, kv_heads)
    return plan

