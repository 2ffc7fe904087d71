"""Run a condense worker script in two CPU processes under torchrun (gloo), on a tiny model and a short text."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from attnsparse.core.tiny import save_tiny


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(worker: Path, tmp_path: Path, out: Path) -> str:
    """Start `worker TINY_DIR TEXT OUT` on two ranks; returns the tiny model's directory once both exited 0."""
    tiny_dir = save_tiny(str(tmp_path / "tiny"))
    text = tmp_path / "train.txt"
    text.write_text("A stitch in time saves nine; many hands make light work. " * 40, encoding="utf-8")
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(worker), tiny_dir, str(text), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tiny_dir
