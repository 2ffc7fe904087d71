"""Decay toward the original's weights (L2-SP, decoupled as in AdamW's weight decay).

After each optimizer step every trained weight moves a share lr·α of the way back to the original's, so the weights
leave the original only as far as the losses keep pulling them. Unlike a held dense KL (`--dense-weight`), which
holds the predictions on the training text alone, the pull holds the function on every input, other domains included.
"""

from __future__ import annotations

import torch

from attnsparse.errors import AttnsparseError


def check_reference(model: torch.nn.Module, reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The reference's parameters by name, when it has every weight of `model` with its shape (else a one-line error,
    raised before the run starts: a teacher of another architecture can be distilled to but not anchored to)."""
    named = dict(reference.named_parameters())
    for name, weight in model.named_parameters():
        target = named.get(name)
        if target is None or target.shape != weight.shape:
            raise AttnsparseError(f"--anchor-weight: the original has no weight '{name}' of shape {tuple(weight.shape)} "
                                  "to pull the student's towards; the student and --teacher must share an architecture")
    return named


def anchor_pairs(model: torch.nn.Module, reference: torch.nn.Module | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(trained weight, its anchor) for every trainable parameter: the reference model's parameter of the same name
    (the original, kept frozen as the teacher), or without a reference a copy of the weight as it is now."""
    named = check_reference(model, reference) if reference is not None else {}
    return [(weight, named[name].detach() if reference is not None else weight.detach().clone())
            for name, weight in model.named_parameters() if weight.requires_grad]


@torch.no_grad()
def pull_toward_anchor(pairs: list[tuple[torch.Tensor, torch.Tensor]], share: float) -> None:
    """w ← w − share·(w − anchor) for every pair; `share` is lr·α of the step just taken, at most 1."""
    share = min(max(share, 0.0), 1.0)
    if share == 0.0:
        return
    for weight, target in pairs:
        weight.lerp_(target.to(device=weight.device, dtype=weight.dtype), share)
