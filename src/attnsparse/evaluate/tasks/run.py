"""Run the task suite: every (task, length, depth, trial) prefilled once, answered under every policy and plan.

Decode plans (block top-k, streaming heads, plan JSON files) all prefill densely, so one dense prefill per prompt
serves them all: each plan builds its own cache from that KV (`cache_from_kv`) and answers greedily. Attention
policies (topk:K, sink+window:S:W) act on the prompt, so each runs its own prefill under the policy and then
decodes densely from the KV it produced. `dense` (dense prefill, dense decode) is always run, first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attnsparse.attention.backend import sparse_attention
from attnsparse.attention.policies import Policy, parse_policy
from attnsparse.core.data import check_context
from attnsparse.core.models import ModelShape
from attnsparse.decode.backend import decode_backend, make_plan
from attnsparse.decode.eval import plan_label
from attnsparse.decode.generate import cache_from_kv, decode_step, prefill
from attnsparse.decode.plan import DecodePlan
from attnsparse.errors import AttnsparseError
from attnsparse.evaluate.tasks.base import Prompter, Sample, Task, check_depth, parse_tasks, trial_rng
from attnsparse.evaluate.tasks.retrieval import RetrievalScores, sample_retrieval_scores

ALL_TASKS = "passkey,niah-multikey,niah-multivalue,variable-tracking,common-words"


@dataclass(frozen=True)
class TaskOptions:
    """The model-independent settings of a task run (what `attnsparse evaluate --tasks ...` asks for)."""

    tasks: str | Sequence[str] = ALL_TASKS
    lengths: Sequence[int] = (1024, 2048, 4096, 8192)
    depths: Sequence[float] = (0.1, 0.5, 0.9)
    trials: int = 20
    haystack: str | None = None
    chat_template: bool = False
    retrieval: bool = True
    seed: int = 0

    def check(self) -> None:
        """Refuse bad tasks, lengths, depths or trials before a model is even loaded (the rest: prepare_tasks)."""
        parse_tasks(self.tasks)
        _check_grid(self.lengths, self.depths, self.trials)


def _check_grid(lengths: Sequence[int], depths: Sequence[float], trials: int) -> list[float]:
    if trials < 1:
        raise AttnsparseError(f"trials {trials} must be >= 1")
    if not lengths or not depths:
        raise AttnsparseError("give at least one task length and one depth")
    for length in lengths:
        if length < 1:
            raise AttnsparseError(f"task length {length} must be >= 1 token")
    return [check_depth(d) for d in depths]


# The --quick preset: every task at 1K and 4K, 2 trials per cell, no retrieval scores (they are one more observed
# decode of every retrieval prompt); with 3 trials and the scores, dense plus two plans took ~17 min on 2 cores.
QUICK = {"lengths": (1024, 4096), "trials": 2, "retrieval": False}


@dataclass
class TaskRow:
    """Accuracy of one policy on one (task, length, depth) cell."""

    task: str
    length: int
    depth: float | None
    policy: str
    trials: int
    correct: int
    accuracy: float


@dataclass
class TaskTrial:
    """One answer: what was asked, what was generated, and whether it counts."""

    task: str
    length: int
    depth: float | None
    trial: int
    policy: str
    answers: list[str]
    output: str
    correct: bool


@dataclass
class TaskResult:
    rows: list[TaskRow] = field(default_factory=list)
    trials: list[TaskTrial] = field(default_factory=list)
    retrieval: RetrievalScores | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """Mean accuracy per policy (rows) and task (columns), over every length and depth."""
        tasks = list(dict.fromkeys(r.task for r in self.rows))
        policies = list(dict.fromkeys(r.policy for r in self.rows))
        width = max([len(p) for p in policies] + [6])
        lines = [f"{'policy':<{width}} " + " ".join(f"{t:>18}" for t in tasks)]
        for policy in policies:
            cells = []
            for task in tasks:
                rows = [r for r in self.rows if r.policy == policy and r.task == task]
                correct, total = sum(r.correct for r in rows), sum(r.trials for r in rows)
                cells.append(f"{correct / max(total, 1):>11.3f} ({correct}/{total})"[-18:].rjust(18))
            lines.append(f"{policy:<{width}} " + " ".join(cells))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tasks": [asdict(r) for r in self.rows]}
        if self.retrieval is not None:
            out["retrieval"] = self.retrieval.to_json()
        return out


@torch.inference_mode()
def greedy_answer(
    model: PreTrainedModel, cache: Any, first_logits: torch.Tensor, steps: int, eos: int | None = None,
    keep_logits: bool = False,
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens (at most `steps`, stopping after `eos`) from a prefilled cache and its last logits (1, V)."""
    token = first_logits.argmax(dim=-1, keepdim=True)
    tokens, logits = [int(token)], [first_logits[0]] if keep_logits else []
    with decode_backend(model):
        while len(tokens) < steps and tokens[-1] != eos:
            step = decode_step(model, cache, token)
            if keep_logits:
                logits.append(step[0])
            token = step.argmax(dim=-1, keepdim=True)
            tokens.append(int(token))
    return tokens, logits


