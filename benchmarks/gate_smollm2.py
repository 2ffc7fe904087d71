"""The learned block gate on SmolLM2-135M: its training cost, and 8K perplexity under sparse prefill vs dense.

    attnsparse gate smollm2-135m --data ../shared/data/wikitext-2/valid.txt --ctx 2048 --positions 8192 \
        --windows 14 --holdout 2 --block 64 --rank 32 --steps 400 --out GATE
    python benchmarks/gate_smollm2.py --gate GATE --ctx 8192 --windows 1 --density 0.1

Perplexity: WikiText-2 test, evenly spaced windows of --ctx tokens, each scoring its last ctx - 1 tokens, under
dense (SDPA through the backend's fast path) and blocksparse:B:D with the estimators mean, antidiag and the gate
(the same block B and density D for all; the achieved block density is reported). The result JSON is rewritten
after every cell, and a rerun with the same settings reuses the cells already there (`--fresh` recomputes).
Training cost is read from the gate's own record (gate.json: seconds collecting and fitting, threads, tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, WIKITEXT_TEST, earlier_dense_perplexity, machine, write_result

NAME = "gate_smollm2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gate", required=True, help="directory written by `attnsparse gate`")
    parser.add_argument("--data", default=str(WIKITEXT_TEST), help="evaluation text (default: WikiText-2 test)")
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--estimators", default="mean,antidiag", help="hand-made estimators beside the gate")
    parser.add_argument("--train-wall", type=float, default=None, help="wall seconds of the gate command, if timed")
    parser.add_argument("--train-cpu", type=float, default=None, help="CPU seconds (user + sys) of the gate command")
    parser.add_argument("--train-command", default=None, help="the gate command as it was run")
    parser.add_argument("--per-head", action="store_true", help="also the gate with one selection per query head")
    parser.add_argument("--kept", action="store_true",
                        help="also the attention mass each selection keeps on the evaluation windows (gate, mean, exact)")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--results", default=NAME, help="result file name in benchmarks/results (no .json)")
    parser.add_argument("--dense-from", default=None,
                        help="an earlier prefill or gate result on the same windows: reuse its dense perplexity")
    parser.add_argument("--wait", action="store_true", help="wait for the gate's training run to finish")
    parser.add_argument("--decode-gate", default=None, help="a gate trained with --block 16, for block:16:D:gate")
    parser.add_argument("--decode-ctx", type=int, default=2048)
    parser.add_argument("--decode-windows", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--decode-density", type=float, default=0.0625)
    args = parser.parse_args()

    import torch

    from attnsparse.attention.policies import parse_policy
    from attnsparse.core.data import load_windows
    from attnsparse.core.models import load_model
    from attnsparse.evaluate.perplexity import perplexity

    settings = {"ctx": args.ctx, "windows": args.windows, "density": args.density, "block": args.block}
    previous = _previous(settings, args.results) if not args.fresh else {}
    stored = {part: _stored(args.results, part) for part in ("decode", "kept_mass")}  # read before any write
    if args.dense_from:
        dense_ppl = earlier_dense_perplexity(args.dense_from, args.ctx, args.windows, args.data)
        previous["dense"] = {"label": "dense", "policy": "dense", "perplexity": dense_ppl, "from": args.dense_from}
    loaded = load_model("smollm2-135m")
    windows = load_windows(loaded.tokenizer, args.data, args.ctx, max_context=loaded.max_context,
                           count=args.windows)
    head = f"blocksparse:{args.block}:{args.density:g}"
    gate_spec = f"{head}:gate:path={Path(args.gate).resolve()}"
    specs = ["dense"] + [f"{head}:{name}" for name in args.estimators.split(",") if name] + [gate_spec] + (
        [f"{gate_spec},per=head"] if args.per_head else [])
    rows: list[dict] = []
    for spec in specs:
        label = ("gate:per=head" if spec.endswith("per=head") else "gate") if ":gate:" in spec else spec
        if label.startswith("gate"):
            record = _wait_for_gate(Path(args.gate), args.wait)
            if previous.get(label, {}).get("gate") != record:
                previous.pop(label, None)
        if label in previous:
            rows.append(previous[label])
            print(f"{label:>28}  reused ppl {previous[label]['perplexity']:.4f}", flush=True)
            continue
        policy = parse_policy(spec)
        started = time.perf_counter()
        result = perplexity(loaded.model, windows, policy, progress=False)
        rows.append({"label": label, "policy": result.policy, "perplexity": result.perplexity,
                     "mean_nll": result.mean_nll, "tokens_scored": result.tokens, "block_density": result.density,
                     "seconds": round(time.perf_counter() - started, 1)}
                    | ({"gate": record} if label.startswith("gate") else {}))
        print(f"{label:>28}  ppl {result.perplexity:.4f}  density {result.density:.4f}  "
              f"{rows[-1]['seconds']:.0f} s", flush=True)
        _write(settings, rows, args, torch.get_num_threads(), stored["decode"], stored["kept_mass"])
    decode = _decode(loaded, args) if args.decode_gate else stored["decode"]
    kept = _kept(loaded.model, windows, args) if args.kept else stored["kept_mass"]
    _write(settings, rows, args, torch.get_num_threads(), decode, kept)


def _kept(model, windows, args: argparse.Namespace) -> dict:
    """Attention mass kept at --density on the evaluation windows (recorded under dense attention) by the gate, the
    mean key and the oracle, per kv group and per query head (attnsparse.gate.kept), each layer's and the mean."""
    from attnsparse.gate.kept import gate_report
    from attnsparse.gate.model import BlockGate
    from attnsparse.gate.train import attention_scaling, collect_features, stack_windows

    gate = BlockGate.load(args.gate)
    features = stack_windows([collect_features(model, windows[i:i + 1], args.block) for i in range(len(windows))])
    report = gate_report(gate, features, attention_scaling(model, gate.config.head_dim), block=args.block,
                         ctx=args.ctx, density=args.density)
    print({name: round(value["mean"], 4) for name, value in report.items() if name != "density"}, flush=True)
    return report


