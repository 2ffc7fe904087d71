"""--device and --dtype: names checked before any work, bfloat16 tracking float32 on the CPU, and every tensor of
the GPU code paths (torch row metrics, torch decode kernels, losses) made on the data's device, which the device
trap (tests/device_trap.py) checks on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attnsparse.attention.backend import sparse_attention
from attnsparse.cli.app import app
from attnsparse.core.devices import check_placement, resolve_device, resolve_dtype
from attnsparse.core.models import load_model
from attnsparse.core.tiny import save_tiny, tiny_llama
from attnsparse.errors import AttnsparseError
from tests.device_trap import device_trap

TEXT = "The quick brown fox jumps over the lazy dog; a stitch in time saves nine. " * 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("devices")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    return save_tiny(str(root / "tiny"), tiny_llama(max_positions=1024)), root / "text.txt"


def test_device_and_dtype_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu") and resolve_device("CPU") == torch.device("cpu")
    assert resolve_dtype(None) is torch.float32 and resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    for bad, words in (("cuda", "CUDA"), ("cuda:1", "CUDA"), ("gpu", "not a device"), ("xpu", "not supported")):
        with pytest.raises(AttnsparseError, match=words) as error:
            resolve_device(bad)
        assert "\n" not in str(error.value)
    with pytest.raises(AttnsparseError, match="float32, bfloat16 or float16"):
        resolve_dtype("int8")
    model = tiny_llama()
    check_placement(model, "cpu", "float32")
    with pytest.raises(AttnsparseError, match="is float32, not bfloat16"):
        check_placement(model, None, "bfloat16")  # a model passed in is never cast silently


@pytest.mark.parametrize("command", ["info", "measure", "evaluate", "generate", "condense", "run", "theory", "gate"])
def test_cuda_without_cuda_is_one_line_before_any_work(command: str, tiny: tuple[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    model, text = tiny
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was read before the device was checked")

    monkeypatch.setattr("attnsparse.core.models._load_directory", no_load)
    out = tmp_path / "out"
    extra = {"info": [], "measure": ["--out", str(out)], "evaluate": ["--out", str(out)],
             "generate": ["--prompt-file", str(text)], "condense": ["--out", str(out), "--data", str(text)],
             "run": ["--out", str(out)], "theory": ["--out", str(out)],
             "gate": ["--out", str(out), "--data", str(text)]}[command]
    target = [] if command == "theory" else [model]  # the lab simulates: no model
    result = CliRunner().invoke(app, [command, *target, *extra, "--device", "cuda"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda asks for CUDA"), result.output
    assert not out.exists()


def test_bfloat16_tracks_float32_on_cpu(tiny: tuple[str, Path], tmp_path: Path) -> None:
    """measure, evaluate (prefill policies and a decode plan) and generate in bfloat16 against float32: within
    bfloat16's rounding (8-bit mantissa, ~0.4% a step through a 2-layer model), and really in bfloat16."""
    from attnsparse.decode.generate import generate
    from attnsparse.evaluate.run import evaluate
    from attnsparse.measure.run import measure

    model, text = tiny
    ids = torch.randint(1, 90, (2, 128), generator=torch.Generator().manual_seed(0))
    stats, ppl, logits = {}, {}, {}
    for dtype in ("float32", "bfloat16"):
        profile = measure(model, ids, 128, 2, tmp_path / f"m-{dtype}", device="cpu", dtype=dtype, progress=False,
                          echo=None)
        assert json.loads((tmp_path / f"m-{dtype}" / "config.json").read_text())["config"]["dtype"] == dtype
        stats[dtype] = profile.head_stats()
        result = evaluate(model, str(text), 128, "dense,topk:8", 2, tmp_path / f"e-{dtype}", plans=["block:16:0.25"],
                          decode_tokens=8, device="cpu", dtype=dtype, progress=False)
        recorded = json.loads((tmp_path / f"e-{dtype}" / "config.json").read_text())["config"]
        assert (recorded["device"], recorded["dtype"]) == ("cpu", dtype)
        ppl[dtype] = {row.policy: row.perplexity for row in result.rows}
        loaded = load_model(model, dtype, device="cpu")
        assert next(loaded.model.parameters()).dtype == resolve_dtype(dtype)
        logits[dtype] = generate(loaded.model, ids[:1, :64], "block:16:0.25", max_new_tokens=1,
                                 keep_logits=True).logits[0]
    for name in ("topk_mass", "sink", "local", "stream"):
        torch.testing.assert_close(torch.from_numpy(stats["bfloat16"][name]), torch.from_numpy(stats["float32"][name]),
                                   atol=0.03, rtol=0.0, msg=name)
    torch.testing.assert_close(torch.from_numpy(stats["bfloat16"]["entropy"]),
                               torch.from_numpy(stats["float32"]["entropy"]), rtol=0.03, atol=0.0)
    assert ppl["bfloat16"].keys() == ppl["float32"].keys()
    for policy, value in ppl["float32"].items():
        assert ppl["bfloat16"][policy] == pytest.approx(value, rel=0.03), policy
    assert not torch.equal(logits["bfloat16"], logits["float32"])  # bfloat16 really ran
    torch.testing.assert_close(logits["bfloat16"], logits["float32"], atol=0.05, rtol=0.03)