def answer_all(
    model: PreTrainedModel,
    sample: Sample,
    plans: dict[str, DecodePlan],
    policies: Sequence[Policy] = (),
    eos: int | None = None,
    keep_logits: bool = False,
) -> tuple[dict[str, tuple[list[int], list[torch.Tensor]]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Answers of one sample: one dense prefill shared by every plan, one prefill under each attention policy.

    Returns {label: (tokens, logits)} and the dense prefill's KV (for the retrieval scores).
    """
    ids = sample.ids[None]
    reserve = sample.length + sample.answer_tokens
    kv, logits = prefill(model, ids)
    answers = {label: greedy_answer(model, cache_from_kv(model, kv, plan, reserve=reserve), logits,
                                    sample.answer_tokens, eos, keep_logits)
               for label, plan in plans.items()}
    dense = plans.get("dense") or make_plan(model, "dense")
    for policy in policies:
        with sparse_attention(model, policy):
            policy_kv, policy_logits = prefill(model, ids)
        answers[policy.spec] = greedy_answer(model, cache_from_kv(model, policy_kv, dense, reserve=reserve),
                                             policy_logits, sample.answer_tokens, eos, keep_logits)
    return answers, kv


def _policies(policies: str | Sequence[str | Policy]) -> list[Policy]:
    from attnsparse.specs import split_specs

    items = split_specs(policies) if isinstance(policies, str) else list(policies)
    parsed = [parse_policy(p) for p in items]
    return list({p.spec: p for p in parsed if not p.is_dense}.values())


@dataclass
class TaskGrid:
    """A checked task run: parsed tasks, its cells, the resolved plans and policies, every prompt buildable."""

    tasks: list[Task]
    cells: list[tuple[Task, int, float | None, int]]  # (task, length, depth or None, trial)
    prompter: Prompter
    plans: dict[str, DecodePlan]  # label -> plan, "dense" first
    policies: list[Policy]  # attention policies other than dense
    retrieval: bool
    seed: int
    config: dict[str, Any]

    def sample(self, task: Task, length: int, depth: float | None, trial: int) -> Sample:
        return task.sample(self.prompter, length, depth, trial, trial_rng(self.seed, task.spec, length, depth, trial))


def prepare_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: str | Sequence[str | Task],
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int = 20,
    *,
    policies: str | Sequence[str | Policy] = ("dense",),
    plans: Sequence[str | Path | DecodePlan] = (),
    haystack: str | None = None,
    chat_template: bool = False,
    retrieval: bool = True,
    seed: int = 0,
    first_trial: int = 0,
) -> TaskGrid:
    """Check every argument and build every prompt once (then dropped), so a bad input fails before any forward.

    The grid holds trials first_trial .. first_trial + trials - 1 of each cell; a trial's prompt depends only on
    (seed, task, length, depth, trial), so a grid can be extended later by more trials without repeating any.
    """
    parsed = parse_tasks(tasks) if isinstance(tasks, str) else [
        t for item in tasks for t in (parse_tasks([item]) if isinstance(item, str) else [item])]
    depths = _check_grid(lengths, depths, trials)
    if first_trial < 0:
        raise AttnsparseError(f"first trial {first_trial} must be >= 0")
    shape = ModelShape.of(model)
    for length in lengths:
        check_context(length, shape.need("max_context"), "--lengths")
    sparse = _policies(policies)
    resolved = {"dense": make_plan(model, "dense")}
    for plan in plans:
        resolved.setdefault(plan_label(plan), make_plan(model, plan))
    prompter = Prompter(tokenizer, chat=chat_template, haystack=haystack)
    measure = retrieval and any(t.retrieval for t in parsed)
    cells = [(task, length, depth if task.uses_depth else None, trial)
             for task in parsed for length in lengths for depth in (depths if task.uses_depth else depths[:1])
             for trial in range(first_trial, first_trial + trials)]
    grid = TaskGrid(parsed, cells, prompter, resolved, sparse, measure, seed, {
        "tasks": [t.spec for t in parsed], "lengths": list(lengths), "depths": depths, "trials": trials,
        "policies": ["dense", *(p.spec for p in sparse)], "plans": [label for label in resolved if label != "dense"],
        "haystack": haystack or "builtin", "prompt_form": prompter.form, "seed": seed, "retrieval": measure,
        "first_trial": first_trial,
    })
    for cell in cells:
        grid.sample(*cell)
    return grid


def run_grid(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, grid: TaskGrid,
             progress: bool = True) -> TaskResult:
    """Answer every cell of a prepared grid under dense, each policy and each plan; rows in cell order."""
    eos = tokenizer.eos_token_id
    shape = ModelShape.of(model)
    scores = RetrievalScores(shape.need("layers"), shape.need("heads")) if grid.retrieval else None
    result = TaskResult(retrieval=scores, config=dict(grid.config))
    tally: dict[tuple[str, int, float | None, str], list[int]] = {}
    for task, length, depth, trial in tqdm(grid.cells, desc="tasks", disable=not progress):
        sample = grid.sample(task, length, depth, trial)
        answers, kv = answer_all(model, sample, grid.plans, grid.policies, eos)
        for label, (tokens, _) in answers.items():
            text = str(tokenizer.decode(tokens, skip_special_tokens=True))
            correct = task.correct(text, sample.answers)
            result.trials.append(TaskTrial(task.spec, length, depth, trial, label, list(sample.answers), text, correct))
            counts = tally.setdefault((task.spec, length, depth, label), [0, 0])
            counts[0] += int(correct)
            counts[1] += 1
        if scores is not None and task.retrieval and sample.needles:
            scores.add(task.spec, sample_retrieval_scores(model, kv, sample, eos))
    result.rows = [TaskRow(t, length, depth, label, total, correct, correct / total)
                   for (t, length, depth, label), (correct, total) in tally.items()]
    return result


def run_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: str | Sequence[str | Task],
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int = 20,
    *,
    policies: str | Sequence[str | Policy] = ("dense",),
    plans: Sequence[str | Path | DecodePlan] = (),
    haystack: str | None = None,
    chat_template: bool = False,
    retrieval: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> TaskResult:
    """Accuracy rows {task, length, depth, policy, trials, correct, accuracy} for dense, each policy and each plan.

    Every argument is checked before the first prefill (`prepare_tasks`). `retrieval` also measures per-head
    retrieval scores on the retrieval tasks (dense, from the same prefill). Tasks without a needle depth run once
    per length.
    """
    grid = prepare_tasks(model, tokenizer, tasks, lengths, depths, trials, policies=policies, plans=plans,
                         haystack=haystack, chat_template=chat_template, retrieval=retrieval, seed=seed)
    return run_grid(model, tokenizer, grid, progress)


def write_trials(result: TaskResult, path: str | Path) -> Path:
    """Every answer, one JSON object a line (what each policy wrote on each prompt)."""
    from attnsparse.core.runs import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(asdict(t)) + "\n" for t in result.trials))
    return Path(path)