def _decode(loaded, args: argparse.Namespace) -> dict:
    """Teacher-forced decode perplexity of the last --decode-tokens of each window: block:16:D with the mean score
    and with the gate, against dense decoding (attnsparse.decode.eval)."""
    from attnsparse.core.data import load_windows
    from attnsparse.core.models import ModelShape
    from attnsparse.decode.eval import decode_perplexity
    from attnsparse.decode.plan import DecodePlan

    shape = ModelShape.of(loaded.model)
    layers, kv_heads = shape.need("layers"), shape.need("kv_heads")
    windows = load_windows(loaded.tokenizer, args.data, args.decode_ctx, max_context=loaded.max_context,
                           count=args.decode_windows)
    specs = [f"block:16:{args.decode_density}", f"block:16:{args.decode_density}:gate"]
    plans = [DecodePlan.uniform(specs[0], layers, kv_heads), DecodePlan.uniform(specs[1], layers, kv_heads)
             .with_gate(str(Path(args.decode_gate).resolve()))]
    started = time.perf_counter()
    results = decode_perplexity(loaded.model, windows, plans, args.decode_tokens, progress=False)
    dense = results[0].perplexity
    rows = [{"plan": label, "perplexity": r.perplexity, "ratio_to_dense": r.perplexity / dense,
             "kv_bytes_share": r.density, "tokens_scored": r.tokens}
            for label, r in zip(["dense", *specs], [results[0], *results[1:]], strict=True)]
    for row in rows:
        print(f"{row['plan']:>28}  decode ppl {row['perplexity']:.4f}  x{row['ratio_to_dense']:.4f}", flush=True)
    return {"ctx": args.decode_ctx, "windows": args.decode_windows, "tokens": args.decode_tokens,
            "gate": _wait_for_gate(Path(args.decode_gate), False), "seconds": round(time.perf_counter() - started),
            "rows": rows}


def _stored(name: str, part: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()).get(part) if path.is_file() else None


