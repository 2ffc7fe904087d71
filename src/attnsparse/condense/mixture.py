"""A training mixture that exercises what condensation must not lose: in-context retrieval and copying.

Sparse-aware training on natural text alone kept WikiText perplexity and lost in-context copying (passkey 0/20).
`mix_synthetic` interleaves the training text with short synthetic documents whose haystack is that same text:
retrieval documents (1–4 facts `the <attribute> of <word> is <number>` hidden among its sentences, then one asked
and answered) and copy documents (a word list repeated after some text). Under distillation the student learns to
keep the teacher's copying on them. The phrasings are fixed here and differ from every evaluation task's template
(evaluate/tasks; a test checks it), so no model is tested on its training template.
"""

from __future__ import annotations

import random
import re

from attnsparse.errors import AttnsparseError

ATTRIBUTES = ("the locker code for {name}", "the room number of {name}", "the account id of {name}",
              "the ticket of {name}")


def mix_synthetic(text: str, share: float, seed: int = 0) -> str:
    """`text` with synthetic documents inserted between its lines until they are about `share` of the characters."""
    if not 0.0 <= share < 1.0:
        raise AttnsparseError(f"--synthetic {share} must be a share in [0, 1)")
    if share == 0.0:
        return text
    rng = random.Random(seed)
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 5 and "\n" not in s.strip()]
    words = sorted({w for w in re.findall(r"[A-Za-z]{5,10}", text)})
    if len(sentences) < 100 or len(words) < 40:
        raise AttnsparseError("the training text is too short for --synthetic (needs at least 100 sentences of prose)")
    lines, out, synthetic, natural = text.split("\n"), [], 0, 0
    for line in lines:
        out.append(line)
        natural += len(line) + 1
        while synthetic < natural * share / (1.0 - share):
            document = _retrieval(rng, sentences, words) if rng.random() < 0.75 else _copy(rng, sentences, words)
            out.append(document)
            synthetic += len(document) + 1
    return "\n".join(out)


def _sentences(rng: random.Random, sentences: list[str], count: int) -> list[str]:
    """`count` consecutive sentences of the training text (a natural haystack)."""
    start = rng.randrange(len(sentences) - count)
    return sentences[start:start + count]


def _retrieval(rng: random.Random, sentences: list[str], words: list[str]) -> str:
    haystack = _sentences(rng, sentences, rng.randint(8, 40))
    attribute = rng.choice(ATTRIBUTES)
    names = rng.sample(words, rng.randint(1, 4))
    values = [str(rng.randint(10 ** (d - 1), 10 ** d - 1)) for d in (rng.randint(4, 8) for _ in names)]
    for name, value in zip(names, values):
        haystack.insert(rng.randrange(len(haystack) + 1), f"Note that {attribute.format(name=name)} is {value}.")
    asked = rng.randrange(len(names))
    fact = attribute.format(name=names[asked])
    return " ".join(haystack) + f"\nQuestion: what is {fact}? Answer: {fact} is {values[asked]}."


def _copy(rng: random.Random, sentences: list[str], words: list[str]) -> str:
    items = ", ".join(rng.sample(words, rng.randint(8, 30)))
    return f"List: {items}.\n" + " ".join(_sentences(rng, sentences, rng.randint(4, 20))) + f"\nThe list again: {items}."