def test_measure_device_path_stays_on_the_rows_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch row metrics (what a GPU runs) with every accumulator on the rows' device and no host copy; same
    profile as the CPU kernel's."""
    from attnsparse.measure import rowstats
    from attnsparse.measure.profile import Profile, ProfileConfig, Recorder

    model = tiny_llama()
    ids = torch.randint(1, 90, (1, 600), generator=torch.Generator().manual_seed(1))

    def profile_of() -> Profile:
        profile = Profile(ProfileConfig(ctx=600))
        with sparse_attention(model, "dense", observers=[Recorder(profile)]), torch.inference_mode():
            model(ids)
        return profile

    reference = profile_of()
    monkeypatch.setattr(rowstats, "host_rows", lambda rows: False)
    with device_trap() as copies:
        profile = profile_of()
    assert copies.calls == []
    for name in ("rows", "kcov_hist", "eps_k_sparse", "long_rows", "pos_rows"):
        assert torch.equal(profile.stacked(name), reference.stacked(name)), name
    for name in ("topk_sum", "entropy_sum", "stream_sum", "fit_sxy", "pos_logk"):
        torch.testing.assert_close(profile.stacked(name), reference.stacked(name), rtol=1e-5, atol=1e-7, msg=name)  # float32 rows


def _mixed_plan() -> object:
    """A plan whose layers hold two stores each (kv head 0 block top-k, kv head 1 streaming)."""
    from attnsparse.decode.plan import DecodePlan, parse_head_policy

    row = [parse_head_policy("block:16:0.25"), parse_head_policy("streaming:4:32")]
    return DecodePlan([list(row), list(row)])


@pytest.mark.parametrize("plan", ["dense", "topk:8", "block:16:0.25", "block:16:0.25:bound", "block:16:0.25:channels8",
                                  "streaming:4:32", "mixed"])
