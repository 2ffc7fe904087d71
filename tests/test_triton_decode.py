"""The Triton block top-k decode kernels (decode/triton_block.py) against brute force and the CPU kernel.

Without CUDA they run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before anything imports Triton); on a GPU the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and Triton's interpreter not chosen (tests/conftest.py sets TRITON_INTERPRET=1)",
                allow_module_level=True)
pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[gpu]')")

from attnsparse.decode import kernels as K
from attnsparse.decode import triton_block as T
from tests.reference import attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def blocks_and_sums(batch: int, heads: int, capacity: int, size: int, dim: int, n: int, seed: int,
                    integer: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key and value blocks (B, h, capacity, size, D) and the key sums of the first n tokens (zero beyond)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, capacity, size, dim)
    keys = torch.randint(-1, 2, shape, generator=gen).float() if integer else torch.randn(shape, generator=gen)
    values = torch.randn(shape, generator=gen)
    sums = torch.zeros(batch, heads, capacity, dim)
    sums[:, :, : -(-n // size)] = K.block_sums(keys, n)
    return keys, values, sums


def brute_block_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, n: int,
                          scaling: float) -> torch.Tensor:
    """Per (batch, kv head), every query head attends to the tokens < n of the listed blocks, in float64."""
    batch, heads, groups, dim = q.shape
    size = keys.shape[-2]
    out = torch.empty(batch, heads, groups, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            tokens = (index[b, h].cpu().unsqueeze(-1) * size + torch.arange(size)).flatten()
            tokens = tokens[tokens < n]
            k = keys[b, h].reshape(-1, dim)[tokens].double()
            v = values[b, h].reshape(-1, dim)[tokens].double()
            out[b, h] = attention(q[b, h].double().cpu()[None, None], k[None, None], v[None, None], scaling)[0, 0]
    return out


def lower_first_picks(scores: torch.Tensor, count: int, sink: int, recent: int) -> torch.Tensor:
    """Brute-force selection, ascending: sink and recent blocks, then the best scores, ties to the lower block."""
    out = []
    for row in scores.reshape(-1, scores.shape[-1]).tolist():
        blocks = len(row)
        forced = [b < sink or b >= blocks - recent for b in range(blocks)]
        order = sorted(range(blocks), key=lambda b: (not forced[b], -row[b], b))
        out.append(sorted(order[:count]))
    return torch.tensor(out).view(*scores.shape[:-1], count)


@pytest.mark.parametrize(("groups", "dim", "n"), [(3, 32, 200), (4, 24, 129), (1, 64, 16)])
def test_scores_equal_the_mean_key_scores(groups, dim, n):
    """q . (key sum of each block), max over the group's heads: the scores `kernels.block_means` gives."""
    _, _, sums = blocks_and_sums(2, 2, 16, 16, dim, n, seed=n)
    q = torch.randn(2, 2, groups, dim, generator=torch.Generator().manual_seed(1))
    blocks = -(-n // 16)
    expected = (sums[:, :, :blocks].double() @ q.double().transpose(-1, -2)).amax(dim=-1)
    got = T.mean_scores(q.to(DEVICE), sums.to(DEVICE), blocks).cpu().double()
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(("blocks", "count", "sink", "recent"), [(40, 7, 1, 2), (13, 12, 0, 1), (300, 20, 3, 4),
                                                                 (9, 3, 1, 2)])
def test_selection_is_exact_with_ties_lower_block_first(blocks, count, sink, recent):
    """Integer scores with many ties (and negatives): the picks are brute force's, ties going to the lower block."""
    gen = torch.Generator().manual_seed(blocks)
    scores = torch.randint(-3, 3, (2, 3, blocks), generator=gen).float()
    got = T.select(scores.to(DEVICE), count, sink, recent).cpu()
    assert torch.equal(got, lower_first_picks(scores, count, sink, recent))


def test_selection_keeps_every_block_when_the_budget_covers_the_context():
    scores = torch.randn(1, 2, 5)
    assert torch.equal(T.select(scores.to(DEVICE), 9, 1, 2).cpu(), torch.arange(5).expand(1, 2, 5))


@pytest.mark.parametrize(("groups", "dim", "size", "n", "count", "splits"),
                         [(3, 32, 16, 200, 6, 2), (4, 24, 8, 101, 9, 3), (1, 64, 32, 64, 2, 1), (2, 16, 16, 33, 3, 4)])
def test_attention_over_given_blocks_equals_brute_force(groups, dim, size, n, count, splits):
    """Split-K attention over the listed blocks (last block partly filled when n is not a multiple of the block)."""
    keys, values, _ = blocks_and_sums(2, 2, 16, size, dim, n, seed=n)
    q = torch.randn(2, 2, groups, dim, generator=torch.Generator().manual_seed(2))
    blocks = -(-n // size)
    gen = torch.Generator().manual_seed(3)
    index = torch.stack([torch.randperm(blocks - 1, generator=gen)[: count - 1] for _ in range(4)]).view(2, 2, -1)
    index = torch.cat([index, torch.full((2, 2, 1), blocks - 1)], dim=-1)  # the partly filled last block
    got = T.attend(q.to(DEVICE), keys.to(DEVICE), values.to(DEVICE), index.to(DEVICE), n, 0.2, splits=splits)
    expected = brute_block_attention(q, keys, values, index, n, 0.2)
    assert torch.allclose(got.cpu().double(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("n", "count"), [(1000, 8), (997, 8), (40, 8), (250, 100)])
def test_whole_step_equals_the_cpu_kernel(n, count):
    """Scores + selection + attention give the CPU path's result (the C kernel where it builds, else torch's
    block_means + select_blocks + block_decode); count >= the blocks of the context reads everything."""
    keys, values, sums = blocks_and_sums(1, 3, 64, 16, 32, n, seed=n)
    q = torch.randn(1, 3, 3, 32, generator=torch.Generator().manual_seed(4))
    cpu = K.mean_block_decode(q, keys, values, sums, n, count, 1, 2, 0.125)
    if cpu is None:
        index = K.select_blocks(K.block_means(q, sums[:, :, : -(-n // 16)]), count, 1, 2)
        cpu = K.block_decode(q, keys, values, index, n, 0.125)
    got = T.mean_block_decode(q.to(DEVICE), keys.to(DEVICE), values.to(DEVICE), sums.to(DEVICE), n, count, 1, 2,
                              0.125, splits=3)
    assert torch.allclose(got.cpu(), cpu, atol=2e-5, rtol=1e-4)
    if count * 16 >= n:
        dense = attention(q.double(), keys.flatten(2, 3)[:, :, :n].double(), values.flatten(2, 3)[:, :, :n].double(),
                          0.125)
        assert torch.allclose(got.cpu().double(), dense, atol=2e-5, rtol=1e-4)


def test_ties_pick_the_blocks_the_cpu_kernel_picks():
    """Integer keys and queries: exact scores, many ties at the threshold. Same blocks => the CPU kernel's result
    (other blocks would give other values)."""
    n, count = 64 * 16, 12
    keys, values, sums = blocks_and_sums(1, 2, 64, 16, 16, n, seed=5, integer=True)
    q = torch.randint(-1, 2, (1, 2, 2, 16), generator=torch.Generator().manual_seed(6)).float()
    index = lower_first_picks(K.block_means(q, sums), count, 1, 2)
    expected = brute_block_attention(q, keys, values, index, n, 0.125)
    got = T.mean_block_decode(q.to(DEVICE), keys.to(DEVICE), values.to(DEVICE), sums.to(DEVICE), n, count, 1, 2,
                              0.125)
    assert torch.allclose(got.cpu().double(), expected, atol=2e-5, rtol=1e-4)
    cpu = K.mean_block_decode(q, keys, values, sums, n, count, 1, 2, 0.125)
    if cpu is not None:
        assert torch.allclose(got.cpu(), cpu, atol=2e-5, rtol=1e-4)


def test_half_precision_inputs_match_float32_within_half_rounding():
    """float16 queries, keys and values (the GPU's usual dtype): within float16 rounding of the float32 result."""
    n, count = 300, 6
    keys, values, sums = blocks_and_sums(1, 2, 32, 16, 32, n, seed=8)
    q = torch.randn(1, 2, 4, 32, generator=torch.Generator().manual_seed(9))
    index = lower_first_picks(K.block_means(q, sums[:, :, :19]), count, 1, 2)
    half = [t.half().to(DEVICE) for t in (q, keys, values)]
    got = T.attend(*half, index.to(DEVICE), n, 0.125, splits=2)
    assert got.dtype == torch.float16
    expected = brute_block_attention(q, keys, values, index, n, 0.125)
    assert torch.allclose(got.cpu().double(), expected, atol=1e-2, rtol=1e-2)


def test_fits_only_power_of_two_blocks_and_one_dtype():
    q, kb = torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 4, 16, 8)
    assert T.fits(q, kb, kb)
    assert not T.fits(q, torch.zeros(1, 1, 4, 12, 8), torch.zeros(1, 1, 4, 12, 8))
    assert not T.fits(q.double(), kb.double(), kb.double())
    assert not T.fits(q.half(), kb, kb)
    assert K.gpu_kernels(q, kb, kb) is None  # CPU tensors keep the C kernels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the dispatch to Triton is for CUDA tensors")
def test_cuda_block_policy_uses_triton_and_equals_cpu():
    """BlockPolicy's decode step on CUDA goes through the Triton kernels and matches the CPU kernel."""
    keys, values, sums = blocks_and_sums(1, 2, 128, 16, 64, 2000, seed=10)
    q = torch.randn(1, 2, 3, 64, generator=torch.Generator().manual_seed(11))
    assert K.gpu_kernels(q.cuda(), keys.cuda(), values.cuda()) is T
    cpu = K.mean_block_decode(q, keys, values, sums, 2000, 10, 1, 2, 0.125)
    gpu = K.mean_block_decode(q.cuda(), keys.cuda(), values.cuda(), sums.cuda(), 2000, 10, 1, 2, 0.125)
    assert cpu is not None and gpu is not None
    assert torch.allclose(gpu.cpu(), cpu, atol=2e-5, rtol=1e-4)
