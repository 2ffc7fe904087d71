"""What every task generator shares: the sample record, the prompt frame (raw or chat template), haystacks of
local text, exact-length filling and needle placement by depth. The tasks themselves live beside this file."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from attnsparse.errors import AttnsparseError
from attnsparse.specs import Registry

CHAT_MARK = "\u2063ATTNSPARSE-USER-CONTENT\u2063"  # stands for the user message while the chat template is split


@dataclass(frozen=True)
class Needle:
    """Token positions, in the prompt, of one required answer's occurrences (what a retrieval head copies)."""

    answer: str
    spans: tuple[tuple[int, int], ...]  # [start, stop) token spans; the first is the occurrence counted as its length

    @property
    def length(self) -> int:
        return self.spans[0][1] - self.spans[0][0] if self.spans else 0


@dataclass(frozen=True)
class Sample:
    """One generated prompt, its required answers and where they sit in it."""

    task: str
    length: int
    depth: float | None  # None for tasks without a needle depth (common-words)
    trial: int
    ids: torch.Tensor  # (length,) long
    answers: tuple[str, ...]
    needles: tuple[Needle, ...]  # empty where the task copies nothing from the prompt (aggregation)
    answer_tokens: int  # greedy tokens generated for the answer


class Task(Protocol):
    """A registered generator: builds a sample for (length, depth, rng) and scores an answer text."""

    retrieval: bool  # answers are copied from needles, so retrieval scores are measured on it
    uses_depth: bool  # False: the prompt has no needle depth and is run once per length

    @property
    def spec(self) -> str: ...

    def sample(self, prompter: Prompter, length: int, depth: float | None, trial: int, rng: random.Random) -> Sample:
        ...

    def correct(self, output: str, answers: Sequence[str]) -> bool: ...


TASKS: Registry[Task] = Registry("task")


def parse_tasks(text: str | Sequence[str]) -> list[Task]:
    """`passkey,niah-multikey:keys=4,...` (or a list of specs) into tasks, de-duplicated by spec."""
    from attnsparse.specs import split_specs

    specs = split_specs(text) if isinstance(text, str) else list(text)
    if not specs:
        raise AttnsparseError(f"empty task list '{text}'; {TASKS.usage()}")
    unique: dict[str, Task] = {}
    for spec in specs:
        task = TASKS.parse(spec)
        unique.setdefault(task.spec, task)
    return list(unique.values())


def trial_rng(seed: int, task: str, length: int, depth: float | None, trial: int) -> random.Random:
    """The random stream of one cell: the same sample whatever other lengths, depths or tasks are run."""
    return random.Random(f"{seed}/{task}/{length}/{depth}/{trial}")


class Prompter:
    """What a generator needs from outside: the tokenizer, the prompt form and the haystack text.

    Raw form: `intro … question answer_prefix`, so a base model continues with the answer. Chat form: intro, body
    and question are the user message, and the answer prefix opens the assistant turn (the model continues it).
    The haystack (`load_text` spec: builtin, hf:..., or a file) is loaded on first use.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat: bool = False, haystack: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.haystack_spec = haystack
        self._haystack: Haystack | None = None
        self._short: dict[str, tuple[int, ...]] = {}
        self._head, self._tail = "", ""
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise AttnsparseError(
                    f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; run without "
                    "--chat-template (raw prompts)"
                )
            framed = str(tokenizer.apply_chat_template(
                [{"role": "user", "content": CHAT_MARK}], tokenize=False, add_generation_prompt=True))
            if framed.count(CHAT_MARK) != 1:
                raise AttnsparseError("the tokenizer's chat template does not show the user message once; use raw prompts")
            self._head, self._tail = framed.split(CHAT_MARK)

    @property
    def haystack(self) -> Haystack:
        if self._haystack is None:
            self._haystack = load_haystack(self.tokenizer, self.haystack_spec)
        return self._haystack

    @property
    def form(self) -> str:
        return "chat" if self.chat else "raw"

    def ids(self, text: str) -> list[int]:
        if len(text) <= 24 and text in self._short:  # list numbers and words are asked for again and again
            return list(self._short[text])
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(text) <= 24:
            self._short[text] = tuple(ids)
        return ids

    def ids_and_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        """Token ids and their character spans (None where the tokenizer cannot give them: slow tokenizers)."""
        try:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, ValueError, TypeError):
            return self.ids(text), None
        return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]

    def frame(self, intro: str, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
        """Token ids before the body (intro) and after it (question, answer prefix)."""
        if not self.chat:
            return self.ids(intro), self.ids(f"{question} {answer_prefix}")
        head = self.ids(self._head) if self._head else []
        return head + self.ids(intro), self.ids(question) + self.ids(self._tail + answer_prefix)


@dataclass
class Piece:
    """A needle's text placed at a depth of the body, with the answers whose token spans it holds."""

    text: str
    depth: float
    answers: tuple[str, ...] = ()


def check_depth(depth: float | None) -> float:
    if depth is None or not 0.0 <= depth <= 1.0:
        raise AttnsparseError(f"depth {depth} must be in [0, 1]")
    return float(depth)


