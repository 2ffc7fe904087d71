"""passkey: a five-digit number hidden at a depth in fixed filler text, asked for at the end.

The test of Mohtashami & Jaggi (2023, "Landmark Attention"), used by Quest and DuoAttention to check that a sparse
KV cache still reaches far back. The filler is always the same sentence block (not a haystack text), so raw
prompts are token for token the ones `attnsparse.evaluate.passkey` has always used.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from attnsparse.evaluate.tasks.base import TASKS, Piece, Prompter, Sample, build_prompt, check_depth
from attnsparse.evaluate.tasks.scoring import first_is, numbers
from attnsparse.specs import ParsedSpec, expect_fields

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
ASK, ANSWER_PREFIX = "What is the pass key?", "The pass key is"
ANSWER_TOKENS = 8


def _repeat(unit: list[int]) -> Iterator[list[int]]:
    while True:
        yield unit


def passkey_ids(prompter: Prompter, length: int, depth: float, key: int) -> Sample:
    """The passkey prompt of `length` tokens with the needle after `depth` of the filler, on a sentence edge."""
    ids, needles = build_prompt(
        prompter, "passkey", length, INTRO, ASK, ANSWER_PREFIX, _repeat(prompter.ids(FILLER)),
        [Piece(NEEDLE.format(key=key), check_depth(depth), (str(key),))],
    )
    return Sample("passkey", length, depth, 0, ids, (str(key),), needles, ANSWER_TOKENS)


def passkey_prompt(tokenizer: PreTrainedTokenizerBase, length: int, depth: float, key: int) -> torch.Tensor:
    """Token ids (length,) of the raw passkey prompt (0 = needle at the start of the filler, 1 = at the end)."""
    return passkey_ids(Prompter(tokenizer), length, depth, key).ids


@TASKS.register("passkey", "passkey", "a 5-digit pass key in fixed filler text; correct = the first number read back")
@dataclass(frozen=True)
class Passkey:
    retrieval = True
    uses_depth = True

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> Passkey:
        expect_fields(spec, 0)
        return cls()

    @property
    def spec(self) -> str:
        return "passkey"

    def sample(self, prompter: Prompter, length: int, depth: float | None, trial: int, rng: random.Random) -> Sample:
        sample = passkey_ids(prompter, length, check_depth(depth), rng.randint(10000, 99999))
        return Sample(sample.task, length, depth, trial, sample.ids, sample.answers, sample.needles, ANSWER_TOKENS)

    def correct(self, output: str, answers: Sequence[str]) -> bool:
        return first_is(numbers(output), answers)
