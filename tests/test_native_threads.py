"""The compiled decode kernel on torch's threads: callers racing from several Python threads get the single-call result."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from attnsparse.decode import kernels as K


def _decode(q, kb, vb, sums, n):  # type: ignore[no-untyped-def]
    return K.mean_block_decode(q, kb, vb, sums, n, 100, 1, 2, 0.125)


def _inputs(block_kv, seed: int):  # type: ignore[no-untyped-def]
    n = 8190
    q, _, kb, vb = block_kv(n, 3, seed=seed)
    return q, kb, vb, K.block_sums(kb, n).contiguous(), n


@pytest.mark.usefixtures("kernel_build")
def test_concurrent_callers_equal_one_call_each(block_kv, two_threads):
    """Each caller gets its own OpenMP team; every result equals its sequential one, bit for bit."""
    cases = [_inputs(block_kv, seed) for seed in range(6)]
    expected = [_decode(*case) for case in cases]
    if expected[0] is None:
        pytest.skip("no C compiler")
    with ThreadPoolExecutor(4) as executor:
        for _ in range(5):
            results = list(executor.map(lambda case: _decode(*case), cases))
            for got, want in zip(results, expected, strict=True):
                assert torch.equal(got, want)