def build_prompt(
    prompter: Prompter,
    task: str,
    length: int,
    intro: str,
    question: str,
    answer_prefix: str,
    units: Iterator[list[int]],
    pieces: Sequence[Piece] = (),
    pad_source: Sequence[int] = (),
) -> tuple[torch.Tensor, tuple[Needle, ...]]:
    """Exactly `length` tokens: head, a pad, body units with the pieces inserted at their depths, then the tail.

    Body units (filler sentences or list entries) are taken from `units` while they fit; a piece at depth d goes
    after round(d · units) of them (pieces at the same place keep their order). The tokens left over are filled
    with the start of the next unit (or of `pad_source` when `units` ends first), right after the head. Needle spans are the tokens that overlap an answer's
    characters in a piece.
    """
    head, tail = prompter.frame(intro, question, answer_prefix)
    encoded = [prompter.ids_and_offsets(piece.text) for piece in pieces]
    room = length - len(head) - len(tail) - sum(len(ids) for ids, _ in encoded)
    chosen: list[list[int]] = []
    used, following = 0, list(pad_source)
    for unit in units:
        if used + len(unit) > room:
            following = unit
            break
        chosen.append(unit)
        used += len(unit)
    if not chosen:
        raise AttnsparseError(f"{task} length {length} is too short; use at least {length - room + len(following)}")
    if room - used > len(following):
        raise AttnsparseError(f"{task}: the text runs out before {length} tokens; use a longer haystack")
    pad = following[: room - used]
    order = sorted(range(len(pieces)), key=lambda i: (round(pieces[i].depth * len(chosen)), i))
    at = {i: round(pieces[i].depth * len(chosen)) for i in order}
    ids = head + pad
    spans: dict[str, list[tuple[int, int]]] = {}
    cursor = 0
    for i in order:
        for unit in chosen[cursor : at[i]]:
            ids += unit
        cursor = at[i]
        piece_ids, offsets = encoded[i]
        start = len(ids)
        ids += piece_ids
        for answer in pieces[i].answers:
            spans.setdefault(answer, []).extend(_answer_spans(pieces[i].text, answer, offsets, start))
    for unit in chosen[cursor:]:
        ids += unit
    ids += tail
    needles = tuple(Needle(answer, tuple(found)) for answer, found in spans.items() if found)
    return torch.tensor(ids, dtype=torch.long), needles


def _answer_spans(text: str, answer: str, offsets: list[tuple[int, int]] | None, start: int) -> list[tuple[int, int]]:
    """Token spans (shifted by `start`) covering each whole-word occurrence of `answer` in a piece's text."""
    if offsets is None:
        return []
    found = []
    for match in re.finditer(rf"(?<![\w-]){re.escape(answer)}(?![\w-])", text):
        tokens = [t for t, (a, b) in enumerate(offsets) if a < match.end() and b > match.start() and b > a]
        if tokens:
            found.append((start + tokens[0], start + tokens[-1] + 1))
    return found


def default_answer_tokens(prompter: Prompter, answers: Sequence[str]) -> int:
    """Greedy tokens allowed for an answer: the answers written as a comma list, plus 4 + 2 per answer of slack."""
    return len(prompter.ids(" " + ", ".join(answers))) + 4 + 2 * len(answers)


# --- haystacks: sentences of any local text ---

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_PLAIN = re.compile(r"[A-Za-z ,;:'\"()\-.!?]+")


@dataclass(frozen=True)
class Haystack:
    """Sentences of a text as token ids (each with a leading space), and its distinct plain words."""

    spec: str
    sentences: tuple[tuple[int, ...], ...]
    words: tuple[str, ...]

    def units(self, rng: random.Random) -> Iterator[list[int]]:
        """Consecutive sentences from a random start, wrapping around the text as often as needed."""
        start = rng.randrange(len(self.sentences))
        index = start
        while True:
            yield list(self.sentences[index])
            index = (index + 1) % len(self.sentences)


_HAYSTACKS: dict[tuple[int, str], Haystack] = {}


def load_haystack(tokenizer: PreTrainedTokenizerBase, spec: str | None) -> Haystack:
    """Plain prose sentences (letters and punctuation, 4–80 words, no digits or `=`) of `spec` (see load_text).

    Digits and assignments are left out so that no haystack sentence looks like a needle or an answer.
    """
    from attnsparse.core.data import load_text

    key = (id(tokenizer), spec or "builtin")
    if key in _HAYSTACKS:
        return _HAYSTACKS[key]
    text = " ".join(load_text(spec).split())
    sentences = [s for s in _SENTENCE_END.split(text) if 4 <= len(s.split()) <= 80 and _PLAIN.fullmatch(s)]
    if len(sentences) < 8:
        raise AttnsparseError(
            f"haystack '{spec or 'builtin'}' has {len(sentences)} plain sentences (letters and punctuation, 4-80 "
            "words); pass a longer prose text"
        )
    ids = tokenizer([" " + s for s in sentences], add_special_tokens=False)["input_ids"]
    words = sorted({w for w in re.findall(r"[a-z]+", text.lower()) if 4 <= len(w) <= 10})
    haystack = Haystack(spec or "builtin", tuple(tuple(i) for i in ids), tuple(words))
    if len(_HAYSTACKS) > 8:
        _HAYSTACKS.clear()
    _HAYSTACKS[key] = haystack
    return haystack
