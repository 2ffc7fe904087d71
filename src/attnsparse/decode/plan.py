"""Per-head decoding plans: which KV policy each (layer, kv head) uses while generating, saved as JSON.

A plan assigns every key/value head a decode policy (`attnsparse.decode.policies`, see docs/decode.md): `dense`,
`topk:K`, `block:B:BUDGET[:SCORE]` or `streaming:S:W` (also `sink+window:S:W`). Policies are per kv head because the
KV cache is per kv head: the query heads of one group share its keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnsparse.decode.policies import POLICIES, HeadPolicy, policy_from_dict
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


def plan_from_profile(
    profile: ProfileView,
    retrieval: HeadPolicy | str = "block:16:0.0625",
    streaming: HeadPolicy | str = "streaming:4:1024",
) -> DecodePlan:
    """A plan from a `measure` profile: a kv head is streaming when every query head of its group is streaming.

    Eviction is per kv head (its query heads share the cached keys), so one retrieval query head keeps the group full.
    """
    retrieval = parse_head_policy(retrieval) if isinstance(retrieval, str) else retrieval
    streaming = parse_head_policy(streaming) if isinstance(streaming, str) else streaming
    layers, heads, kv_heads = profile.layers, profile.heads, profile.kv_heads
    if kv_heads < 1 or heads % kv_heads:
        raise AttnsparseError(f"profile has {heads} heads and {kv_heads} kv heads; heads must be a multiple")
    if len(profile.per_head) != layers * heads:
        raise AttnsparseError(f"profile lists {len(profile.per_head)} heads, expected {layers} x {heads}")
    groups = heads // kv_heads
    is_streaming = [[True] * kv_heads for _ in range(layers)]
    for entry in profile.per_head:
        if not (0 <= entry.layer < layers and 0 <= entry.head < heads):
            raise AttnsparseError(f"profile lists layer {entry.layer} head {entry.head}, outside its {layers} layers "
                                  f"x {heads} heads; pass the profile.json written by `attnsparse measure`")
        if not entry.streaming:
            is_streaming[entry.layer][entry.head // groups] = False
    return DecodePlan(
        [[streaming if flag else retrieval for flag in row] for row in is_streaming],
        profile.model,
        {"source": "profile", "retrieval": retrieval.spec, "streaming": streaming.spec},
    )


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

