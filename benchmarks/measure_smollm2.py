"""SmolLM2-135M's sparsity profile summary on WikiText-2 test at several context lengths.

Per context: per-layer mean k_0.95, mean C (and R²), share of streaming heads, plus the model-wide summary.
Writes benchmarks/results/measure_smollm2.json and keeps each run directory under benchmarks/results/runs/
(profile.json, CSV, plots, report.html) unless --no-keep.
Usage: python benchmarks/measure_smollm2.py [--plan 1024:8,8192:1] [--from-run DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

TEXT = Path("/work/shared/data/wikitext-2/test.txt")
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", default="1024:8,8192:1", help="ctx:windows pairs, comma-separated")
    parser.add_argument("--no-keep", action="store_true", help="do not keep the run directories")
    parser.add_argument("--from-run", action="append", default=[],
                        help="DIR of an existing measure run to summarise too (e.g. the one measure_memory.py keeps)")
    args = parser.parse_args()

    import torch

    from attnsparse.core.models import load_model
    from attnsparse.measure.profile import ProfileView
    from attnsparse.measure.run import measure

    loaded = load_model("smollm2-135m", probe=False)
    record: dict = {"benchmark": "measure_smollm2", "model": "smollm2-135m (GGUF Q4_1 dequantised to float32)",
                    "data": str(TEXT), "threads": torch.get_num_threads(), "runs": []}
    for item in args.plan.split(","):
        ctx, windows = (int(v) for v in item.split(":"))
        out = RESULTS / "runs" / f"smollm2_ctx{ctx}"
        if out.exists():
            shutil.rmtree(out)
        started = time.perf_counter()
        profile = measure(loaded, str(TEXT), ctx=ctx, windows=windows, out=out, progress=True)
        seconds = time.perf_counter() - started
        data = profile.to_dict()
        record["runs"].append({
            "ctx": ctx,
            "windows": windows,
            "seconds": round(seconds, 1),
            "summary": data["summary"],
            "per_layer": data["per_layer"],
            "k_vs_position": data["k_vs_position"],
        })
        if args.no_keep:
            shutil.rmtree(out)
    for run_dir in args.from_run:
        data = ProfileView.read_json(Path(run_dir) / "profile.json").data
        record["runs"].append({
            "ctx": data["ctx"],
            "windows": data["windows"],
            "seconds": data.get("elapsed_seconds"),
            "source": f"{run_dir} (written by benchmarks/measure_memory.py)",
            "summary": data["summary"],
            "per_layer": data["per_layer"],
            "k_vs_position": data["k_vs_position"],
        })
    record["runs"].sort(key=lambda run: run["ctx"])
    record["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    record["note"] = ("windows are evenly spaced over the tokenised test set; kept small because the CPU is "
                      "2 shared cores (one 8192-token window takes minutes under the recording backend)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "measure_smollm2.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
