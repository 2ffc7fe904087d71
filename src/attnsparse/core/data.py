"""Text in, token windows out: a file, a hub data set, or a built-in English text that needs no network.

The built-in default is the English text of the Python language reference that ships with every CPython install
(`pydoc_data.topics`, about 465 kB), joined in sorted topic order so it is the same on every machine.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from attnsparse.core.hub import OFFLINE_HINT, hub_endpoint, hub_offline, hub_unreachable
from attnsparse.errors import AttnsparseError

BUILTIN = "builtin"
BUILTIN_SPLITS = ("builtin:train", "builtin:test")  # first 90% / last 10% of the topics, disjoint
TEXT_HELP = "pass a UTF-8 text file, hf:NAME[:CONFIG[:SPLIT]] for a hub data set, or builtin[:train|:test]"


def load_text(spec: str | None = None) -> str:
    """Load raw text from a file path, `hf:NAME[:CONFIG[:SPLIT]]`, or the built-in default (None or "builtin")."""
    if spec is None or spec == BUILTIN:
        return builtin_text()
    if spec in BUILTIN_SPLITS:
        return builtin_text(spec.split(":")[1])
    if spec.startswith("hf:"):
        return _hub_text(spec[3:])
    path = Path(spec).expanduser()
    if not path.exists():
        raise AttnsparseError(f"text file {spec} does not exist; {TEXT_HELP}")
    if not path.is_file():
        raise AttnsparseError(f"{spec} is not a file; {TEXT_HELP}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise AttnsparseError(
            f"text file {spec} is not valid UTF-8 (bad byte at offset {error.start}); convert it to UTF-8"
        ) from error
    if not text.strip():
        raise AttnsparseError(f"text file {spec} is empty; {TEXT_HELP}")
    return text


def builtin_text(split: str | None = None) -> str:
    """The Python language reference topics shipped with CPython: real English prose, always available offline.

    `split="train"` gives the first 90% of the topics (in sorted order) and `split="test"` the rest, so a model
    can be fine-tuned and evaluated on disjoint built-in text.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    cut = int(len(names) * 0.9)
    chosen = {"train": names[:cut], "test": names[cut:], None: names}[split]
    return "\n\n".join(topics[name] for name in chosen)


def _hub_text(spec: str) -> str:
    parts = spec.split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "test"
    if not name:
        raise AttnsparseError(f"empty data set name in 'hf:{spec}'; {TEXT_HELP}")
    if not hub_offline() and (unreachable := hub_unreachable()) is not None:
        raise AttnsparseError(
            f"cannot load hub data set '{name}': the Hugging Face hub at {hub_endpoint()} is unreachable "
            f"({unreachable}); pass a local text file, fix the network, or {OFFLINE_HINT} (a cached copy of "
            f"'{name}' then loads)"
        )
    try:
        import datasets

        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise AttnsparseError(
            f"cannot load hub data set '{name}' (config {config}, split {split}): {first}; "
            "the hub may be unreachable, pass a local text file instead"
        ) from error
    column = "text" if "text" in dataset.column_names else None
    if column is None:
        strings = [c for c, f in dataset.features.items() if getattr(f, "dtype", None) == "string"]
        if not strings:
            raise AttnsparseError(f"hub data set '{name}' has no text column; pass a local text file instead")
        column = strings[0]
    text = "\n".join(row for row in dataset[column] if row)
    if not text.strip():
        raise AttnsparseError(f"hub data set '{name}' split {split} has no text")
    return text


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Token ids of the whole text, without special tokens, as a 1-D LongTensor."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, ctx: int, *, stride: int | None = None, count: int | None = None,
            option: str = "--ctx") -> torch.Tensor:
    """Fixed-length windows (M, ctx) of a token sequence.

    `count=None`: windows at 0, stride, 2*stride, ... (stride defaults to ctx: non-overlapping; a final partial
    window is dropped). `count=M`: M evenly spaced windows, window i starting at i * (len // M). `option` is the
    command's name for the window length, used in the advice of its errors.
    """
    if ctx < 2:
        raise AttnsparseError(f"context length {ctx} is too small; use {option} 2 or more")
    total = int(ids.numel())
    if total < ctx:
        raise AttnsparseError(
            f"the text has {total} tokens, fewer than one window of {ctx}; use a longer text or a smaller {option}"
        )
    if count is not None:
        if count < 1:
            raise AttnsparseError(f"window count {count} must be >= 1")
        if not _even_windows_fit(total, ctx, count):
            most = most_even_windows(total, ctx, below=count)
            limit = "at most" if count > total - ctx + 1 else f"the largest count below {count} that fits is"
            raise AttnsparseError(
                f"--windows {count}: {count} distinct evenly spaced windows of {ctx} tokens do not fit in the "
                f"text's {total} tokens ({limit} {most}); use --windows {most}, a smaller {option} or a longer text"
            )
        spacing = total // count
        starts = [i * spacing for i in range(count)]
    else:
        step = ctx if stride is None else stride
        if step < 1:
            raise AttnsparseError(f"stride {step} must be >= 1")
        starts = list(range(0, total - ctx + 1, step))
    return torch.stack([ids[start : start + ctx] for start in starts])


def _even_windows_fit(total: int, ctx: int, count: int) -> bool:
    """Whether `count` windows starting at i * (total // count) are distinct (spacing >= 1) and all fit."""
    spacing = total // count
    return spacing >= 1 and (count - 1) * spacing + ctx <= total


def most_even_windows(total: int, ctx: int, below: int | None = None) -> int:
    """The largest window count (at most `below`) whose evenly spaced windows are distinct and fit in `total`
    tokens (at least 1 when total >= ctx): there are only total - ctx + 1 distinct windows."""
    count = total - ctx + 1 if below is None else min(below, total - ctx + 1)
    while count > 1 and not _even_windows_fit(total, ctx, count):
        count -= 1
    return max(count, 1)


def check_context(ctx: int, max_context: int, option: str = "--ctx") -> None:
    """Refuse a context longer than the model was built for; `option` names the command's length option."""
    if ctx > max_context:
        raise AttnsparseError(
            f"context {ctx} exceeds the model's maximum of {max_context} tokens; use {option} {max_context} or less"
        )


def load_windows(
    tokenizer: PreTrainedTokenizerBase,
    text_spec: str | None,
    ctx: int,
    *,
    max_context: int | None = None,
    stride: int | None = None,
    count: int | None = None,
) -> torch.Tensor:
    """load_text + tokenize + windows, checking ctx against the model's maximum first."""
    if max_context is not None:
        check_context(ctx, max_context)
    return windows(tokenize(tokenizer, load_text(text_spec)), ctx, stride=stride, count=count)
