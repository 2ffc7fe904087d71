"""Passkey retrieval: a random number hidden at a chosen depth in long filler text, asked for at the end.

The test of Mohtashami & Jaggi (2023, "Landmark Attention"), used by Quest and DuoAttention to check that a sparse
KV cache still reaches far back. The prompt is the `passkey` task's (`attnsparse.evaluate.tasks.passkey`). Each
trial's prompt is prefilled once (every plan prefills densely) and every policy then decodes the answer from its
own cache built from that KV, so policies are compared on identical prompts at the cost of one prefill.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attnsparse.decode.backend import decode_backend
from attnsparse.decode.generate import cache_from_kv, decode_step, prefill
from attnsparse.decode.plan import DecodePlan
from attnsparse.evaluate.tasks.passkey import ANSWER_PREFIX, ASK, FILLER, INTRO, NEEDLE, passkey_prompt

__all__ = ["FILLER", "INTRO", "NEEDLE", "QUESTION", "PasskeyTrial", "accuracy_table", "passkey_prompt", "run_passkey",
           "save_results"]

QUESTION = f"{ASK} {ANSWER_PREFIX}"


@dataclass
class PasskeyTrial:
    length: int
    depth: float
    trial: int
    key: int
    policy: str
    answer: str
    correct: bool


@torch.inference_mode()
def run_passkey(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plans: dict[str, DecodePlan | str],
    lengths: list[int],
    depths: list[float],
    trials: int = 20,
    answer_tokens: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> list[PasskeyTrial]:
    """Every (length, depth, trial): one prefill, then a greedy answer per policy; correct = the key is read back."""
    rng = random.Random(seed)
    results: list[PasskeyTrial] = []
    cells = [(length, depth, trial) for length in lengths for depth in depths for trial in range(trials)]
    for length, depth, trial in tqdm(cells, desc="passkey", disable=not progress):
        key = rng.randint(10000, 99999)
        ids = passkey_prompt(tokenizer, length, depth, key)
        kv, logits = prefill(model, ids[None])
        for name, plan in plans.items():
            cache = cache_from_kv(model, kv, plan, reserve=length + answer_tokens)
            token = logits.argmax(dim=-1, keepdim=True)
            answer = [int(token)]
            with decode_backend(model):
                for _ in range(answer_tokens - 1):
                    token = decode_step(model, cache, token).argmax(dim=-1, keepdim=True)
                    answer.append(int(token))
            text = str(tokenizer.decode(answer, skip_special_tokens=True))
            found = re.search(r"\d+", text)
            results.append(PasskeyTrial(length, depth, trial, key, name, text,
                                        bool(found and found.group() == str(key))))
    return results


def accuracy_table(results: list[PasskeyTrial]) -> dict[str, dict[str, float]]:
    """policy -> "length@depth" -> accuracy."""
    table: dict[str, dict[str, list[bool]]] = {}
    for r in results:
        table.setdefault(r.policy, {}).setdefault(f"{r.length}@{r.depth:g}", []).append(r.correct)
    return {p: {cell: sum(v) / len(v) for cell, v in cells.items()} for p, cells in table.items()}


def save_results(path: str | Path, results: list[PasskeyTrial], config: dict[str, object]) -> None:
    from attnsparse.core.runs import atomic_write_json

    atomic_write_json(path, {"config": config, "accuracy": accuracy_table(results),
                             "trials": [asdict(r) for r in results]})
