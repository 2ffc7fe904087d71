"""Per-head decoding plans: which KV policy each (layer, kv head) uses while generating, saved as JSON.

A plan assigns every key/value head one of four policies (see docs/decode.md):

- `dense`: full KV, exact attention over every key;
- `topk:K`: full KV, exact scores, each query head keeps its K largest (a reference, it still reads every key);
- `block:B:BUDGET[:SCORE]` (Quest-style, Tang et al. 2024): keys in blocks of B tokens; each step keeps the
  blocks with the highest score, BUDGET tokens in all (or a density). SCORE: `mean` (q . mean key, the default),
  `bound` (Quest's min/max upper bound of q.k) or `channelsR` (every key scored on the R channels where the query
  is largest, SparQ-style, from a float16 channel-major key copy; block = max over its keys);
- `streaming:S:W` (DuoAttention-style, Xiao et al. 2024): only the first S and the last W tokens are held,
  older entries are evicted and freed.

Policies are per kv head because the KV cache is per kv head: the query heads of one group share its keys.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnsparse.errors import AttnsparseError

if TYPE_CHECKING:
    from attnsparse.measure.profile import ProfileView

PLAN_FORMAT = "attnsparse-decode-plan"
PLAN_VERSION = 1
KINDS = ("dense", "topk", "block", "streaming")
SCORES = ("mean", "bound", "channels")
SPEC_HELP = (
    "use dense, topk:K, block:B:BUDGET[:mean|bound|channelsR] (B tokens per block, BUDGET tokens kept, or a density such as "
    "0.0625), "
    "streaming:S:W, or a plan JSON file"
)


@dataclass(frozen=True)
class HeadPolicy:
    """How one kv head is cached and attended during decoding."""

    kind: str = "dense"
    k: int = 0  # topk
    block_size: int = 16  # block
    budget: int = 0  # block: tokens kept per step (0: use density)
    density: float = 0.0  # block: fraction of the context kept per step (used when budget == 0)
    sink_blocks: int = 1  # block: first blocks always kept
    recent_blocks: int = 2  # block: last blocks (including the one being filled) always kept
    score: str = "mean"  # block: rank blocks by q . mean key ("mean"), Quest's min/max bound ("bound"), or "channels"
    channels: int = 16  # block with score "channels": query channels each key is scored on
    sink: int = 4  # streaming: first tokens held
    window: int = 1024  # streaming: last tokens held

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AttnsparseError(f"unknown decode policy '{self.kind}'; {SPEC_HELP}")
        if self.kind == "topk" and self.k < 1:
            raise AttnsparseError(f"topk needs k >= 1, got {self.k}")
        if self.kind == "block":
            if self.block_size < 1:
                raise AttnsparseError(f"block size must be >= 1, got {self.block_size}")
            if self.budget < 0 or not 0.0 <= self.density <= 1.0 or (self.budget == 0 and self.density <= 0.0):
                raise AttnsparseError("block policy needs a token budget >= 1 or a density in (0, 1]")
            if self.sink_blocks < 0 or self.recent_blocks < 1:
                raise AttnsparseError("block policy needs sink_blocks >= 0 and recent_blocks >= 1")
            if self.score not in SCORES:
                raise AttnsparseError(f"block score must be mean, bound or channelsR, got '{self.score}'")
            if self.channels < 1:
                raise AttnsparseError(f"block score channels needs R >= 1 channels, got {self.channels}")
        if self.kind == "streaming" and (self.sink < 0 or self.window < 1):
            raise AttnsparseError(f"streaming needs sink >= 0 and window >= 1, got {self.sink}:{self.window}")

    @property
    def spec(self) -> str:
        if self.kind == "topk":
            return f"topk:{self.k}"
        if self.kind == "block":
            extra = {"mean": "", "bound": ":bound", "channels": f":channels{self.channels}"}[self.score]
            return f"block:{self.block_size}:{self.budget if self.budget else self.density}{extra}"
        if self.kind == "streaming":
            return f"streaming:{self.sink}:{self.window}"
        return "dense"

    @property
    def group_key(self) -> tuple[Any, ...]:
        """Heads with equal keys share one store and one batched kernel call."""
        return tuple(asdict(self).values())

    def selected_blocks(self, n: int) -> int:
        """Blocks a block policy attends to at context n (at least sink + recent, at most all)."""
        total = math.ceil(n / self.block_size)
        tokens = self.budget if self.budget else math.ceil(self.density * n)
        wanted = max(math.ceil(tokens / self.block_size), self.sink_blocks + self.recent_blocks)
        return min(total, wanted)

    def to_dict(self) -> dict[str, Any]:
        keep = {"dense": (), "topk": ("k",), "streaming": ("sink", "window"),
                "block": ("block_size", "budget", "density", "sink_blocks", "recent_blocks", "score")}[self.kind]
        if self.kind == "block" and self.score == "channels":
            keep += ("channels",)
        return {"policy": self.kind} | {name: getattr(self, name) for name in keep}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadPolicy:
        if not isinstance(data, dict) or "policy" not in data:
            raise AttnsparseError(f"plan entry {data!r} needs a 'policy' field; {SPEC_HELP}")
        fields = {key: value for key, value in data.items() if key not in ("policy", "layer", "kv_head")}
        unknown = set(fields) - set(cls.__dataclass_fields__) - {"kind"}
        if unknown:
            raise AttnsparseError(f"plan entry {data!r} has unknown fields {sorted(unknown)}")
        try:
            return cls(kind=str(data["policy"]), **fields)
        except TypeError as error:
            raise AttnsparseError(f"bad plan entry {data!r}: {error}") from error


def parse_head_policy(spec: str) -> HeadPolicy:
    """Parse `dense`, `topk:K`, `block:B:BUDGET` (BUDGET an int of tokens or a float density) or `streaming:S:W`."""
    name, *parts = spec.strip().lower().split(":")
    try:
        if name == "dense" and not parts:
            return HeadPolicy("dense")
        if name == "topk" and len(parts) == 1:
            return HeadPolicy("topk", k=int(parts[0]))
        if name == "block" and len(parts) in (2, 3):
            size = int(parts[0])
            score, channels = parts[2] if len(parts) == 3 else "mean", 16
            if score.startswith("channels") and score != "channels":
                score, channels = "channels", int(score.removeprefix("channels"))
            if "." in parts[1]:
                return HeadPolicy("block", block_size=size, density=float(parts[1]), score=score, channels=channels)
            return HeadPolicy("block", block_size=size, budget=int(parts[1]), score=score, channels=channels)
        if name == "streaming" and len(parts) == 2:
            return HeadPolicy("streaming", sink=int(parts[0]), window=int(parts[1]))
    except ValueError:
        pass
    raise AttnsparseError(f"cannot parse decode policy '{spec}'; {SPEC_HELP}")


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
        default = HeadPolicy.from_dict(data.get("default", {"policy": "dense"}))
        heads = [[default] * kv_heads for _ in range(layers)]
        for entry in data.get("heads", []):
            try:
                layer, kv = int(entry["layer"]), int(entry["kv_head"])
            except (KeyError, TypeError, ValueError) as error:
                raise AttnsparseError(f"plan entry {entry!r} needs integer 'layer' and 'kv_head'") from error
            if not (0 <= layer < layers and 0 <= kv < kv_heads):
                raise AttnsparseError(f"plan entry {entry!r} is outside {layers} layers x {kv_heads} kv heads")
            heads[layer][kv] = HeadPolicy.from_dict(entry)
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

