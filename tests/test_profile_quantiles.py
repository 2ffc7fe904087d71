"""k-at-coverage quantiles of a profile, exactly, on rows whose k at coverage is known by construction.

A row with m equal masses 1/m (m < 20) needs all m keys to reach coverage 0.95, with a margin (1/m - 0.05) far
above float32 rounding, so every row's k is an exact integer and the profile's p10/p50/p90/p99 must equal the
inverted-CDF quantiles of those integers (the smallest k whose CDF reaches q): no tolerance.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from attnsparse.measure.profile import Profile, ProfileConfig, Recorder, coverage_key

WIDTH = 24
# per head, the k at coverage of each of 20 rows; several put q * 20 exactly on a step of the CDF
HEAD_KS = [
    list(range(1, 17)) + [4, 4, 9, 13],
    [1] * 10 + [2] * 5 + [7] * 4 + [16],  # the CDF reaches 0.5 exactly at k = 1 and 0.9 exactly at k = 7
    [3, 3, 5, 5, 5, 9, 11, 11, 12, 15] * 2,  # and 0.9 exactly at k = 12
]


def _chunk(rows: slice) -> SimpleNamespace:
    """Rows `rows` of every head as one observer chunk: row i of head h has HEAD_KS[h][i] equal masses."""
    ks = torch.tensor(HEAD_KS)[:, rows]
    probs = torch.zeros(1, ks.shape[0], ks.shape[1], WIDTH)
    for head in range(ks.shape[0]):
        for row in range(ks.shape[1]):
            m = int(ks[head, row])
            probs[0, head, row, WIDTH - m:] = 1.0 / m  # the mass on the latest keys
    visible = torch.ones(1, 1, ks.shape[1], WIDTH, dtype=torch.bool)
    return SimpleNamespace(layer_idx=0, probs=probs, visible=visible, query_positions=torch.full((ks.shape[1],), WIDTH - 1))


def test_k_at_coverage_quantiles_are_exact_inverted_cdf_quantiles() -> None:
    config = ProfileConfig(ctx=WIDTH, ks=(1, 4), deltas=(0.05,), eps=(0.1,), fit_delta=0.05)
    recorder = Recorder(Profile(config, model="rows", kv_heads=len(HEAD_KS)))
    recorder(_chunk(slice(0, 7)))  # two chunks: the histograms accumulate
    recorder(_chunk(slice(7, 20)))
    data = recorder.profile.to_dict()
    header, rows = recorder.profile.csv_rows()
    key = coverage_key(0.05)
    for head, ks in enumerate(np.array(HEAD_KS)):
        entry = next(e for e in data["per_head"] if e["head"] == head)["k_at_coverage"][key]
        for q in (0.1, 0.5, 0.9, 0.99):
            assert entry[f"p{round(q * 100)}"] == int(np.quantile(ks, q, method="inverted_cdf")), (head, q)
        assert entry["max"] == ks.max() and entry["mean"] == ks.mean()
        row = dict(zip(header, rows[head]))
        assert row[f"k{key}_p50"] == entry["p50"] and row[f"k{key}_p90"] == entry["p90"]