def test_decode_device_path_stays_on_the_cache_device(plan: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Generation through the torch decode kernels (what a GPU runs: SDPA and gathers), caches and stores made on the
    states' device and no host copy; the same tokens as outside the trap."""
    from attnsparse.decode import kernels
    from attnsparse.decode.generate import generate

    plan = _mixed_plan() if plan == "mixed" else plan  # type: ignore[assignment]

    monkeypatch.setattr(kernels, "_native_fits", lambda *args, **kwargs: False)
    model = tiny_llama(max_positions=1024)
    ids = torch.randint(1, 90, (1, 70), generator=torch.Generator().manual_seed(2))
    reference = generate(model, ids, plan, max_new_tokens=12).sequences
    with device_trap() as copies:
        result = generate(model, ids, plan, max_new_tokens=12)
    assert copies.calls == []
    assert torch.equal(result.sequences, reference)


def test_perplexity_and_decode_perplexity_stay_on_the_model_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from attnsparse.attention.policies import parse_policy
    from attnsparse.decode import kernels
    from attnsparse.decode.eval import decode_perplexity
    from attnsparse.evaluate.perplexity import perplexity

    monkeypatch.setattr(kernels, "_native_fits", lambda *args, **kwargs: False)
    model = tiny_llama()
    windows = torch.randint(1, 90, (2, 96), generator=torch.Generator().manual_seed(3))
    reference = [perplexity(model, windows, parse_policy(p), progress=False).nll_sum for p in ("dense", "topk:4")]
    decoded = [r.nll_sum for r in decode_perplexity(model, windows, ["block:16:0.25"], 8, progress=False)]
    with device_trap() as copies:
        got = [perplexity(model, windows, parse_policy(p), progress=False).nll_sum for p in ("dense", "topk:4")]
        got_decoded = [r.nll_sum for r in decode_perplexity(model, windows, ["block:16:0.25"], 8, progress=False)]
    assert copies.calls == []
    assert got == reference and got_decoded == decoded


@pytest.mark.parametrize("loss", ["tail:k=4", "tail:k=4 budget", "adaptive:alpha=1,C=0.5", "softcount:k=4", "entropy"])
def test_condensation_losses_stay_on_the_attention_device(loss: str) -> None:
    """The regularizer's forward and backward inside the trap: every loss term made where the attention rows are
    (with a per-head budget too, as `condense --budget` trains)."""
    from attnsparse.attention.policies import HeadBudget
    from attnsparse.condense.losses import CondensationRegularizer

    model = tiny_llama().train()
    ids = torch.randint(1, 90, (2, 48), generator=torch.Generator().manual_seed(4))
    regularizer = CondensationRegularizer(loss.removesuffix(" budget"))
    if loss.endswith("budget"):
        regularizer.budget = HeadBudget(((2, 3, 4, 5), (5, 4, 3, 2)))
    with device_trap() as copies, sparse_attention(model, "topk:8", observers=[regularizer], fast_dense=False):
        out = model(ids)
        total = out.logits.float().logsumexp(-1).mean() + regularizer.value()
        total.backward()
    assert copies.calls == []
    assert all(p.grad is not None for p in model.model.layers[0].self_attn.q_proj.parameters())


def test_theory_lab_rows_and_metrics_stay_on_the_config_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lab's generators, rows (Gaussian and X/W pipeline, fixed and growing) and per-row metrics through the
    torch row path (what a GPU runs) inside the trap: every tensor made on the config's device, no host copy, the
    same measurements as outside it."""
    from attnsparse.measure import rowstats
    from attnsparse.theory.lab import TheoryConfig, _generator, draw_head, measure_rows, scenario_rows, scenarios

    monkeypatch.setattr(rowstats, "host_rows", lambda rows: False)
    cfg = TheoryConfig(n=[96, 160], sigmas=[2.0], growth=[0.5], sigma_x=[1.0], rows=16, d=8, device="cpu")

    def lab_rows() -> list[dict[str, torch.Tensor]]:
        head = draw_head(cfg, _generator(cfg, 7))
        return [measure_rows(scenario_rows(sc, i, 128, cfg, head)[0], cfg) for i, sc in enumerate(scenarios(cfg))]

    reference = lab_rows()
    with device_trap() as copies:
        got = lab_rows()
    assert copies.calls == []
    assert len(got) == 4
    for measured, expected in zip(got, reference):
        assert measured.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(measured[key], value), key


def test_gate_features_and_training_step_stay_on_the_model_device() -> None:
    """The gate's recorder (block-pooled targets, pooled queries/keys), its initialisation, the Adam steps and the
    mean-key baseline inside the trap: no host copy, the same features and the same trained gate as outside."""
    from attnsparse.core.models import ModelShape
    from attnsparse.gate.model import BlockGate, GateConfig
    from attnsparse.gate.train import collect_features, fit_gate, mean_key_kl, stack_windows

    model = tiny_llama()
    shape = ModelShape.of(model)
    config = GateConfig(shape.need("layers"), shape.need("heads"), shape.need("kv_heads"), shape.need("head_dim"),
                        block=8, rank=4)
    ids = torch.randint(1, 90, (2, 48), generator=torch.Generator().manual_seed(5))

    def trained() -> tuple[list[torch.Tensor], BlockGate, float]:
        features = stack_windows([collect_features(model, ids[i:i + 1], 8, offset=16 * i) for i in range(2)])
        gate = fit_gate(BlockGate(config, seed=1), features, steps=3, lr=1e-2)
        return [t for layer in features for t in (layer.target, layer.pooled_q, layer.pooled_k)], gate, \
            mean_key_kl(features, config.head_dim**-0.5)

    features, gate, baseline = trained()
    with device_trap() as copies:
        got_features, got_gate, got_baseline = trained()
    assert copies.calls == []
    assert all(torch.equal(a, b) for a, b in zip(got_features, features))
    assert torch.equal(got_gate.wq, gate.wq) and torch.equal(got_gate.wk, gate.wk) and got_baseline == baseline
