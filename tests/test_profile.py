"""Profile accumulators: brute force over eager attention of a GQA model, chunk/batch invariance, merging."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from attnsparse.attention.backend import sparse_attention
from attnsparse.core.tiny import tiny_llama
from attnsparse.measure.profile import (
    Profile,
    ProfileConfig,
    ProfileView,
    Recorder,
    coverage_key,
    density,
    fit_from_sums,
)

CTX = 48
CONFIG = ProfileConfig(ctx=CTX, ks=(1, 2, 4, 8, 32, 64), deltas=(0.01, 0.05, 0.1), eps=(1e-2, 1e-1),
                       sink_tokens=2, local_window=8, fit_min_n=4, stream_delta=0.1)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama(seed=3, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 97, (3, CTX), generator=torch.Generator().manual_seed(1))


def run_profile(model, ids, *, query_chunk=None, batch=3, config=CONFIG) -> Profile:  # type: ignore[no-untyped-def]
    profile = Profile(config, model="tiny", kv_heads=2)
    recorder = Recorder(profile)
    with torch.inference_mode(), sparse_attention(model, "dense", observers=[recorder], query_chunk=query_chunk):
        for start in range(0, ids.shape[0], batch):
            model(ids[start:start + batch])
    profile.windows = ids.shape[0]
    return profile


def eager_attentions(model, ids) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    """Reference rows from transformers' own eager attention: per layer (B, H, Q, K) float64 (GQA repeated)."""
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(ids, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return [a.to(torch.float64).numpy() for a in out.attentions]


def brute_head(rows: np.ndarray, cfg: ProfileConfig) -> dict[str, object]:
    """Per-head aggregates by loops over rows (B, Q, K) of one head."""
    ks_list, deltas = cfg.ks, cfg.deltas
    kcov: dict[float, list[int]] = {d: [] for d in deltas}
    top = {k: [] for k in ks_list}
    sparse = {(e, k): [] for e in cfg.eps for k in ks_list}
    ent, sink, local, stream_long, xs, ys = [], [], [], [], [], []
    for b in range(rows.shape[0]):
        for i in range(rows.shape[1]):
            row, n = rows[b, i], i + 1
            srt = sorted(row.tolist(), reverse=True)
            for k in ks_list:
                top[k].append(sum(srt[:k]))
            for d in deltas:
                acc, k_d = 0.0, n
                for j, p in enumerate(srt[:n]):
                    acc += p
                    if acc >= 1 - d:
                        k_d = j + 1
                        break
                kcov[d].append(k_d)
            for e in cfg.eps:
                above = sum(p > e for p in row.tolist())
                for k in ks_list:
                    sparse[(e, k)].append(above <= k)
            ent.append(-sum(p * math.log(p) for p in row.tolist() if p > 0))
            sink.append(sum(row[: cfg.sink_tokens]))
            local.append(sum(row[j] for j in range(n) if i - cfg.local_window < j <= i))
            if n > cfg.sink_tokens + cfg.local_window:
                stream_long.append(sum(row[j] for j in range(n) if j < cfg.sink_tokens or i - cfg.local_window < j))
            if n >= cfg.fit_min_n:
                xs.append(math.log(n))
                ys.append(math.log(kcov[cfg.fit_delta][-1]))
    return {"kcov": kcov, "top": top, "sparse": sparse, "ent": ent, "sink": sink, "local": local,
            "stream_long": stream_long, "xs": xs, "ys": ys}


def test_recorder_matches_brute_force_on_gqa_model(model, ids) -> None:  # type: ignore[no-untyped-def]
    profile = run_profile(model, ids, query_chunk=7)
    data = profile.to_dict()
    attn = eager_attentions(model, ids)
    assert data["layers"] == 2 and data["heads"] == 4 and data["kv_heads"] == 2
    for entry in data["per_head"]:
        layer, head = entry["layer"], entry["head"]
        assert entry["kv_head"] == head // 2
        ref = brute_head(attn[layer][:, head], CONFIG)
        assert entry["rows"] == ids.numel()
        for d in CONFIG.deltas:
            got = entry["k_at_coverage"][coverage_key(d)]
            ks = np.array(ref["kcov"][d])
            assert got["mean"] == pytest.approx(ks.mean(), abs=0.02)
            assert got["p50"] == pytest.approx(np.quantile(ks, 0.5, method="inverted_cdf"), abs=1)
            assert got["p90"] == pytest.approx(np.quantile(ks, 0.9, method="inverted_cdf"), abs=1)
            assert got["max"] == ks.max()
        for k in CONFIG.ks:
            assert entry["topk_mass"][str(k)] == pytest.approx(np.mean(ref["top"][k]), abs=1e-5)
            longer = [1 - m for m, n in zip(ref["top"][k], list(range(1, CTX + 1)) * ids.shape[0]) if n > k]
            expected = np.mean(longer) if longer else None
            assert entry["tail_mass_long_rows"][str(k)] == pytest.approx(expected, abs=1e-5)
            for e in CONFIG.eps:
                frac = entry["eps_k_sparse_fraction"][f"{e:g}"][str(k)]
                assert frac == pytest.approx(np.mean(ref["sparse"][(e, k)]), abs=0.01)
        assert entry["entropy"] == pytest.approx(np.mean(ref["ent"]), abs=1e-4)
        assert entry["effective_support"] == pytest.approx(np.mean(np.exp(ref["ent"])), rel=1e-4)
        assert entry["sink_mass"] == pytest.approx(np.mean(ref["sink"]), abs=1e-5)
        assert entry["local_mass"] == pytest.approx(np.mean(ref["local"]), abs=1e-5)
        assert entry["sink_local_mass"] == pytest.approx(np.mean(ref["stream_long"]), abs=1e-5)
        slope, _ = np.polyfit(ref["xs"], ref["ys"], 1)
        r2 = np.corrcoef(ref["xs"], ref["ys"])[0, 1] ** 2
        assert entry["C"] == pytest.approx(slope, abs=0.02)
        assert entry["C_r2"] == pytest.approx(r2, abs=0.02)
        assert entry["C_points"] == len(ref["xs"])
        stream = np.mean(ref["stream_long"]) >= 1 - CONFIG.stream_delta
        assert entry["class"] == ("streaming" if stream else "other")


def _close(a: object, b: object, path: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-4), path
    else:
        assert a == b, path


def test_results_do_not_depend_on_query_chunk_or_window_batching(model, ids) -> None:  # type: ignore[no-untyped-def]
    base = run_profile(model, ids, query_chunk=None, batch=3).to_dict()
    for chunk, batch in [(3, 1), (16, 2)]:
        _close(base, run_profile(model, ids, query_chunk=chunk, batch=batch).to_dict())


def test_profile_view_reads_back_what_the_profile_writes(model, ids, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = run_profile(model, ids, query_chunk=8).to_dict()
    view = ProfileView.from_dict(data)
    assert (view.layers, view.heads, view.kv_heads, view.ctx) == (data["layers"], data["heads"], data["kv_heads"],
                                                                  data["ctx"])
    assert [(h.layer, h.head, h.kind, h.C) for h in view.per_head] == [
        (e["layer"], e["head"], e["class"], e["C"]) for e in data["per_head"]]
    assert view.coverage_keys == [coverage_key(d) for d in CONFIG.deltas]
    again = ProfileView.read_json(view.to_json(tmp_path / "profile.json"))
    assert again.data == json.loads(json.dumps(data)) and again.per_head[5].k_at_coverage == view.per_head[5].k_at_coverage


def test_merging_halves_equals_one_pass(model, ids, tmp_path) -> None:  # type: ignore[no-untyped-def]
    whole = run_profile(model, ids, query_chunk=8)
    first = run_profile(model, ids[:1], query_chunk=8)
    second = run_profile(model, ids[1:], query_chunk=8)
    merged = first.merge(second)
    for layer, acc in whole.accumulators.items():
        for name, value in acc.t.items():
            other = merged.accumulators[layer].t[name]
            if value.dtype.is_floating_point:
                assert torch.allclose(value, other, rtol=1e-9, atol=1e-9), name
            else:
                assert torch.equal(value, other), name
    assert merged.windows == 3
    path = tmp_path / "state.npz"
    merged.save_state(path)
    again = Profile.load_state(path, CONFIG, model="tiny")
    _close(merged.to_dict(), again.to_dict())


def test_merge_refuses_other_configs(model, ids) -> None:  # type: ignore[no-untyped-def]
    from attnsparse.errors import AttnsparseError

    a = run_profile(model, ids[:1])
    b = run_profile(model, ids[:1], config=ProfileConfig(ctx=CTX))
    with pytest.raises(AttnsparseError, match="different configs"):
        a.merge(b)


def test_fit_from_sufficient_statistics_matches_polyfit() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 5, 200)
    y = 0.4 * x + 0.3 + rng.normal(0, 0.2, 200)
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    slope, intercept, r2 = fit_from_sums(t(200.0), t(x.sum()), t((x * x).sum()), t(y.sum()), t((y * y).sum()),
                                         t((x * y).sum()))
    ref_slope, ref_intercept = np.polyfit(x, y, 1)
    assert float(slope) == pytest.approx(ref_slope, rel=1e-9)
    assert float(intercept) == pytest.approx(ref_intercept, rel=1e-9)
    assert float(r2) == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, rel=1e-9)
    # constant y: slope 0, R² undefined; a single x: slope undefined
    s0, _, r0 = fit_from_sums(t(3.0), t(3.0), t(5.0), t(0.0), t(0.0), t(0.0))
    assert float(s0) == 0.0 and math.isnan(float(r0))
    s1, _, _ = fit_from_sums(t(3.0), t(3.0), t(3.0), t(1.0), t(1.0), t(1.0))
    assert math.isnan(float(s1))


