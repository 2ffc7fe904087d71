"""One spec grammar for every method the user names on the command line, and registries of those methods.

A spec is `name` followed by `:`-separated fields; a field is positional (`topk:16`, `block:16:0.0625:channels32`)
or a keyword (`tail:k=16`, `adaptive:alpha=2,C=0.5` — keywords may also be separated by `,`). Each method is a
frozen dataclass registered by name in its role's `Registry` (attention policies, decode policies, block scorers,
losses); the registry parses a spec into an instance, renders it back (`instance.spec`), and lists every method with
its help text, so error messages always name what exists (tests/test_cli_help.py checks that every command's `--help` does too). Adding a method touches its own file only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from attnsparse.errors import AttnsparseError


@dataclass(frozen=True)
class ParsedSpec:
    """A spec split into its name, positional fields and keyword fields (all still text)."""

    text: str
    name: str
    args: tuple[str, ...] = ()
    kwargs: dict[str, str] = field(default_factory=dict)


def parse_spec(text: str) -> ParsedSpec:
    """Split `name:a:b` / `name:k=v,k2=v2` (either separator between keywords); names are lower-cased."""
    raw = text.strip()
    name, _, rest = raw.partition(":")
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(":"))) if rest else ():
        pieces = [p.strip() for p in part.split(",")] if "=" in part else [part]
        for piece in filter(None, pieces):
            key, eq, value = piece.partition("=")
            if eq:
                if kwargs.get(key.strip()) is not None:
                    raise AttnsparseError(f"spec '{text}' gives '{key.strip()}' twice")
                kwargs[key.strip()] = value.strip()
            elif kwargs:
                raise AttnsparseError(f"spec '{text}': positional field '{piece}' after keyword fields")
            else:
                args.append(piece)
    if not name.strip():
        raise AttnsparseError(f"empty spec '{text}'")
    return ParsedSpec(raw, name.strip().lower(), tuple(args), kwargs)


def split_list(text: str, what: str, convert: Callable[[str], Any] = str) -> list[Any]:
    """Items of a comma-separated option (`dense,topk:8` / `1024,2048`), converted; one-line error naming `what`."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise AttnsparseError(f"empty {what} list '{text}'")
    try:
        return [convert(item) for item in items]
    except ValueError as error:
        raise AttnsparseError(f"bad {what} list '{text}': {error}") from None


def split_specs(text: str) -> list[str]:
    """Comma-separated specs whose keyword fields may themselves use commas (`tail:k=8,topk:16` is two specs)."""
    items: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if items and "=" in part and ":" not in part.split("=", 1)[0]:
            items[-1] = f"{items[-1]},{part}"  # `C=0.5` continues the previous spec's keywords
        else:
            items.append(part)
    return items


class Method(Protocol):
    """What a registered method provides: construction from a parsed spec and its canonical spec text."""

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> Any: ...

    @property
    def spec(self) -> str: ...


M = TypeVar("M")


@dataclass(frozen=True)
class Entry(Generic[M]):
    name: str
    factory: Callable[[ParsedSpec], M]
    usage: str
    help: str


class Registry(Generic[M]):
    """Methods of one role, by name (with aliases); parses specs into instances and lists usage for errors."""

    def __init__(self, role: str, extra_help: str = "") -> None:
        self.role = role
        self.extra_help = extra_help
        self._entries: dict[str, Entry[M]] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, usage: str, help: str, aliases: Iterable[str] = ()) -> Callable[[type], type]:
        """Class decorator: `cls.from_spec(parsed)` builds an instance from a spec named `name` (or an alias)."""

        def add(cls: type) -> type:
            self.add(name, cls.from_spec, usage, help, aliases)  # type: ignore[attr-defined]
            return cls

        return add

    def add(self, name: str, factory: Callable[[ParsedSpec], M], usage: str, help: str,
            aliases: Iterable[str] = ()) -> None:
        if name in self._entries or name in self._aliases:
            raise ValueError(f"{self.role} '{name}' is registered twice")
        self._entries[name] = Entry(name, factory, usage, help)
        for alias in aliases:
            self._aliases[alias] = name

    def names(self) -> list[str]:
        return list(self._entries)

    def usage(self) -> str:
        """`use dense, topk:K or ...` — every method's usage, for error messages."""
        usages = [entry.usage for entry in self._entries.values()]
        text = usages[0] if len(usages) == 1 else ", ".join(usages[:-1]) + " or " + usages[-1]
        return f"use {text}" + (f"{self.extra_help}" if self.extra_help else "")

    def help_table(self) -> list[tuple[str, str]]:
        """(usage, help) for every method, in registration order (for --help and docs)."""
        return [(entry.usage, entry.help) for entry in self._entries.values()]

    def parse(self, text: str) -> M:
        """An instance from its spec; a one-line error naming the spec and every valid form otherwise."""
        if not text.strip():
            raise AttnsparseError(f"empty {self.role} spec; {self.usage()}")
        parsed = parse_spec(text)
        name = self._aliases.get(parsed.name, parsed.name)
        entry = self._entries.get(name)
        if entry is None:
            raise AttnsparseError(f"unknown {self.role} '{text}'; {self.usage()}")
        try:
            return entry.factory(ParsedSpec(parsed.text, name, parsed.args, parsed.kwargs))
        except AttnsparseError as error:
            raise AttnsparseError(f"{self.role} '{text}': {error}; {self.usage()}") from None
        except (ValueError, TypeError):
            raise AttnsparseError(f"cannot parse {self.role} '{text}'; {self.usage()}") from None


def expect_fields(spec: ParsedSpec, positional: int | tuple[int, ...], keywords: Iterable[str] = ()) -> None:
    """Refuse a spec with the wrong number of positional fields or unknown keywords (ValueError → usage)."""
    counts = (positional,) if isinstance(positional, int) else positional
    if len(spec.args) not in counts:
        raise ValueError(f"{spec.name} takes {counts} positional fields, got {len(spec.args)}")
    unknown = set(spec.kwargs) - set(keywords)
    if unknown:
        raise AttnsparseError(f"unknown field(s) {', '.join(sorted(unknown))}")
