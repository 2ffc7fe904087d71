"""Peak RSS and wall time of `measure` against a plain SDPA forward at the same length, side by side.

Each variant runs in a fresh subprocess (so peak RSS is its own) on the same window of WikiText-2 test:
  sdpa         model(ids, logits_to_keep=1, use_cache=False) with the model's own SDPA attention
               (the same forward call measure makes, so the ratio isolates the observed attention + recorder)
  sdpa_logits  the same with full-vocabulary logits (what a plain `model(ids)` costs), for reference
  measure      attnsparse.measure.run.measure(...) on that window, writing its whole run directory
SDPA runs before and after measure; the ratios use their mean. Writes benchmarks/results/measure_memory.json.
Usage: python benchmarks/measure_memory.py [--ctx 8192] [--windows 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"
if not TEXT.exists():
    TEXT = Path("/work/shared/data/wikitext-2/test.txt")
RESULTS = Path(__file__).resolve().parent / "results"


def child(mode: str, ctx: int, windows: int) -> None:
    import torch

    from attnsparse.core import data
    from attnsparse.core.models import load_model
    from attnsparse.measure.run import measure

    loaded = load_model("smollm2-135m", probe=False)
    ids = data.load_windows(loaded.tokenizer, str(TEXT), ctx, count=windows)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if mode.startswith("sdpa"):
        kwargs = {"use_cache": False} if mode == "sdpa_logits" else {"use_cache": False, "logits_to_keep": 1}
        with torch.inference_mode():
            for row in ids:
                loaded.model(row[None], **kwargs)
    else:
        # the run directory is kept: measure_smollm2.py --from-run summarises it instead of measuring again
        out = RESULTS / "runs" / f"smollm2_ctx{ctx}"
        if out.exists():
            shutil.rmtree(out)
        measure(loaded, ids, ctx=ctx, windows=windows, out=out, progress=False, echo=None)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_rss_mib": peak / 1024,
                      "rss_after_load_mib": base_rss / 1024}))


def run(mode: str, ctx: int, windows: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--ctx", str(ctx), "--windows", str(windows)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.ctx, args.windows)
        return
    runs = [run(m, args.ctx, args.windows) for m in ("sdpa", "sdpa_logits", "measure", "sdpa")]
    sdpa = [r for r in runs if r["mode"] == "sdpa"]
    meas = next(r for r in runs if r["mode"] == "measure")
    sdpa_rss = sum(r["peak_rss_mib"] for r in sdpa) / len(sdpa)
    sdpa_s = sum(r["seconds"] for r in sdpa) / len(sdpa)
    import torch

    record = {
        "benchmark": "measure_memory",
        "model": "smollm2-135m (GGUF Q4_1 dequantised to float32)",
        "data": "wikitext-2 test.txt",
        "ctx": args.ctx,
        "windows": args.windows,
        "query_chunk": 128,
        "runs": runs,
        "peak_rss_ratio_measure_over_sdpa": meas["peak_rss_mib"] / sdpa_rss,
        "time_ratio_measure_over_sdpa": meas["seconds"] / sdpa_s,
        "targets": {"peak_rss_ratio_max": 2.0, "time_ratio_max": 3.0},
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "note": "2 CPU cores; sdpa ran before and after measure, ratios use the mean.",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "measure_memory.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("peak_rss_ratio_measure_over_sdpa", "time_ratio_measure_over_sdpa")}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
