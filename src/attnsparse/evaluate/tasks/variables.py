"""variable-tracking (RULER): chains of `VAR X = Y` assignments in the haystack; return every name bound to a value.

A chain starts `VAR ABCDE = 12345.` and each hop binds a new name to the previous one (`VAR FGHIJ = ABCDE.`);
the asked value's chain is followed by every name in it. Extra chains bind other values (distractors).
"""

from __future__ import annotations

import random
import string
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
from attnsparse.evaluate.tasks.scoring import all_present, names
from attnsparse.specs import ParsedSpec, expect_fields

INTRO = "Memorize and track the chains of variable assignments hidden in the following text.\n"
STATEMENT = "\nVAR {name} = {source}.\n"


def random_names(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    return names


@TASKS.register("variable-tracking", "variable-tracking[:hops=H,chains=C]",
                "C chains (default 1) of H hops (default 4) of `VAR X = Y`; correct = every name bound to the value")
@dataclass(frozen=True)
class VariableTracking:
    hops: int = 4
    chains: int = 1
    retrieval = True
    uses_depth = True

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> VariableTracking:
        expect_fields(spec, 0, ("hops", "chains"))
        hops, chains = int(spec.kwargs.get("hops", 4)), int(spec.kwargs.get("chains", 1))
        if not (1 <= hops <= 32 and 1 <= chains <= 16):
            raise ValueError(f"need 1 <= hops <= 32 and 1 <= chains <= 16, got {hops}, {chains}")
        return cls(hops, chains)

    @property
    def spec(self) -> str:
        fields = [f"hops={self.hops}"] * (self.hops != 4) + [f"chains={self.chains}"] * (self.chains != 1)
        return ":".join(["variable-tracking", ",".join(fields)]) if fields else "variable-tracking"

    def sample(self, prompter: Prompter, length: int, depth: float | None, trial: int, rng: random.Random) -> Sample:
        start = check_depth(depth)
        names = random_names(rng, self.chains * (self.hops + 1))
        values: list[str] = []
        while len(values) < self.chains:
            value = str(rng.randint(10000, 99999))
            values += [value] * (value not in values)
        pieces: list[Piece] = []
        for chain in range(self.chains):
            chain_names = names[chain * (self.hops + 1) : (chain + 1) * (self.hops + 1)]
            if chain == 0:  # the asked chain starts at the depth; its hops follow later in the text
                depths = [start] + sorted(rng.uniform(start, 1.0) for _ in range(self.hops))
            else:
                depths = sorted(rng.random() for _ in range(self.hops + 1))
            sources = [values[chain], *chain_names[:-1]]
            for name, source, at in zip(chain_names, sources, depths, strict=True):
                answers = (name, source) if chain == 0 and source != values[0] else (name,) if chain == 0 else ()
                pieces.append(Piece(STATEMENT.format(name=name, source=source), at, answers))
        question = (f"\nFind every variable that is assigned the value {values[0]}, directly or through other "
                    "variables, in the text above.")
        prefix = f"The variables that are assigned the value {values[0]} are:"
        ids, needles = build_prompt(prompter, self.spec, length, INTRO, question, prefix,
                                    prompter.haystack.units(rng), pieces)
        answers = tuple(names[: self.hops + 1])
        return Sample(self.spec, length, depth, trial, ids, answers, needles, default_answer_tokens(prompter, answers))

    def correct(self, output: str, answers: Sequence[str]) -> bool:
        return all_present(names(output), answers)