def test_streaming_head_is_classified_streaming() -> None:
    """Synthetic chunks: head 0 puts all mass on the sink and the diagonal, head 1 spreads it uniformly."""
    from attnsparse.attention.backend import AttentionChunk

    ctx = 64
    cfg = ProfileConfig(ctx=ctx, sink_tokens=1, local_window=4)
    profile = Profile(cfg)
    recorder = Recorder(profile)
    pos = torch.arange(ctx)
    visible = (torch.arange(ctx)[None, :] <= pos[:, None])[None, None]
    probs = torch.zeros(1, 2, ctx, ctx)
    probs[0, 0, :, 0] = 0.5
    probs[0, 0, pos, pos] += 0.5
    probs[0, 1] = visible[0, 0].float() / (pos[:, None] + 1).float()
    recorder(AttentionChunk(0, probs, visible, pos, None, 1))
    classes = [h["class"] for h in profile.to_dict()["per_head"]]
    assert classes == ["streaming", "other"]
    heads = profile.to_dict()["per_head"]
    assert heads[0]["k_at_coverage"]["0.95"]["max"] == 2
    assert heads[1]["C"] == pytest.approx(1.0, abs=0.02)  # uniform rows: k_{0.95} ≈ 0.95 n


def test_density_matches_definition() -> None:
    assert density(1, 4) == pytest.approx(4 / 10)
    assert density(2, 4) == pytest.approx((1 + 2 + 2 + 2) / 10)
    assert density(8, 4) == 1.0


def test_config_validation() -> None:
    from attnsparse.errors import AttnsparseError

    with pytest.raises(AttnsparseError, match=">= 1"):
        ProfileConfig(ctx=16, ks=(0, 4))
    with pytest.raises(AttnsparseError, match="deltas"):
        ProfileConfig(ctx=16, deltas=(0.0,))
    with pytest.raises(AttnsparseError, match="fit delta"):
        ProfileConfig(ctx=16, deltas=(0.01,))
    assert ProfileConfig(ctx=12).ks == (1, 2, 4, 8, 12)
    assert ProfileConfig.from_dict(ProfileConfig(ctx=12).to_dict()) == ProfileConfig(ctx=12)
