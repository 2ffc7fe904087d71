"""Benchmark: where a condensed model loses the passkey: the needle's position and its distance to the question.

Every all-weights recipe trained at 1024 tokens reads the key at 1K and at 4K depths 0.1/0.5 but not at 4K depth 0.9.
This runs dense passkey trials (greedy answers, the task's own prompts) over cells that separate the needle's absolute
position from its distance to the question, for the original and each `--model NAME=DIR`, and writes
benchmarks/results/<--results>.json with every answer text. Usage:

    .venv/bin/python benchmarks/passkey_position_smollm2.py --model keepAllTop8Sampled=runs/s8/condense/model \
        [--cells 1024@0.9,2048@0.9,4096@0.5] [--trials 3] [--results passkey_position_smollm2]
"""

from __future__ import annotations

import argparse
import sys

from common import write_result

CELLS = "1024@0.9,2048@0.9,3072@0.9,4096@0.9,4096@0.8,4096@0.7,3072@0.5,4096@0.5"


def main() -> None:
    from attnsparse.core.models import load_model
    from attnsparse.evaluate.passkey import run_passkey
    from attnsparse.evaluate.tasks.base import Prompter
    from attnsparse.evaluate.tasks.passkey import passkey_ids

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=DIR of a condensed model (repeatable)")
    parser.add_argument("--original", default="smollm2-135m")
    parser.add_argument("--cells", default=CELLS, help="LENGTH@DEPTH, comma-separated")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--results", default="passkey_position_smollm2")
    args = parser.parse_args()
    cells = [(int(n), float(d)) for n, d in (item.split("@") for item in args.cells.split(","))]
    models = {"original": args.original} | dict(item.split("=", 1) for item in args.model)
    rows = []
    for name, spec in models.items():
        loaded = load_model(spec)
        prompter = Prompter(loaded.tokenizer)
        for length, depth in cells:
            trials = run_passkey(loaded.model, loaded.tokenizer, {"dense": "dense"}, [length], [depth],
                                 trials=args.trials, progress=False)
            needle = passkey_ids(prompter, length, depth, trials[0].key).needles[0].spans[0][0]  # the key's first token
            rows.append({"model": name, "length": length, "depth": depth, "needle_position": needle,
                         "distance_to_end": length - needle, "correct": sum(t.correct for t in trials),
                         "trials": len(trials), "answers": [t.answer for t in trials]})
            print(f"{name} {length}@{depth}: needle at {needle}, {length - needle} from the end: "
                  f"{rows[-1]['correct']}/{len(trials)} {rows[-1]['answers'][0]!r}", flush=True)
    write_result(args.results, {"models": models, "trials": args.trials, "rows": rows,
                                "command": "python benchmarks/passkey_position_smollm2.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
