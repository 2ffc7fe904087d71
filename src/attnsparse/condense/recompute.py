"""Activation checkpointing for condensation: each decoder layer's activations are recomputed in the backward pass.

A step holds the attention probabilities of every layer for backward (the sparse forward, its condensation loss and
the dense forward of `dense_weight`): at 2048 tokens on SmolLM2-135M that peaks near 22 GiB. Checkpointed, a layer
keeps only its input and recomputes the rest when its gradient is needed.

The attention backend reads its policy and observers from a shared `BackendState` at call time, and the trainer
switches them between the sparse and the dense forward of one step, so a plain recompute would run the layers of
the dense forward under the sparse policy. Each checkpointed call therefore snapshots the state at forward time and
the recompute runs under that snapshot. The regularizer must see the recomputed chunks too (the recompute has to
save the same tensors in the same order as the forward did), but into a fresh copy that is then dropped, so the
step's loss is not counted twice and no recomputed graph outlives its layer's backward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from attnsparse.attention.backend import BackendState
from attnsparse.condense.losses.regularizer import CondensationRegularizer
from attnsparse.errors import AttnsparseError


def enable_recompute(model: torch.nn.Module, state: BackendState) -> None:
    """Checkpoint every decoder layer of `model` (a transformers model), recomputing under the forward's state."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise AttnsparseError(f"{type(model).__name__} does not support activation checkpointing; "
                              "drop --gradient-checkpointing")
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": state_snapshot(state)})


def state_snapshot(state: BackendState) -> Callable[[], tuple[AbstractContextManager, AbstractContextManager]]:
    """`context_fn` for torch.utils.checkpoint: (nothing at forward, the forward's policy and observers at recompute)."""

    def context_fn() -> tuple[AbstractContextManager, AbstractContextManager]:
        return nullcontext(), _recompute_under(state, state.policy, list(state.observers))

    return context_fn


@contextmanager
def _recompute_under(state: BackendState, policy, observers: list) -> Iterator[None]:
    saved = state.policy, state.observers
    state.policy, state.observers = policy, [_scratch(observer) for observer in observers]
    try:
        yield
    finally:
        state.policy, state.observers = saved


def _scratch(observer):
    """A throwaway copy of a regularizer (same loss, k, budget; nothing accumulated); other observers as they are."""
    if isinstance(observer, CondensationRegularizer):
        shadow = copy.copy(observer)
        shadow.reset()
        return shadow
    return observer
