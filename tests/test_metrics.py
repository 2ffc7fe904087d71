"""Every metric in attnsparse.measure.rowstats against the brute-force row metrics of tests/reference.py."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnsparse.measure import rowstats as M
from tests import reference as R

DELTAS = (0.01, 0.05, 0.1)
EPS = (1e-3, 1e-2, 1e-1)
KS = (1, 2, 3, 4, 8, 16, 64)


def softmax_rows(logits: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The backend's convention: softmax over visible keys, exactly 0 elsewhere, all-zero rows with none."""
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


@st.composite
def causal_rows(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of causal rows over K keys: row r is query position pos[r] (n = pos + 1), some rows padded."""
    keys = draw(st.integers(1, 40))
    rows = draw(st.integers(1, 6))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0, 10.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, keys, generator=gen) * scale
    if draw(st.booleans()):  # ties: round the logits so many entries share a value
        logits = torch.round(logits)
    pos = torch.tensor([draw(st.integers(0, keys - 1)) for _ in range(rows)])
    visible = torch.arange(keys)[None, :] <= pos[:, None]
    padded = torch.tensor([draw(st.booleans()) and draw(st.booleans()) for _ in range(rows)])
    visible &= ~padded[:, None]
    return softmax_rows(logits, visible), visible, pos


def check_rows(probs: torch.Tensor, visible: torch.Tensor, pos: torch.Tensor, ks=KS, s: int = 2, w: int = 3) -> None:
    spec = M.MetricSpec(ks=tuple(ks), deltas=DELTAS, eps=EPS, sink_tokens=s, local_window=w)
    got = M.row_metrics(probs, visible, pos, spec)
    rows64 = probs.to(torch.float64).numpy()
    for r in range(probs.shape[0]):
        row, n = rows64[r], int(visible[r].sum())
        assert int(got.n[r]) == n
        if n == 0:
            continue  # padded rows are skipped by the recorder; no value is promised
        for j, k in enumerate(ks):
            assert float(got.topk_mass[r, j]) == pytest.approx(R.top_mass(row, k), abs=1e-9)
        for j, d in enumerate(DELTAS):
            # float rounding may move m_k across 1 - δ only when it sits within 1e-9 of it
            lo, hi = R.k_at_coverage(row, d - 1e-9, n), R.k_at_coverage(row, d + 1e-9, n)
            assert hi <= int(got.k_cov[r, j]) <= lo
        for j, e in enumerate(EPS):
            assert int(got.count_above[r, j]) == R.count_above(row, e)
        assert float(got.entropy[r]) == pytest.approx(R.entropy(row), abs=1e-5)
        i = int(pos[r])
        assert float(got.sink[r]) == pytest.approx(R.sink_mass(row, s), abs=1e-9)
        assert float(got.local[r]) == pytest.approx(R.local_mass(row, i, w), abs=1e-9)
        assert float(got.streaming[r]) == pytest.approx(R.streaming_mass(row, i, s, w), abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(causal_rows())
def test_row_metrics_match_brute_force(case: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    check_rows(*case)


@settings(max_examples=60, deadline=None)
@given(causal_rows(), st.integers(1, 50), st.integers(0, 6), st.integers(1, 8))
def test_single_metric_functions_match_brute_force(case, k: int, s: int, w: int) -> None:  # type: ignore[no-untyped-def]
    probs, visible, pos = case
    rows64 = probs.to(torch.float64).numpy()
    top = M.topk_mass(probs, [k])
    tail = M.tail_mass(probs, [k])
    kc = M.k_at_coverage(probs, DELTAS, visible)
    sparse = M.eps_k_sparse(probs, EPS, [k])
    ent = M.entropy(probs)
    for r in range(probs.shape[0]):
        n = int(visible[r].sum())
        if n == 0:
            continue
        row = rows64[r]
        assert float(top[r, 0]) == pytest.approx(R.top_mass(row, k), abs=1e-9)
        assert float(tail[r, 0]) == pytest.approx(R.tail_mass(row, k), abs=1e-6)
        for j, d in enumerate(DELTAS):
            assert R.k_at_coverage(row, d + 1e-9, n) <= int(kc[r, j]) <= R.k_at_coverage(row, d - 1e-9, n)
        for j, e in enumerate(EPS):
            assert bool(sparse[r, j, 0]) == (R.count_above(row, e) <= k)
        assert float(ent[r]) == pytest.approx(R.entropy(row), abs=1e-5)
        assert float(M.sink_mass(probs[r], s)) == pytest.approx(R.sink_mass(row, s), abs=1e-9)
        assert float(M.local_mass(probs[r], pos[r], w)) == pytest.approx(R.local_mass(row, int(pos[r]), w), abs=1e-9)


def test_rows_shorter_than_k_have_full_mass_and_no_tail() -> None:
    probs = softmax_rows(torch.randn(3, 5), torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]).bool())
    top = M.topk_mass(probs, [4, 8, 100])
    assert torch.allclose(top[:2], torch.ones(2, 3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(top[2, 1:], torch.ones(2, dtype=torch.float64), atol=1e-6)
    assert float(M.tail_mass(probs, [100]).max()) <= 1e-6


def test_ties_and_uniform_rows() -> None:
    n = 10
    probs = torch.full((1, n), 1.0 / n)
    assert M.topk_mass(probs, [3])[0, 0].item() == pytest.approx(0.3)
    # uniform over 10: k_{0.95} = 10 (9 keys hold 0.9), k_{0.9} = 9
    kc = M.k_at_coverage(probs, (0.05, 0.1))
    assert kc[0].tolist() == [10, 9]
    assert M.entropy(probs)[0].item() == pytest.approx(math.log(n), rel=1e-6)


def test_one_hot_row() -> None:
    probs = torch.zeros(1, 8)
    probs[0, 5] = 1.0
    visible = torch.ones(1, 8, dtype=torch.bool)
    assert M.k_at_coverage(probs, DELTAS, visible)[0].tolist() == [1, 1, 1]
    assert M.entropy(probs)[0].item() == 0.0
    assert M.count_above(probs, EPS)[0].tolist() == [1, 1, 1]


def test_gqa_shaped_block_and_large_rows_use_threads() -> None:
    """(B, H, Qc, K) blocks with a (B, 1, Qc, K) mask (what the backend passes), big enough to sort in threads."""
    torch.manual_seed(0)
    batch, heads, queries, keys = 2, 4, 64, 4200
    positions = torch.arange(keys - queries, keys)
    visible = (torch.arange(keys)[None, :] <= positions[:, None])[None, None].expand(batch, 1, -1, -1)
    logits = torch.randn(batch, heads, queries, keys) * 2
    probs = softmax_rows(logits, visible)
    spec = M.MetricSpec(ks=(1, 16, 4096, 8192), deltas=DELTAS, eps=EPS, sink_tokens=4, local_window=64)
    got = M.row_metrics(probs, visible, positions, spec)
    assert got.topk_mass.shape == (batch, heads, queries, 4)
    assert got.n.shape == (batch, heads, queries)
    rows64 = probs.to(torch.float64).numpy()
    for b, h, q in [(0, 0, 0), (1, 3, 63), (0, 2, 17)]:
        row, n = rows64[b, h, q], int(positions[q]) + 1
        assert int(got.n[b, h, q]) == n
        srt = np.sort(row)[::-1]
        for j, k in enumerate(spec.ks):
            assert float(got.topk_mass[b, h, q, j]) == pytest.approx(srt[:k].sum(), abs=1e-9)
        cum = np.cumsum(srt)
        for j, d in enumerate(DELTAS):
            assert int(got.k_cov[b, h, q, j]) == int(np.searchsorted(cum, 1 - d)) + 1


def test_default_ks_and_bad_k_lists() -> None:
    assert M.default_ks(8) == (1, 2, 4, 8)
    assert M.default_ks(12) == (1, 2, 4, 8, 12)
    with pytest.raises(ValueError):
        M.topk_mass(torch.ones(1, 3) / 3, [])
    with pytest.raises(ValueError):
        M.topk_mass(torch.ones(1, 3) / 3, [0])


# ---- the selection path (CPU row_metrics without a full sort) against the sort path ------------------------------
def sort_path(probs: torch.Tensor, visible: torch.Tensor, spec: M.MetricSpec):  # type: ignore[no-untyped-def]
    """The reference: one full sort + sequential float64 cumsum per row (`sort_rows` and the *_from_sorted)."""
    rows = probs.reshape(-1, probs.shape[-1])
    srt = M.sort_rows(rows)
    n = visible.expand(probs.shape).sum(-1).reshape(-1)
    return (M.topk_mass_from_sorted(srt, spec.ks), M.k_at_coverage_from_sorted(srt, spec.deltas, n),
            M.count_above_from_sorted(srt, spec.eps), srt.entropy)


def assert_same_as_sort_path(probs: torch.Tensor, visible: torch.Tensor, pos: torch.Tensor, spec: M.MetricSpec) -> None:
    got = M.row_metrics(probs, visible, pos, spec)
    top, kcov, above, ent = sort_path(probs, visible, spec)
    valid = visible.expand(probs.shape).sum(-1).reshape(-1) > 0
    assert torch.equal(got.k_cov.reshape(-1, len(spec.deltas))[valid], kcov[valid])
    assert torch.equal(got.count_above.reshape(-1, len(spec.eps)), above)
    assert float((got.topk_mass.reshape(-1, len(spec.ks)) - top).abs().max()) < 1e-9
    assert float((got.entropy.reshape(-1) - ent).abs().max()) < 1e-6


@st.composite
def wide_rows(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal chunks with ties (rounded logits), exact duplicates, zeros, padded rows and flat or peaked rows."""
    keys = draw(st.integers(1, 300))
    rows = draw(st.integers(1, 8))
    scale = draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0, 3.0, 10.0, 40.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = torch.randn(rows, keys, generator=gen) * scale
    if draw(st.booleans()):
        logits = torch.round(logits * draw(st.sampled_from([1.0, 4.0, 64.0]))) / 4.0
    first = draw(st.integers(0, keys - 1))
    pos = torch.clamp(torch.arange(first, first + rows), max=keys - 1)
    visible = torch.arange(keys)[None, :] <= pos[:, None]
    padded = torch.tensor([draw(st.booleans()) and draw(st.booleans()) for _ in range(rows)])
    visible &= ~padded[:, None]
    return softmax_rows(logits, visible), visible, pos


HAVE_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the numpy paths are used (and tested)")
@pytest.mark.usefixtures("kernel_build")
def test_native_kernel_builds_here() -> None:
    """With a C compiler the bucket kernel builds, so the tests below exercise it; the numpy paths stay tested."""
    assert M._native_rowstats() is not None


@settings(max_examples=300, deadline=None)
@given(wide_rows(), st.sampled_from([(1, 2, 3, 4, 8, 16, 64), (1, 5, 63, 64, 65, 100, 128, 129, 1000)]),
       st.booleans())
def test_selection_path_equals_sort_path(case, ks, native) -> None:  # type: ignore[no-untyped-def]
    """Both no-sort paths (C bucket kernel, numpy radix order) equal the full sort, ties and zeros included."""
    probs, visible, pos = case
    spec = M.MetricSpec(ks=ks, deltas=(0.001, 0.01, 0.05, 0.1, 0.5), eps=(1e-6, 1e-3, 1e-2, 0.1, 0.5))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M, "_SELECT_MIN_WIDTH", 1)  # use the selection path at every width
        if not native:
            mp.setattr(M, "_native_rowstats", lambda: None)
        assert_same_as_sort_path(probs, visible, pos, spec)
        check_rows(probs, visible, pos, ks=ks)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.usefixtures("kernel_build")
