"""Two CPU processes (torchrun, gloo) condense a tiny model; both must end with identical weights."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.torchrun import run_two_processes

WORKER = Path(__file__).with_name("ddp_condense_worker.py")


def test_two_process_ddp_ranks_end_identical(tmp_path: Path) -> None:
    out = tmp_path / "run"
    tiny_dir = run_two_processes(WORKER, tmp_path, out)
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
