"""Needle-in-a-haystack with several needles (RULER's NIAH multi-key and multi-value), in local text.

Needles read `One of the special magic numbers for <key> is: <value>.`, keys are adjective-noun pairs and values
7-digit numbers. niah-multikey hides several keys, each with its value, and asks for one; niah-multivalue hides
one key with several values and asks for all of them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from attnsparse.evaluate.tasks.base import (
    TASKS,
    Piece,
    Prompter,
    Sample,
    build_prompt,
    check_depth,
    default_answer_tokens,
)
from attnsparse.evaluate.tasks.scoring import all_present, first_is, numbers
from attnsparse.specs import ParsedSpec, expect_fields

INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
         "I will quiz you about the numbers afterwards.\n")
NEEDLE = "\nOne of the special magic numbers for {key} is: {value}.\n"
ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lively", "misty", "noble", "olive", "proud", "quiet", "rapid", "silent", "tidy", "urban", "vivid",
              "wild", "young", "zesty", "bold", "crisp", "dark", "early", "fuzzy")
NOUNS = ("anchor", "badger", "canyon", "dolphin", "ember", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "river", "saddle", "tunnel",
         "valley", "willow", "yarrow", "zephyr", "basket", "candle", "desert", "forest", "glacier", "hammer")


def distinct_keys(rng: random.Random, count: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < count:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in keys:
            keys.append(key)
    return keys


def distinct_values(rng: random.Random, count: int) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        value = str(rng.randint(1_000_000, 9_999_999))
        if value not in values:
            values.append(value)
    return values


def _count(spec: ParsedSpec, field: str, default: int, low: int) -> int:
    expect_fields(spec, 0, (field,))
    value = int(spec.kwargs.get(field, default))
    if not low <= value <= 64:
        raise ValueError(f"{field} must be in [{low}, 64], got {value}")
    return value


@TASKS.register("niah-multikey", "niah-multikey[:keys=K]",
                "K needles (default 4) `key -> 7-digit value` in the haystack, one key asked; correct = its value first")
@dataclass(frozen=True)
class MultiKey:
    keys: int = 4
    retrieval = True
    uses_depth = True

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> MultiKey:
        return cls(_count(spec, "keys", 4, 1))

    @property
    def spec(self) -> str:
        return "niah-multikey" if self.keys == 4 else f"niah-multikey:keys={self.keys}"

    def sample(self, prompter: Prompter, length: int, depth: float | None, trial: int, rng: random.Random) -> Sample:
        keys, values = distinct_keys(rng, self.keys), distinct_values(rng, self.keys)
        depths = [check_depth(depth)] + [rng.random() for _ in keys[1:]]
        pieces = [Piece(NEEDLE.format(key=k, value=v), d, (v,) if i == 0 else ())
                  for i, (k, v, d) in enumerate(zip(keys, values, depths, strict=True))]
        question = f"\nWhat is the special magic number for {keys[0]} mentioned in the provided text?"
        prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"
        ids, needles = build_prompt(prompter, self.spec, length, INTRO, question, prefix,
                                    prompter.haystack.units(rng), pieces)
        answers = (values[0],)
        return Sample(self.spec, length, depth, trial, ids, answers, needles, default_answer_tokens(prompter, answers))

    def correct(self, output: str, answers: Sequence[str]) -> bool:
        return first_is(numbers(output), answers)


@TASKS.register("niah-multivalue", "niah-multivalue[:values=V]",
                "one key with V values (default 4) in the haystack; correct = every value returned")
@dataclass(frozen=True)
class MultiValue:
    values: int = 4
    retrieval = True
    uses_depth = True

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> MultiValue:
        return cls(_count(spec, "values", 4, 1))

    @property
    def spec(self) -> str:
        return "niah-multivalue" if self.values == 4 else f"niah-multivalue:values={self.values}"

    def sample(self, prompter: Prompter, length: int, depth: float | None, trial: int, rng: random.Random) -> Sample:
        key, values = distinct_keys(rng, 1)[0], distinct_values(rng, self.values)
        depths = [check_depth(depth)] + [rng.random() for _ in values[1:]]
        pieces = [Piece(NEEDLE.format(key=key, value=v), d, (v,)) for v, d in zip(values, depths, strict=True)]
        question = f"\nWhat are all the special magic numbers for {key} mentioned in the provided text?"
        prefix = f"The special magic numbers for {key} mentioned in the provided text are"
        ids, needles = build_prompt(prompter, self.spec, length, INTRO, question, prefix,
                                    prompter.haystack.units(rng), pieces)
        answers = tuple(values)
        return Sample(self.spec, length, depth, trial, ids, answers, needles, default_answer_tokens(prompter, answers))

    def correct(self, output: str, answers: Sequence[str]) -> bool:
        return all_present(numbers(output), answers)
