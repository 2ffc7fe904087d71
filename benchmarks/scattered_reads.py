"""Why block top-k walks its selected blocks side by side: one thread's read bandwidth over random chunks.

Compiles `scattered_reads.c` (needs cc and an x86-64 CPU with AVX), reads 96 MB per case from a 1.5 GB buffer:
chunks of 4 KB to 1 MB one after another, then 4 KB chunks (one SmolLM2 key block of 16 tokens) 1 to 16 at a
time side by side.

    .venv/bin/python benchmarks/scattered_reads.py     # -> results/scattered_reads.json
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from attnsparse.core.runs import atomic_write_json, environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buffer-mb", type=int, default=1536)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scattered_reads.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "scattered_reads"
        subprocess.run(["cc", "-O2", "-march=native", str(Path(__file__).with_suffix(".c")), "-o", str(binary)],
                       check=True)
        lines = subprocess.run([str(binary), str(args.buffer_mb)], check=True, capture_output=True,
                               text=True).stdout.split()
    rows = [lines[i:i + 3] for i in range(0, len(lines), 3)]
    sequential = {int(size): float(gbs) for kind, size, gbs in rows if kind == "sequential"}
    interleaved = {int(ways): float(gbs) for kind, ways, gbs in rows if kind == "interleaved"}
    for size, gbs in sequential.items():
        print(f"chunks of {size // 1024:5d} KB one at a time: {gbs:6.2f} GB/s")
    for ways, gbs in interleaved.items():
        print(f"4 KB chunks, {ways:2d} side by side: {gbs:6.2f} GB/s")
    atomic_write_json(Path(args.out), {
        "benchmark": "scattered_reads", "threads": 1, "buffer_mb": args.buffer_mb, "read_mb_per_case": 96,
        "cpu": platform.processor() or platform.machine(), "environment": environment(),
        "gb_s_by_chunk_bytes": sequential, "gb_s_4kb_chunks_by_ways": interleaved,
    })


if __name__ == "__main__":
    main()
