"""common-words (RULER's CWE, the aggregation case): a numbered list of words; return the most frequent ones.

No single position holds the answer: each common word appears `common` times scattered over the list, every
other word `rare` times, so the answer needs counting over the whole context (where top-k selection fails,
MagicPIG). The words are distinct plain words (4-10 letters) of the haystack text.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from attnsparse.errors import AttnsparseError
from attnsparse.evaluate.tasks.base import TASKS, Prompter, Sample, build_prompt, default_answer_tokens
from attnsparse.evaluate.tasks.scoring import all_present
from attnsparse.evaluate.tasks.scoring import words as extract_words
from attnsparse.specs import ParsedSpec, expect_fields

INTRO = ("Below is a numbered list of words. Some of the words appear more often than the others. "
         "Memorize the ones that appear most often.\n")


@TASKS.register("common-words", "common-words[:words=K,common=C,rare=R]",
                "a numbered word list, K words (default 5) appear C times (10), the rest R times (2); "
                "correct = all K returned")
@dataclass(frozen=True)
class CommonWords:
    words: int = 5
    common: int = 10
    rare: int = 2
    retrieval = False
    uses_depth = False

    @classmethod
    def from_spec(cls, spec: ParsedSpec) -> CommonWords:
        expect_fields(spec, 0, ("words", "common", "rare"))
        words, common, rare = (int(spec.kwargs.get(k, d)) for k, d in (("words", 5), ("common", 10), ("rare", 2)))
        if not (1 <= words <= 50 and 1 <= rare < common):
            raise ValueError(f"need 1 <= words <= 50 and 1 <= rare < common, got {words}, {common}, {rare}")
        return cls(words, common, rare)

    @property
    def spec(self) -> str:
        fields = [f"{k}={v}" for k, v, d in (("words", self.words, 5), ("common", self.common, 10),
                                             ("rare", self.rare, 2)) if v != d]
        return "common-words:" + ",".join(fields) if fields else "common-words"

    def sample(self, prompter: Prompter, length: int, depth: float | None, trial: int, rng: random.Random) -> Sample:
        vocabulary = list(prompter.haystack.words)
        rng.shuffle(vocabulary)
        common, rare = vocabulary[: self.words], vocabulary[self.words :]
        question = f"\nWhich {self.words} words appear most often in the list above?"
        prefix = f"The {self.words} words that appear most often in the list above are:"
        head, tail = prompter.frame(INTRO, question, prefix)
        room = length - len(head) - len(tail)
        # entries are `\n<i>.` + ` <word>`, tokenized apart, so the length of a list does not depend on its order
        word_ids = {w: prompter.ids(f" {w}") for w in common}
        entries = self.words * self.common
        used = sum(len(word_ids[w]) for w in common) * self.common + sum(
            len(prompter.ids(f"\n{i}.")) for i in range(1, entries + 1))
        chosen = 0
        while chosen < len(rare):
            word = rare[chosen]
            word_ids[word] = prompter.ids(f" {word}")
            more = self.rare * len(word_ids[word]) + sum(
                len(prompter.ids(f"\n{i}.")) for i in range(entries + 1, entries + self.rare + 1))
            if used + more > room:
                break
            used, entries, chosen = used + more, entries + self.rare, chosen + 1
        else:
            raise AttnsparseError(f"common-words: the haystack has only {len(vocabulary)} distinct words, too few "
                                  f"for {length} tokens; use a longer haystack text")
        if used > room:
            raise AttnsparseError(f"common-words length {length} is too short; use at least {length - room + used}")
        listed = common * self.common + rare[:chosen] * self.rare
        rng.shuffle(listed)
        units = [prompter.ids(f"\n{i}.") + word_ids[w] for i, w in enumerate(listed, 1)]
        pad = [t for unit in _take(prompter.haystack.units(rng), 64) for t in unit]
        ids, _ = build_prompt(prompter, self.spec, length, INTRO, question, prefix, iter(units), pad_source=pad)
        answers = tuple(common)
        return Sample(self.spec, length, None, trial, ids, answers, (), default_answer_tokens(prompter, answers))

    def correct(self, output: str, answers: Sequence[str]) -> bool:
        return all_present(extract_words(output), answers)


def _take(units: Iterator[list[int]], tokens: int) -> list[list[int]]:
    """Units from an iterator until they hold at least `tokens` tokens."""
    taken: list[list[int]] = []
    for unit in units:
        taken.append(unit)
        if sum(map(len, taken)) >= tokens:
            break
    return taken
