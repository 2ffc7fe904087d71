"""What a decode policy is, and the registry of decode policies (one file each in this package).

A decode policy says how one kv head is cached and attended while generating: which store holds its keys and
values (`store`), and, for a store of every token, the rule a decode step attends by (`attend`) and the bytes that
step reads (`bytes_read`). A policy is a frozen dataclass of its own parameters only; its spec and its plan-JSON
entry (`{"policy": name, field: value, ...}`) round-trip. Adding a policy is one file that registers it here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from attnsparse.errors import AttnsparseError
from attnsparse.specs import Registry

if TYPE_CHECKING:
    from attnsparse.decode.stores import Store

POLICIES: Registry[HeadPolicy] = Registry("decode policy", extra_help=", or a plan JSON file")
POLICY_TYPES: dict[str, type[HeadPolicy]] = {}


def register_policy(name: str, usage: str, help: str, aliases: Iterable[str] = ()) -> Callable[[type], type]:
    """Class decorator: the policy is parsed from specs named `name` (or an alias) and from plan entries."""

    def add(cls: type) -> type:
        cls.kind = name  # type: ignore[attr-defined]
        POLICIES.register(name, usage, help, aliases)(cls)
        POLICY_TYPES[name] = cls
        return cls

    return add


class HeadPolicy:
    """Base of every decode policy: how one kv head is cached and attended during decoding."""

    kind: ClassVar[str]

    @property
    def spec(self) -> str:
        """The canonical spec, which parses back to an equal policy."""
        raise NotImplementedError

    def store(self, heads: list[int]) -> Store:
        """An empty store for the kv heads `heads` of one layer, all under this policy."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """Plan-JSON entry: `policy` then every field, in declaration order."""
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        return {"policy": self.kind} | {field.name: getattr(self, field.name) for field in fields}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> HeadPolicy:
        """The policy of a plan entry's fields (without `policy`); fields left out take their defaults."""
        unknown = set(fields) - {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise AttnsparseError(f"unknown fields {sorted(unknown)} for policy '{cls.kind}'")
        return cls(**fields)


def policy_from_dict(data: Any) -> HeadPolicy:
    """A plan entry (`{"policy": "block", "block_size": 16, ...}`, maybe with `layer` and `kv_head`) as a policy."""
    if not isinstance(data, dict) or "policy" not in data:
        raise AttnsparseError(f"plan entry {data!r} needs a 'policy' field; {POLICIES.usage()}")
    cls = POLICY_TYPES.get(str(data["policy"]))
    if cls is None:
        raise AttnsparseError(f"unknown decode policy '{data['policy']}' in plan entry {data!r}; {POLICIES.usage()}")
    fields = {key: value for key, value in data.items() if key not in ("policy", "layer", "kv_head")}
    try:
        return cls.from_dict(fields)
    except AttnsparseError as error:
        raise AttnsparseError(f"plan entry {data!r}: {error}") from None
    except (TypeError, ValueError) as error:
        raise AttnsparseError(f"bad plan entry {data!r}: {error}") from None
