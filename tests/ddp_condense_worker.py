"""One process of the two-process (gloo, CPU) condense test; launched by tests/test_condense_ddp.py via torchrun."""

from __future__ import annotations

import os
import sys

import torch


def main() -> None:
    tiny_dir, text, out = sys.argv[1:4]
    torch.set_num_threads(1)
    from attnsparse.condense import CondenseConfig, condense

    config = CondenseConfig(model=tiny_dir, data=text, k=4, steps=4, batch_size=2, seq_len=32, lr=5e-3, lam=2.0,
                            save_steps=2, warmup_steps=0, lr_scheduler="constant", margin=0.1)
    result = condense(config, out, progress=False)
    rank = int(os.environ["RANK"])
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    state = {name: tensor.detach().clone() for name, tensor in result.model.state_dict().items()}
    torch.save({"world": world, "state": state, "final": result.final}, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
