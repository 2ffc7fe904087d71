"""One process of the two-process (gloo, CPU) condense tests, launched once by tests/test_condense_distributed.py via
torchrun: a DDP run, then an FSDP run in the same processes (one launch: starting the processes is most of the cost)."""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import TrainerCallback


class ShardProbe(TrainerCallback):
    """Records, after the first step, how the trained model is wrapped and how much of a weight this process holds."""

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == 1 and model is not None:
            weight = model.get_input_embeddings().weight
            local = weight.to_local() if hasattr(weight, "to_local") else weight
            self.seen = {"wrapper": type(model).__name__, "parameter": type(weight).__name__,
                         "full_rows": int(weight.shape[0]), "local_rows": int(local.shape[0])}


def main() -> None:
    tiny_dir, text, out = sys.argv[1:4]
    torch.set_num_threads(1)
    from attnsparse.condense import CondenseConfig, condense

    rank = int(os.environ["RANK"])
    common = {"model": tiny_dir, "data": text, "k": 4, "steps": 4, "batch_size": 2, "seq_len": 32, "lr": 5e-3,
              "lam": 2.0, "warmup_steps": 0, "lr_scheduler": "constant"}

    ddp_out = os.path.join(out, "ddp")
    result = condense(CondenseConfig(**common, save_steps=2, margin=0.1), ddp_out, progress=False)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    state = {name: tensor.detach().clone() for name, tensor in result.model.state_dict().items()}
    torch.save({"world": world, "state": state, "final": result.final}, os.path.join(ddp_out, f"rank{rank}.pt"))

    fsdp_out = os.path.join(out, "fsdp")
    probe = ShardProbe()
    result = condense(CondenseConfig(**common, save_steps=4, trainable="all", fsdp="full_shard auto_wrap", device="cpu"),
                      fsdp_out, progress=False, callbacks=[probe])
    record = {"world": torch.distributed.get_world_size(), "final": result.final, "probe": probe.seen}
    with open(os.path.join(fsdp_out, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main()