def _wait_for_gate(directory: Path, wait: bool) -> dict:
    """The gate's config and notes (gate.json), waiting for its training run to write it when `wait`."""
    marker = directory / "gate.json"
    while wait and not marker.is_file():
        time.sleep(30)
    stored = json.loads(marker.read_text())
    return {"config": stored["config"], "notes": stored["notes"]}


def _previous(settings: dict, name: str) -> dict[str, dict]:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return {}
    stored = json.loads(path.read_text())
    if stored.get("settings") != settings:
        return {}
    return {row["label"]: row for row in stored.get("perplexity", [])}


def _write(settings: dict, rows: list[dict], args: argparse.Namespace, threads: int,
           decode: dict | None = None, kept: dict | None = None) -> None:
    dense = next((row["perplexity"] for row in rows if row["label"] == "dense"), None)
    for row in rows:
        row["ratio_to_dense"] = row["perplexity"] / dense if dense else None
    gate_rows = [row for row in rows if row["label"].startswith("gate") and row["ratio_to_dense"] is not None]
    gate_row = min(gate_rows, key=lambda row: row["ratio_to_dense"], default=None)  # the best selection unit
    targets = [] if gate_row is None else _targets(gate_row, args)
    if decode is not None:
        mean_row, gate_decode = decode["rows"][1], decode["rows"][2]
        targets.append({"measure": f"decode perplexity, {gate_decode['plan']} vs {mean_row['plan']} (x dense "
                                   f"decoding, {decode['ctx']} tokens, last {decode['tokens']} decoded)",
                        "target": "measured (if time)",
                        "value": f"gate x{gate_decode['ratio_to_dense']:.4f}, mean x{mean_row['ratio_to_dense']:.4f}",
                        "met": gate_decode["ratio_to_dense"] <= mean_row["ratio_to_dense"],
                        "command": " ".join(["python", "benchmarks/gate_smollm2.py", *sys.argv[1:]])})
    write_result(args.results, {
        "model": "smollm2-135m (embedded GGUF Q4_1, dequantised to float32)",
        "data": "wikitext-2 test.txt (shared/data), evenly spaced windows; each scores its last ctx - 1 tokens",
        "settings": settings, "data_path": args.data, "machine": machine() | {"threads": threads}, "perplexity": rows,
        **({"decode": decode} if decode is not None else {}), **({"kept_mass": kept} if kept is not None else {}),
        "targets": targets,
    })


def _targets(gate_row: dict, args: argparse.Namespace) -> list[dict]:
    notes = gate_row["gate"]["notes"]
    train_seconds = notes["collect_seconds"] + notes["fit_seconds"]
    command = " ".join(["python", "benchmarks/gate_smollm2.py", *sys.argv[1:]])
    targets = [
        {"measure": "gate training cost (SmolLM2-135M)", "target": "<= 30 min on 2 cores",
         "value": f"{train_seconds / 60:.1f} min ({notes['collect_seconds']:.0f} s collecting, "
                  f"{notes['fit_seconds']:.0f} s fitting) on {notes['threads']} thread(s), {notes['tokens']} tokens"
                  + (f"; whole command {args.train_wall / 60:.1f} min wall" if args.train_wall else "")
                  + (f", {args.train_cpu / 60:.1f} min CPU" if args.train_cpu else ""),
         "met": train_seconds <= 30 * 60,
         "command": args.train_command or "attnsparse gate (its settings: the gate row's gate.config)"},
        {"measure": f"whole-window perplexity at {args.ctx // 1024}K under sparse prefill, learned gate "
                    f"({gate_row['label']}), density <= 10 % of causal block pairs, x dense",
         "target": "<= 1.01",
         "value": None if gate_row["ratio_to_dense"] is None else round(gate_row["ratio_to_dense"], 4),
         "met": bool(gate_row["ratio_to_dense"] is not None and gate_row["ratio_to_dense"] <= 1.01
                     and gate_row["block_density"] <= 0.10 + 1e-3),  # round(0.1 x causal pairs) blocks
         "command": command},
    ]
    return targets


if __name__ == "__main__":
    main()
