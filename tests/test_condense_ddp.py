"""Two CPU processes (torchrun, gloo) condense a tiny model; both must end with identical weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from attnsparse.core.tiny import save_tiny

WORKER = Path(__file__).with_name("ddp_condense_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_ranks_end_identical(tmp_path: Path) -> None:
    tiny_dir = save_tiny(str(tmp_path / "tiny"))
    text = tmp_path / "train.txt"
    text.write_text("A stitch in time saves nine; many hands make light work. " * 40, encoding="utf-8")
    out = tmp_path / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(WORKER), tiny_dir, str(text), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name
    assert ranks[0]["final"]["lambda"] == ranks[1]["final"]["lambda"]  # λ is driven by the all-reduced loss
    original = load_file(str(Path(tiny_dir) / "model.safetensors"))
    saved = load_file(str(out / "model" / "model.safetensors"))
    assert any(not torch.equal(original[n], saved[n]) for n in original)  # it trained
    for name, tensor in saved.items():
        assert torch.equal(tensor, ranks[0]["state"][name]), name
    assert (out / "checkpoints" / "checkpoint-4").is_dir()
