"""Which parameters condensation trains: all, attention projections, query/key projections, or LoRA adapters.

The condensation loss depends on the attention scores q·k, so q/k projections (`qk`) are the smallest set that
can move it; `attn` adds the value and output projections; `lora` trains low-rank adapters (peft) on the chosen
projections and merges them into the weights on save. Modules are found by name, which covers Llama-style
(`q_proj`, `k_proj`, `v_proj`, `o_proj`: Llama, Qwen, Mistral, SmolLM2) and GPT-2 (`attn.c_attn`, fused q/k/v,
and `attn.c_proj`).
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
from transformers import PreTrainedModel

from attnsparse.errors import AttnsparseError

Trainable = Literal["all", "attn", "qk", "lora"]
TRAINABLE_SETS: tuple[str, ...] = ("all", "attn", "qk", "lora")

# Module-name suffixes of each projection set (Llama-style first, then GPT-2's fused projections).
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "qk": ("q_proj", "k_proj", "attn.c_attn", "query_key_value"),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj", "attn.c_attn", "attn.c_proj", "query_key_value", "attn.dense"),
}


def projection_names(model: torch.nn.Module, which: str, layers: set[int] | None = None) -> list[str]:
    """Names of the modules of projection set `which` ("qk" or "attn"), optionally only in some layers."""
    suffixes = _SUFFIXES[which]
    names = []
    for name, module in model.named_modules():
        if not name.endswith(suffixes) or not any(True for _ in module.parameters(recurse=False)):
            continue
        if layers is not None and _layer_of(name) not in layers:
            continue
        names.append(name)
    return names


def _layer_of(name: str) -> int | None:
    """The decoder layer index in a module name such as `model.layers.3.self_attn.q_proj` or `h.3.attn`."""
    parts = name.split(".")
    for before, part in itertools.pairwise(parts):
        if part.isdigit() and before in ("layers", "h", "layer", "blocks"):
            return int(part)
    return None


def set_trainable(model: PreTrainedModel, which: str, layers: set[int] | None = None) -> list[str]:
    """Freeze everything except set `which` ("all", "attn" or "qk"); returns the trainable parameter names."""
    if which not in ("all", "attn", "qk"):
        raise AttnsparseError(f"unknown trainable set '{which}'; choose one of {', '.join(TRAINABLE_SETS)}")
    if which == "all":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    else:
        modules = projection_names(model, which, layers)
        if not modules:
            raise AttnsparseError(
                f"{type(model).__name__}: found no attention projections for trainable set '{which}' "
                "(looked for q_proj/k_proj/v_proj/o_proj or GPT-2 c_attn/c_proj); use --trainable all"
            )
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for name in modules:
            for parameter in model.get_submodule(name).parameters():
                parameter.requires_grad_(True)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise AttnsparseError("no parameters left to train; check --trainable and --layers")
    return names


def add_lora(model: PreTrainedModel, targets: str = "qk", rank: int = 8, alpha: float = 16.0,
             layers: set[int] | None = None) -> torch.nn.Module:
    """Wrap the model with peft LoRA adapters on projection set `targets`; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise AttnsparseError(f"LoRA rank must be >= 1, got {rank}")
    if targets not in _SUFFIXES:
        raise AttnsparseError(f"LoRA targets must be qk or attn, got '{targets}'")
    modules = projection_names(model, targets, layers)
    if not modules:
        raise AttnsparseError(f"{type(model).__name__}: found no attention projections to put LoRA adapters on")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=modules, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merged(model: torch.nn.Module) -> PreTrainedModel:
    """The plain transformers model: LoRA adapters merged into the weights (peft), or the model itself."""
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        return model.merge_and_unload()
    return model  # type: ignore[return-value]
