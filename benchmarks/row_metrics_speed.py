"""Time `row_metrics` (the recorder's per-chunk work) against the sort-based reference, interleaved in one process.

Rows are what the backend hands the recorder at a causal window: chunks (1, H, Qc, W) of softmax rows over
W = chunk end keys, scores N(0, scale²) per key (scale 2 = flat-ish, 8 = peaked), plus a mixture with a sink
column. Also checks that both give identical integers and masses within 1e-9.

    .venv/bin/python benchmarks/row_metrics_speed.py [--ctx 8192] [--heads 9] [--chunk 128] [--reps 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from attnsparse.measure import rowstats as M


def reference_row_metrics(probs, visible, positions, spec):  # type: ignore[no-untyped-def]
    """The previous row_metrics: one full sort + one float64 cumsum per row (`sort_rows`, kept in metrics)."""
    lead = tuple(probs.shape[:-1])
    n = M.row_lengths(visible).expand(lead).reshape(-1)
    cols = visible.reshape(-1, visible.shape[-1]).any(0).nonzero()
    width = int(cols.max()) + 1 if cols.numel() else 1
    rows = probs.reshape(-1, probs.shape[-1])[:, :width]
    srt = M.sort_rows(rows)
    narrow = probs[..., :width]
    extras = (M.sink_mass(narrow, spec.sink_tokens), M.local_mass(narrow, positions, spec.local_window),
              M.streaming_mass(narrow, positions, spec.sink_tokens, spec.local_window))
    return (M.topk_mass_from_sorted(srt, spec.ks), M.k_at_coverage_from_sorted(srt, spec.deltas, n),
            M.count_above_from_sorted(srt, spec.eps), srt.entropy, extras)


def chunk(ctx: int, heads: int, q0: int, qc: int, scale: float, gen: torch.Generator, sink: bool):  # type: ignore[no-untyped-def]
    width = q0 + qc
    pos = torch.arange(q0, q0 + qc)
    visible = (torch.arange(width)[None, :] <= pos[:, None])[None, None]
    scores = torch.randn(1, heads, qc, width, generator=gen) * scale
    if sink:
        scores[..., 0] += 6.0
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return probs, visible, pos


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--starts", default="", help="comma-separated chunk starts (default: 5 spread over ctx)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = M.MetricSpec(ks=M.default_ks(args.ctx))
    gen = torch.Generator().manual_seed(0)
    starts = [int(s) for s in args.starts.split(",")] if args.starts else \
        [0, args.ctx // 4, args.ctx // 2, 3 * args.ctx // 4, args.ctx - args.chunk]
    cases = [(f"scale={scale}{'+sink' if sink else ''} start={q0}", chunk(args.ctx, args.heads, q0, args.chunk,
                                                                         scale, gen, sink))
             for scale, sink in [(2.0, False), (8.0, False), (1.0, True)] for q0 in starts]
    tot_old = tot_new = 0.0
    for name, (probs, visible, pos) in cases:
        t_old = t_new = float("inf")
        for _ in range(args.reps):  # interleaved: old, new, old, new, ...
            a = time.perf_counter()
            ref = reference_row_metrics(probs, visible, pos, spec)
            t_old = min(t_old, time.perf_counter() - a)
            a = time.perf_counter()
            got = M.row_metrics(probs, visible, pos, spec)
            t_new = min(t_new, time.perf_counter() - a)
        lead = probs.shape[:-1]
        assert torch.equal(got.k_cov, ref[1].reshape(*lead, -1)), name
        assert torch.equal(got.count_above, ref[2].reshape(*lead, -1)), name
        assert float((got.topk_mass - ref[0].reshape(*lead, -1)).abs().max()) < 1e-9, name
        assert float((got.entropy - ref[3].reshape(lead)).abs().max()) < 1e-5, name
        assert torch.equal(got.streaming, ref[4][2]) and torch.equal(got.local, ref[4][1]), name
        tot_old += t_old
        tot_new += t_new
        print(f"{name:28s} elems {probs.shape[1] * probs.shape[2] * probs.shape[3] / 1e6:6.2f}M  "
              f"sort {t_old * 1e3:8.1f} ms  new {t_new * 1e3:8.1f} ms  x{t_old / t_new:5.2f}")
    print(f"total: sort {tot_old:.3f} s  new {tot_new:.3f} s  speedup x{tot_old / tot_new:.2f}  "
          f"(torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
