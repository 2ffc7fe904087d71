"""Two CPU processes (torchrun, gloo) condense a tiny model, once with DDP and once with its weights sharded (torch
FSDP2): DDP ranks end identical, and FSDP trains exactly what one process with the same global batch trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.torchrun import run_two_processes

WORKER = Path(__file__).with_name("distributed_condense_worker.py")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(tiny model directory, its training text's directory, the runs' directory) after one two-process launch."""
    tmp_path = tmp_path_factory.mktemp("distributed")
    out = tmp_path / "runs"
    tiny_dir = run_two_processes(WORKER, tmp_path, out)
    return Path(tiny_dir), tmp_path, out


def test_two_process_ddp_ranks_end_identical(launched: tuple[Path, Path, Path]) -> None:
    tiny_dir, _, runs = launched
    out = runs / "ddp"
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name
    assert ranks[0]["final"]["lambda"] == ranks[1]["final"]["lambda"]  # λ is driven by the all-reduced loss
    original = load_file(str(tiny_dir / "model.safetensors"))
    saved = load_file(str(out / "model" / "model.safetensors"))
    assert any(not torch.equal(original[n], saved[n]) for n in original)  # it trained
    for name, tensor in saved.items():
        assert torch.equal(tensor, ranks[0]["state"][name]), name
    assert (out / "checkpoints" / "checkpoint-4").is_dir()


def test_two_process_fsdp_shards_and_matches_one_process(launched: tuple[Path, Path, Path]) -> None:
    from attnsparse.condense import CondenseConfig, condense

    tiny_dir, tmp_path, runs = launched
    out = runs / "fsdp"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for rank in ranks:  # the weights were sharded while training: each process held half the embedding rows
        assert rank["probe"]["parameter"] == "DTensor" and rank["probe"]["wrapper"].startswith("FSDP"), rank
        assert rank["probe"]["local_rows"] < rank["probe"]["full_rows"], rank
    assert ranks[0]["final"] == ranks[1]["final"] | {"elapsed_s": ranks[0]["final"]["elapsed_s"]}
    recorded = json.loads((out / "config.json").read_text())["config"]
    assert recorded["fsdp"] == "full_shard auto_wrap" and recorded["processes"] == 2
    saved = load_file(str(out / "model" / "model.safetensors"))  # gathered whole, not one shard
    original = load_file(str(tiny_dir / "model.safetensors"))
    assert {name: t.shape for name, t in saved.items()} == {name: t.shape for name, t in original.items()}
    assert any(not torch.equal(original[n], saved[n]) for n in original)  # it trained
    assert (out / "checkpoints" / "checkpoint-4").is_dir()

    # one process with the same global batch (2 processes x 2 windows) takes the same steps
    torch.set_num_threads(1)
    single = condense(CondenseConfig(model=str(tiny_dir), data=str(tmp_path / "train.txt"), k=4, steps=4, batch_size=4,
                                     seq_len=32, lr=5e-3, lam=2.0, save_steps=4, warmup_steps=0,
                                     lr_scheduler="constant", trainable="all", device="cpu"),
                      tmp_path / "single", progress=False, echo=None)
    for name in ("loss", "lm", "cond", "topk_mass"):
        assert single.final[name] == pytest.approx(ranks[0]["final"][name], rel=1e-4, abs=1e-6), name
    alone = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, alone[name], rtol=1e-4, atol=1e-5, msg=name)
