"""Mutation check: does the test suite notice small deliberate bugs?

Each mutation is one exact text replacement (file, old, new) in a temporary copy of the repository's `src/`,
`tests/` and `pyproject.toml`; the working tree is never touched. For each mutation the tests named with it
run against the copy (PYTHONPATH pointing there), and every failing test is recorded as catching it. An `old`
text that is not found exactly once is reported as "stale" (the code moved: update the mutation), never
skipped. Before any mutation, the same tests run unmutated and must pass.

    .venv/bin/python scripts/mutate.py                 # every mutation; writes benchmarks/results/mutations.*
    .venv/bin/python scripts/mutate.py --only ppl-token-count --only topk-no-tie-fallback --no-write
    .venv/bin/python scripts/mutate.py --list

Exit status 0 only when the unmutated tests pass and every mutation is caught.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COPIED = ("src", "tests", "pyproject.toml")


@dataclass(frozen=True)
class Mutation:
    """One deliberate bug: replace `old` by `new` in `path` (relative to the repository root)."""

    name: str
    area: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the repository root
    why: str = ""


MODEL_LEVEL = "tests/test_model_level.py"
DECODE_E2E = "tests/test_sparse_decode_reference.py"
QUANTILES = "tests/test_profile_quantiles.py"
TIES = "tests/test_topk_ties.py"
TRAINING = "tests/test_training_signal.py"
POLICIES = "tests/test_policies.py"
RESUME = "tests/test_condense.py::test_resume_matches_uninterrupted_run"

MUTATIONS: tuple[Mutation, ...] = (
    # the six that slipped through before (issue 17)
    Mutation("cond-gradient-removed", "losses", "src/attnsparse/condense/trainer.py",
             "total = lam * cond + ", "total = lam * cond.detach() + ", (TRAINING,),
             "the condensation term no longer reaches the weights' gradients"),
    Mutation("kcov-quantile-off-by-one", "metrics", "src/attnsparse/measure/profile.py",
             "result = torch.cat(out, dim=-1)", "result = torch.cat(out, dim=-1) + 1", (QUANTILES,),
             "k-at-coverage p10/p50/p90/p99 one too large"),
    Mutation("ppl-token-count", "metrics", "src/attnsparse/evaluate/perplexity.py",
             "count * (ctx - 1)", "count * ctx", (MODEL_LEVEL,), "perplexity divides by ctx tokens per window"),
    Mutation("ppl-labels-shifted", "metrics", "src/attnsparse/evaluate/perplexity.py",
             "batch[:, 1:].reshape(-1)", "batch[:, :-1].reshape(-1)", (MODEL_LEVEL,),
             "each position is scored on its own token instead of the next"),
    Mutation("chunked-scaling", "attention", "src/attnsparse/attention/backend.py",
             ".mul_(scaling)", ".mul_(scaling * 1.01)", (MODEL_LEVEL,), "scores 1% too large in the chunked path"),
    Mutation("topk-no-tie-fallback", "selection", "src/attnsparse/attention/backend.py",
             "if bool(((top[..., k] == boundary) & torch.isfinite(boundary)).any()):", "if False:",
             (TIES,), "gathered top-k trusts torch.topk's order on tied scores"),
    # more: metrics, losses, policies, selection, caches, resume
    Mutation("kcov-quantile-upper", "metrics", "src/attnsparse/measure/profile.py",
             ".contiguous() - 1e-9)", ".contiguous() + 1e-9)", (QUANTILES,),
             "a quantile that lands exactly on a CDF step takes the next k"),
    Mutation("profile-long-rows", "metrics", "src/attnsparse/measure/profile.py",
             "longer = (n[..., None] > ks)", "longer = (n[..., None] >= ks)", ("tests/test_profile.py",),
             "tail mass on long rows also counts rows of exactly k keys"),
    Mutation("decode-ppl-targets", "metrics", "src/attnsparse/decode/eval.py",
             "targets = window[0, prompt:]", "targets = window[0, prompt - 1 : -1]", (DECODE_E2E,),
             "decode perplexity scores each step on the token it was fed"),
    Mutation("density-topk", "metrics", "src/attnsparse/attention/policies/topk.py",
             "rows.clamp(max=self.k)", "rows.clamp(max=self.k + 1)", (POLICIES,),
             "top-k density counts one kept key too many per row"),
    Mutation("tail-rows-at-k", "losses", "src/attnsparse/condense/losses/tail.py",
             "mask = row_lengths(visible) > k", "mask = row_lengths(visible) >= k", ("tests/test_losses.py",),
             "rows of exactly k keys (tail 0) dilute the tail loss"),
    Mutation("window-off-by-one", "policies", "src/attnsparse/attention/policies/sink_window.py",
             "key_index > (query_positions", "key_index >= (query_positions", (POLICIES,),
             "sink+window keeps W + 1 recent keys"),
    Mutation("topk-tie-latest", "policies", "src/attnsparse/attention/policies/topk.py",
             "(at_threshold.cumsum(dim=-1) <= still_needed)",
             "(at_threshold.flip(-1).cumsum(dim=-1).flip(-1) <= still_needed)", (POLICIES, TIES),
             "top-k ties at the threshold go to the later keys"),
    Mutation("select-sink-not-forced", "selection", "src/attnsparse/decode/kernels.py",
             'bounds[..., : min(sink_blocks, total)] = float("inf")', 'bounds[..., : min(sink_blocks, total)] += 0.0',
             (DECODE_E2E,), "the torch block selection no longer always keeps the sink blocks"),
    Mutation("c-recent-blocks", "selection", "src/attnsparse/core/native/blockattn.c",
             "b >= j->blocks - j->recent", "b > j->blocks - j->recent", (DECODE_E2E,),
             "the compiled selection forces one recent block fewer"),
    Mutation("c-channel-abs", "selection", "src/attnsparse/core/native/blockattn.c",
             "w += fabsf(q[g * dim + d]);", "w += q[g * dim + d];", (DECODE_E2E,),
             "compiled channel choice by signed instead of absolute query weight"),
    Mutation("channel-abs", "selection", "src/attnsparse/decode/kernels.py",
             "chosen = q.abs().sum(dim=-2)", "chosen = q.sum(dim=-2)", (DECODE_E2E,),
             "torch channel choice by signed instead of absolute query weight"),
    Mutation("stream-ring-slot", "caches", "src/attnsparse/decode/stores.py",
             "sink + (self.n - sink) % window", "sink + (self.n - sink + 1) % window", (DECODE_E2E,),
             "a streaming decode step overwrites the second-oldest window entry instead of the oldest"),
    Mutation("mean-summary-overwrite", "caches", "src/attnsparse/decode/scorers/mean.py",
             "data[:, :, block] += key", "data[:, :, block] = key", (DECODE_E2E,),
             "a block's key sum keeps only its latest decoded key"),
    Mutation("resume-controller-lost", "resume", "src/attnsparse/condense/run.py",
             'controller.load_state_dict(saved["controller"])', "pass", (RESUME,),
             "a resumed run restarts the constrained λ instead of restoring it"),
    Mutation("resume-log-truncate", "resume", "src/attnsparse/condense/run.py",
             'r.get("step", 0) <= last_step', 'r.get("step", 0) < last_step', (RESUME,),
             "resuming drops the checkpoint step's own log record"),
)


@dataclass
class Outcome:
    name: str
    area: str
    path: str
    status: str  # caught, missed, stale
    why: str = ""
    caught_by: list[str] = field(default_factory=list)
    tests: list[str] = field(default_factory=list)
    seconds: float = 0.0
    detail: str = ""


def copy_tree(target: Path) -> None:
    """src/, tests/ and pyproject.toml into `target` (caches and compiled files left out)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.egg-info")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        else:
            shutil.copy2(source, target / name)


