"""The compiled decode kernel's worker pool: concurrent callers and forked children get the single-call result."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from attnsparse import decode_kernels as K


def _decode(q, kb, vb, sums, n):  # type: ignore[no-untyped-def]
    return K.mean_block_decode(q, kb, vb, sums, n, 100, 1, 2, 0.125)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _inputs(block_kv, seed: int):  # type: ignore[no-untyped-def]
    n = 8190
    q, _, kb, vb = block_kv(n, 3, seed=seed)
    return q, kb, vb, K.block_sums(kb, n).contiguous(), n


def test_concurrent_callers_equal_one_call_each(block_kv, two_threads):
    """Callers racing for the pool: the loser runs on its own thread; every result equals its sequential one."""
    cases = [_inputs(block_kv, seed) for seed in range(6)]
    expected = [_decode(*case) for case in cases]
    if expected[0] is None:
        pytest.skip("no C compiler")
    with ThreadPoolExecutor(4) as executor:
        for _ in range(5):
            results = list(executor.map(lambda case: _decode(*case), cases))
            for got, want in zip(results, expected, strict=True):
                assert torch.equal(got, want)


def _child(case, queue) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(2)
    queue.put(_decode(*case).tolist())


def test_forked_child_starts_its_own_workers(block_kv, two_threads):
    """A child forked after the parent's pool started has none of its workers: it must not wait for them."""
    case = _inputs(block_kv, 0)
    expected = _decode(*case)  # starts the parent's workers
    if expected is None:
        pytest.skip("no C compiler")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(case, queue))
    child.start()
    result = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and torch.equal(torch.tensor(result), expected)
