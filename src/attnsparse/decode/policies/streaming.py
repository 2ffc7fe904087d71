"""`streaming:S:W` (DuoAttention-style, Xiao et al. 2024): only the first S and the last W tokens are held.

Older entries are overwritten, so memory stays S + W tokens however long the context grows. The prefill name of
the same rule, `sink+window:S:W`, is accepted too.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnsparse.decode.policies.base import HeadPolicy, register_policy
from attnsparse.decode.stores import StreamStore
from attnsparse.errors import AttnsparseError
from attnsparse.specs import ParsedSpec, expect_fields


@register_policy("streaming", "streaming:S:W", "only the first S and the last W tokens are held (also sink+window:S:W)",
                 aliases=("sink+window",))
@dataclass(frozen=True)
class StreamingPolicy(HeadPolicy):
    sink: int = 4
    window: int = 1024

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 1:
            raise AttnsparseError(f"streaming needs sink >= 0 and window >= 1, got {self.sink}:{self.window}")

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> StreamingPolicy:
        expect_fields(spec, 2)
        return cls(int(spec.args[0]), int(spec.args[1]))

    @property
    def spec(self) -> str:
        return f"streaming:{self.sink}:{self.window}"

    def store(self, heads: list[int]) -> StreamStore:
        return StreamStore(self, heads)
