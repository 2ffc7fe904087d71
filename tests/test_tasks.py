"""The task suite: generators checked by brute force on their decoded text, scoring on hand-written answers,
the shared-prefill runner against one prefill per plan, and retrieval scores on a hand-built copying model."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from attnsparse.attention.backend import sparse_attention
from attnsparse.attention.policies import parse_policy
from attnsparse.core.tiny import tiny_llama, tiny_tokenizer
from attnsparse.decode.backend import make_plan
from attnsparse.decode.generate import generate, prefill
from attnsparse.errors import AttnsparseError
from attnsparse.evaluate.passkey import passkey_prompt
from attnsparse.evaluate.tasks import TASKS, Prompter, parse_tasks
from attnsparse.evaluate.tasks.base import Needle, Sample, trial_rng
from attnsparse.evaluate.tasks.retrieval import sample_retrieval_scores
from attnsparse.evaluate.tasks.run import answer_all, run_tasks

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = "passkey,niah-multikey,niah-multivalue,variable-tracking,common-words"
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE tokenizer trained in code on the built-in text: tokens span several characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from attnsparse.core.data import builtin_text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tokenizer.train_from_iterator([builtin_text()[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


@pytest.fixture(params=["chars", "bpe"])
def tokenizer(request, bpe_tokenizer):
    return tiny_tokenizer() if request.param == "chars" else bpe_tokenizer


def sample_of(spec: str, tokenizer, length: int, depth: float, trial: int = 0, seed: int = 0, chat: bool = False):
    task = TASKS.parse(spec)
    prompter = Prompter(tokenizer, chat=chat)
    depth_or_none = depth if task.uses_depth else None
    return task.sample(prompter, length, depth_or_none, trial, trial_rng(seed, task.spec, length, depth_or_none, trial))


def recover(task: str, text: str) -> set[str]:
    """The answers, worked out from the prompt text alone."""
    if task == "passkey":
        return set(re.findall(r"The pass key is (\d+)\.", text))
    if task == "niah-multikey":
        pairs = re.findall(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.", text)
        assert len({k for k, _ in pairs}) == len(pairs) == 4  # distinct keys, one needle each
        asked = re.search(r"What is the special magic number for ([a-z]+-[a-z]+) mentioned", text).group(1)
        return {v for k, v in pairs if k == asked}
    if task == "niah-multivalue":
        pairs = re.findall(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.", text)
        asked = re.search(r"What are all the special magic numbers for ([a-z]+-[a-z]+) mentioned", text).group(1)
        assert {k for k, _ in pairs} == {asked} and len(pairs) == 4
        return {v for _, v in pairs}
    if task == "variable-tracking":
        bound = dict(re.findall(r"VAR ([A-Z]+) = (\w+)\.", text))
        value = re.search(r"assigned the value (\d+), directly", text).group(1)
        names: set[str] = set()
        while True:  # a fixed point: names bound to the value or to a name already found
            more = {n for n, source in bound.items() if source == value or source in names} - names
            if not more:
                return names
            names |= more
    if task == "common-words":
        entries = re.findall(r"\n(\d+)\. ([a-z]+)", text)
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(w for _, w in entries).most_common()
        top = [w for w, c in counts if c > counts[5][1]]
        assert len(top) == 5  # the five common words stand apart from every other word
        return set(top)
    raise AssertionError(task)


@pytest.mark.parametrize("spec", ALL.split(","))
@pytest.mark.parametrize("length, depth", [(1400, 0.0), (2000, 0.5), (2600, 1.0)])
def test_answers_are_recoverable_from_the_prompt_text(tokenizer, spec, length, depth):
    sample = sample_of(spec, tokenizer, length, depth)
    assert sample.ids.shape == (length,)
    text = tokenizer.decode(sample.ids)
    assert recover(spec, text) == set(sample.answers)
    for needle in sample.needles:  # the spans retrieval scores count hold the answer's text
        for start, stop in needle.spans:
            assert needle.answer in tokenizer.decode(sample.ids[start:stop])


@pytest.mark.parametrize("spec", ["passkey", "niah-multikey", "variable-tracking"])
def test_needle_depth_is_the_position_of_the_asked_needle(spec):
    tokenizer = tiny_tokenizer()
    at = []
    for depth in (0.0, 0.5, 1.0):
        sample = sample_of(spec, tokenizer, 3000, depth)
        starts = [s for n in sample.needles for s, _ in n.spans]
        at.append(min(starts) / 3000)
    assert at[0] < 0.1 and 0.35 < at[1] < 0.65 and at[2] > 0.85


def test_passkey_task_is_the_passkey_prompt():
    tokenizer = tiny_tokenizer()
    sample = sample_of("passkey", tokenizer, 900, 0.25, trial=3)
    assert torch.equal(sample.ids, passkey_prompt(tokenizer, 900, 0.25, int(sample.answers[0])))
    assert tokenizer.decode(sample.ids).endswith("What is the pass key? The pass key is")


@pytest.mark.parametrize("spec", ALL.split(","))
def test_generation_is_deterministic_by_seed(spec):
    tokenizer = tiny_tokenizer()
    first, again = sample_of(spec, tokenizer, 1500, 0.3), sample_of(spec, tokenizer, 1500, 0.3)
    assert torch.equal(first.ids, again.ids) and first.answers == again.answers
    other_trial, other_seed = sample_of(spec, tokenizer, 1500, 0.3, trial=1), sample_of(spec, tokenizer, 1500, 0.3, seed=1)
    assert other_trial.answers != first.answers and other_seed.answers != first.answers


@pytest.mark.parametrize("spec", ALL.split(","))
def test_chat_form_has_exact_length_and_opens_the_answer(spec):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT
    sample = sample_of(spec, tokenizer, 1700, 0.5, chat=True)
    text = tokenizer.decode(sample.ids)
    assert sample.ids.shape == (1700,) and text.startswith("<|user|>\n")
    assert re.search(r"[?.]</s>\n<\|assistant\|>\n[A-Z][^\n]*(is|are|:)$", text)
    assert recover(spec, text) == set(sample.answers)


def test_bad_specs_lengths_and_templates_are_one_line_errors():
    tokenizer = tiny_tokenizer()
    with pytest.raises(AttnsparseError, match="unknown task 'niah'"):
        parse_tasks("niah")
    with pytest.raises(AttnsparseError, match="niah-multikey:keys=0"):
        parse_tasks("niah-multikey:keys=0")
    with pytest.raises(AttnsparseError, match="too short; use at least"):
        sample_of("niah-multikey", tokenizer, 300, 0.5)
    with pytest.raises(AttnsparseError, match="no chat template"):
        Prompter(tokenizer, chat=True)
    assert [t.spec for t in parse_tasks("passkey,niah-multikey:keys=2,passkey")] == ["passkey", "niah-multikey:keys=2"]


@pytest.mark.parametrize("spec, answers, output, correct", [
    ("passkey", ["12345"], " 12345. Remember it.", True),
    ("passkey", ["12345"], " 123456", False),
    ("passkey", ["12345"], " 54321, no, 12345", False),  # the first number counts
    ("niah-multikey", ["1234567"], " 1234567.\nWhat", True),
    ("niah-multivalue", ["11", "22", "33"], " 33, 11 and 22 (and 44).", True),
    ("niah-multivalue", ["11", "22", "33"], " 11, 22", False),  # partial
    ("variable-tracking", ["ABCDE", "FGHIJ"], " FGHIJ, ABCDE.", True),
    ("variable-tracking", ["ABCDE", "FGHIJ"], " ABCDE, FGHIJK", False),  # a longer name is another name
    ("variable-tracking", ["ABCDE", "FGHIJ"], " VAR ABCDE = FGHIJ", True),
    ("common-words", ["river", "stone"], " 1. River\n2. stone\n3. tree", True),
    ("common-words", ["river", "stone"], " rivers, stones", False),
])
def test_scoring_of_hand_written_answers(spec, answers, output, correct):
    assert TASKS.parse(spec).correct(output, answers) is correct


def test_prefill_once_equals_a_prefill_per_plan():
    model, tokenizer = tiny_llama(heads=6, kv_heads=2, head_dim=16, max_positions=1024), tiny_tokenizer()
    sample = sample_of("passkey", tokenizer, 500, 0.5)
    plans = {spec: make_plan(model, spec) for spec in ("dense", "block:8:0.25", "streaming:4:64")}
    topk = parse_policy("topk:8")
    shared, _ = answer_all(model, sample, plans, [topk], keep_logits=True)
    for spec, plan in plans.items():
        alone = generate(model, sample.ids[None], plan, max_new_tokens=sample.answer_tokens, keep_logits=True)
        tokens, logits = shared[spec]
        assert tokens == alone.sequences[0, 500:].tolist()
        torch.testing.assert_close(torch.stack(logits), torch.cat(alone.logits), rtol=1e-4, atol=1e-5)
    with sparse_attention(model, topk):  # the prefill under the policy, then dense decoding
        alone = generate(model, sample.ids[None], "dense", max_new_tokens=sample.answer_tokens, keep_logits=True)
    tokens, logits = shared["topk:8"]
    assert tokens == alone.sequences[0, 500:].tolist()
    torch.testing.assert_close(torch.stack(logits), torch.cat(alone.logits), rtol=1e-4, atol=1e-5)


def test_run_tasks_rows_figures_and_refusals(tmp_path):
    from attnsparse.core.report import render_html
    from attnsparse.evaluate.tasks.plots import tasks_section, write_task_figures

    model, tokenizer = tiny_llama(max_positions=2048), tiny_tokenizer()
    result = run_tasks(model, tokenizer, "passkey,common-words", [1200], [0.2, 0.8], 2, policies="dense,topk:4",
                       plans=["block:8:1.0"], progress=False)
    cells = {(r.task, r.depth, r.policy): r for r in result.rows}
    assert set(cells) == {(t, d, p) for t, d in [("passkey", 0.2), ("passkey", 0.8), ("common-words", None)]
                          for p in ("dense", "topk:4", "plan:block:8:1.0")}
    for row in result.rows:
        assert row.trials == 2 and row.accuracy == row.correct / 2 and row.length == 1200
    # a plan that keeps every block answers exactly as dense does
    by_policy = {(t.task, t.depth, t.trial, t.policy): t.output for t in result.trials}
    assert all(by_policy[(t, d, i, "dense")] == by_policy[(t, d, i, "plan:block:8:1.0")] for t, d, i, _ in by_policy)
    assert result.retrieval is not None and result.retrieval.samples == {"passkey": 4}
    figures = write_task_figures(result, tmp_path)
    assert sorted(p.name for p, _ in figures) == ["retrieval_heads.png", "tasks_dense.png",
                                                  "tasks_plan_block_8_1.0.png", "tasks_topk_4.png"]
    page = render_html("run", [tasks_section(result, figures)])
    assert "Long-context tasks" in page and page.count("data:image/png;base64") == 4
    with pytest.raises(AttnsparseError, match="exceeds the model's maximum"):
        run_tasks(model, tokenizer, "passkey", [4096], [0.5], 1, progress=False)
    with pytest.raises(AttnsparseError, match="too short"):
        run_tasks(model, tokenizer, "passkey,niah-multikey", [500], [0.5], 1, progress=False)


def test_a_grid_extended_by_later_trials_equals_one_grid_of_all_trials():
    from attnsparse.evaluate.tasks.run import prepare_tasks, run_grid

    model, tokenizer = tiny_llama(max_positions=2048), tiny_tokenizer()
    grids = [prepare_tasks(model, tokenizer, "passkey,common-words", [1200], [0.3], trials, plans=["block:8:0.5"],
                           retrieval=False, first_trial=first) for first, trials in [(0, 4), (0, 1), (1, 3)]]
    whole, chunks = grids[0], grids[1:]
    assert [c[1:] for c in whole.cells] == [c[1:] for g in chunks for c in g.cells if c[0].spec == "passkey"] + [
        c[1:] for g in chunks for c in g.cells if c[0].spec == "common-words"]
    for cell in whole.cells:
        chunk = chunks[0] if cell[3] < 1 else chunks[1]
        assert torch.equal(whole.sample(*cell).ids, chunk.sample(*cell).ids)
    full = run_grid(model, tokenizer, whole, progress=False)
    answers = {(t.task, t.trial, t.policy): t.output for t in full.trials}
    parts = [run_grid(model, tokenizer, g, progress=False) for g in chunks]
    assert answers == {(t.task, t.trial, t.policy): t.output for r in parts for t in r.trials}
    summed = Counter()
    for r in parts:
        for row in r.rows:
            summed[(row.task, row.policy)] += row.correct
    assert summed == Counter({(r.task, r.policy): r.correct for r in full.rows})
    with pytest.raises(AttnsparseError, match="first trial -1"):
        prepare_tasks(model, tokenizer, "passkey", [1200], [0.3], 1, first_trial=-1)


# --- retrieval scores on a model whose copying head is known ---

VOCAB, NEEDLE = 32, [10, 11, 12, 13, 14]


def copying_model() -> torch.nn.Module:
    """Two layers of three heads; layer 0 attends uniformly, and in layer 1 head 1 copies the successor.

    Embeddings are one-hot and RoPE is switched off (zero frequencies). Layer 1: head 0 attends to token 0 (the
    first position), head 1 attends to the token after the current one in the vocabulary (t+1) and writes it to
    the output, head 2 attends to earlier copies of the current token. Only head 1 reaches the logits, so a
    prompt ending in 9 with the needle 10 11 12 13 14 in it is answered 10 11 12 13 14, copied by head (1, 1).
    """
    model = tiny_llama(layers=2, heads=3, kv_heads=3, head_dim=32, vocab=VOCAB)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.zero_()
        model.model.rotary_emb.inv_freq.zero_()
        model.model.embed_tokens.weight[:, :VOCAB] = torch.eye(VOCAB)
        attention = model.model.layers[1].self_attn
        for token in range(VOCAB):
            attention.q_proj.weight[0, token] = 1.0  # head 0: every query looks for token 0
            attention.q_proj.weight[32 + (token + 1) % VOCAB, token] = 1.0  # head 1: for the successor
            attention.q_proj.weight[64 + token, token] = 1.0  # head 2: for the same token
            for head in range(3):
                attention.k_proj.weight[32 * head + token, token] = 1.0
            attention.v_proj.weight[32 + token, token] = 1.0
            attention.o_proj.weight[32 + token, 32 + token] = 1.0  # only head 1's output is written
            model.lm_head.weight[token, 32 + token] = 10.0
    return model


def test_retrieval_score_finds_the_copying_head():
    model = copying_model()
    gen = torch.Generator().manual_seed(0)
    filler = torch.randint(20, VOCAB, (120,), generator=gen).tolist()
    ids = torch.tensor([0, *filler[:50], *NEEDLE, *filler[50:], 9])
    start = 51
    sample = Sample("copy", ids.numel(), 0.3, 0, ids, ("needle",), (Needle("needle", ((start, start + 5),)),), 5)
    kv, _ = prefill(model, ids[None])
    scores = sample_retrieval_scores(model, kv, sample)
    expected = torch.zeros(2, 3)
    expected[1, 1] = 1.0
    assert torch.equal(scores, expected)
    # the answer generated is the needle, so the score counted real copies
    assert generate(model, ids[None], "dense", max_new_tokens=5).sequences[0, -5:].tolist() == NEEDLE


def test_retrieval_score_counts_only_needle_tokens():
    model = copying_model()
    ids = torch.tensor([0, 25, 26, *NEEDLE, 27, 28, 9])
    outside = Sample("copy", ids.numel(), 0.5, 0, ids, ("x",), (Needle("x", ((0, 2),)),), 5)
    kv, _ = prefill(model, ids[None])
    assert float(sample_retrieval_scores(model, kv, outside).sum()) == 0.0  # copies happen outside this "needle"
    half = Sample("copy", ids.numel(), 0.5, 0, ids, ("x",), (Needle("x", ((3, 8),)),), 3)
    assert float(sample_retrieval_scores(model, kv, half)[1, 1]) == pytest.approx(3 / 5)  # 3 of 5 tokens copied


# --- the evaluate command ---


@pytest.fixture(scope="module")
def long_tiny_dir(tmp_path_factory):
    from attnsparse.core.tiny import save_tiny

    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"), tiny_llama(max_positions=2048))


def evaluate_cli(args: list[str]):
    import typer
    from typer.testing import CliRunner

    from attnsparse.cli.evaluate import evaluate_command

    app = typer.Typer()
    app.command("evaluate")(evaluate_command)
    app.callback()(lambda: None)
    return CliRunner().invoke(app, ["evaluate", *args])


def test_evaluate_command_runs_tasks_into_the_run_directory(long_tiny_dir, tmp_path):
    import json

    out = tmp_path / "run"
    result = evaluate_cli([long_tiny_dir, "--tasks", "passkey,common-words", "--lengths", "1200", "--depths", "0.5",
                           "--trials", "2", "--policies", "dense,topk:4", "--plans", "block:8:0.25", "--out", str(out),
                           "--no-progress"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["rows"] == []  # no --data: tasks only
    assert {(r["task"], r["policy"]) for r in data["tasks"]} == {
        (t, p) for t in ("passkey", "common-words") for p in ("dense", "topk:4", "plan:block:8:0.25")}
    assert set(data["tasks"][0]) == {"task", "length", "depth", "policy", "trials", "correct", "accuracy"}
    assert len(data["retrieval"]["per_head"]) == 2 * 4
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["tasks"]["prompt_form"] == "raw" and config["tasks"]["trials"] == 2
    names = {p.name for p in out.iterdir()}
    assert {"tasks_dense.png", "tasks_topk_4.png", "tasks_plan_block_8_0.25.png", "retrieval_heads.png",
            "report.html", "tasks_trials.jsonl"} <= names and "results.csv" not in names
    assert len((out / "tasks_trials.jsonl").read_text().splitlines()) == (2 + 2) * 3


def test_evaluate_tasks_without_policies_prefill_densely_only(long_tiny_dir, tmp_path):
    """The perplexity sweep (topk:8 ... topk:128) is not applied to tasks unless asked: each policy would be one more
    prefill of every prompt."""
    import json

    out = tmp_path / "run"
    result = evaluate_cli([long_tiny_dir, "--tasks", "passkey", "--lengths", "1200", "--depths", "0.5", "--trials", "1",
                           "--plans", "block:8:0.25", "--no-retrieval", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["tasks"]
    assert {r["policy"] for r in rows} == {"dense", "plan:block:8:0.25"}


@pytest.mark.parametrize("args, message", [
    (["--tasks", "passkey,niah"], "unknown task 'niah'"),
    (["--tasks", "passkey", "--lengths", "4096"], "exceeds the model's maximum"),
    (["--tasks", "passkey", "--depths", "0.5,1.5"], "depth 1.5 must be in [0, 1]"),
    (["--tasks", "passkey", "--lengths", "1200", "--chat-template"], "no chat template"),
    (["--quick", "--trials", "0"], "trials 0 must be >= 1"),
    (["--lengths", "1024"], "add --tasks or --quick"),
])
def test_evaluate_command_bad_task_options_are_one_line_before_any_write(long_tiny_dir, tmp_path, args, message):
    out = tmp_path / "run"
    result = evaluate_cli([long_tiny_dir, *args, "--out", str(out), "--no-progress"])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())


def test_quick_preset_fills_only_what_is_not_given():
    """--quick: every task at 1K and 4K, 2 trials, no retrieval scores; an explicit option wins over the preset."""
    from attnsparse.cli.evaluate import _task_options

    quick = _task_options(None, None, None, None, True, None, False, None, 0)
    assert (tuple(quick.lengths), quick.trials, quick.retrieval) == ((1024, 4096), 2, False)
    assert quick.tasks == "passkey,niah-multikey,niah-multivalue,variable-tracking,common-words"
    given = _task_options("passkey", "2048", None, 5, True, None, False, True, 0)
    assert (given.tasks, tuple(given.lengths), given.trials, given.retrieval) == ("passkey", (2048,), 5, True)
    assert _task_options("passkey", None, None, None, False, None, False, None, 0).retrieval is True