def apply(mutation: Mutation, tree: Path) -> str | None:
    """Apply the replacement in the copy; None when done, else why it could not be (the mutation is stale)."""
    path = tree / mutation.path
    if not path.is_file():
        return f"{mutation.path} does not exist"
    text = path.read_text(encoding="utf-8")
    found = text.count(mutation.old)
    if found != 1:
        return f"old text found {found} times in {mutation.path} (need exactly 1)"
    path.write_text(text.replace(mutation.old, mutation.new), encoding="utf-8")
    return None


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, list[str], list[str], str]:
    """pytest in the copy: (exit status, failing test ids, every test id run, the output's tail)."""
    report = tree / "report.xml"
    report.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTEST_ADDOPTS", None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               f"--junitxml={report}", *tests]
    try:
        done = subprocess.run(command, check=False, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, ["(timed out)"], [], f"timed out after {timeout:.0f} s"
    failed, ran = [], []
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            ran.append(name)
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
    tail = (done.stdout + done.stderr)[-2000:]
    if done.returncode != 0 and not failed:
        failed = [f"(pytest exit {done.returncode})"]
    return done.returncode, failed, ran, tail


def check(mutation: Mutation, timeout: float) -> Outcome:
    outcome = Outcome(mutation.name, mutation.area, mutation.path, "stale", mutation.why, tests=list(mutation.tests))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="attnsparse-mutant-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        problem = apply(mutation, tree)
        if problem is not None:
            outcome.detail = problem
            return outcome
        _, failed, _, tail = run_tests(tree, mutation.tests, timeout)
    outcome.seconds = round(time.perf_counter() - started, 1)
    outcome.caught_by = failed
    outcome.status = "caught" if failed else "missed"
    outcome.detail = "" if failed else tail[-400:]
    return outcome


def baseline(mutations: list[Mutation], timeout: float) -> tuple[bool, str]:
    """The union of the mutations' tests, unmutated, must pass (else a 'caught' would mean nothing)."""
    tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
    with tempfile.TemporaryDirectory(prefix="attnsparse-baseline-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        status, failed, ran, tail = run_tests(tree, tests, timeout)
    if status != 0:
        return False, f"unmutated tests fail: {failed}\n{tail}"
    return True, f"{len(ran)} tests pass unmutated"


def write_results(outcomes: list[Outcome], note: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    caught = sum(o.status == "caught" for o in outcomes)
    payload = {"mutations": len(outcomes), "caught": caught, "baseline": note,
               "results": [asdict(o) for o in outcomes]}
    (RESULTS / "mutations.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    lines = [
        "# Mutation check",
        "",
        f"`scripts/mutate.py`: {caught} of {len(outcomes)} mutations caught ({note}).",
        "Each row is one deliberate bug applied to a temporary copy; *caught by* lists the tests that failed.",
        "",
        "| mutation | area | file | bug | status | caught by |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        short = [name.split("/")[-1] for name in o.caught_by] or [o.detail.splitlines()[-1] if o.detail else ""]
        lines.append(f"| {o.name} | {o.area} | `{o.path}` | {o.why} | {o.status} | {'<br>'.join(short)} |")
    (RESULTS / "mutations.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="run only this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/mutations.*")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"error: unknown mutations {sorted(unknown)}; see --list", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:<28} {m.area:<10} {m.path}  [{', '.join(m.tests)}]")
        return 0
    ok, note = baseline(chosen, args.timeout)
    print(f"baseline: {note}")
    if not ok:
        return 1
    outcomes = []
    for mutation in chosen:
        outcome = check(mutation, args.timeout)
        outcomes.append(outcome)
        by = ", ".join(name.split("::")[-1] for name in outcome.caught_by) or outcome.detail.splitlines()[-1:]
        print(f"{outcome.status:<7} {mutation.name:<28} {outcome.seconds:6.1f}s  {by}", flush=True)
    if not args.no_write:
        write_results(outcomes, note)
    return 0 if all(o.status == "caught" for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