def test_selection_path_on_realistic_chunks_and_fallbacks(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """Long causal chunks (sink column, flat and peaked heads), uniform rows, and values outside [0, 2)."""
    if not native:
        monkeypatch.setattr(M, "_native_rowstats", lambda: None)
    gen = torch.Generator().manual_seed(5)
    keys, queries = 3000, 40
    pos = torch.arange(keys - queries, keys)
    visible = (torch.arange(keys)[None, :] <= pos[:, None])[None, None]
    logits = torch.randn(1, 4, queries, keys, generator=gen) * torch.tensor([0.3, 2.0, 8.0, 2.0]).view(1, 4, 1, 1)
    logits[:, 3, :, 0] += 8.0
    spec = M.MetricSpec(ks=M.default_ks(keys))
    assert_same_as_sort_path(softmax_rows(logits, visible), visible, pos, spec)
    uniform = softmax_rows(torch.zeros(1, 2, queries, keys), visible)
    assert_same_as_sort_path(uniform, visible, pos, spec)
    monkeypatch.setattr(M, "_BLOCK_ELEMENTS", keys * 7)  # several blocks, the last one short
    assert_same_as_sort_path(softmax_rows(logits, visible), visible, pos, spec)
    odd = torch.rand(1, 1, queries, keys, generator=gen) * 3 - 0.5  # not probabilities: the sort path is used
    assert_same_as_sort_path(odd * visible, visible, pos, spec)
