"""Where and in what precision a command computes: `--device` and `--dtype`, resolved and checked in one place.

Every command that loads a model takes both; the model, its data, the backend's tensors, the observers'
accumulators, the losses and the decode caches then live on that device. A request the machine cannot serve
(cuda without CUDA, an unknown name) is one line before any work. A code path that exists only for the CPU (the
compiled kernels in `attnsparse.core.native`, numpy code) is never silently taken for device tensors: either a torch
path serves the device, or `require_cpu` says in one line that there is none.
"""

from __future__ import annotations

import torch

from attnsparse.errors import AttnsparseError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def default_device() -> torch.device:
    """cuda when torch sees a CUDA device, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device (None: `default_device`); one-line error for a name torch does not know or a
    CUDA device this machine does not have, before any work. "meta" is accepted (tests: shapes without data)."""
    if device is None:
        return default_device()
    if isinstance(device, torch.device):
        resolved = device
    else:
        try:
            resolved = torch.device(str(device).strip().lower())
        except (RuntimeError, ValueError):
            raise AttnsparseError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise AttnsparseError(f"--device {device} asks for CUDA, but this torch sees no CUDA device "
                                  f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                                  "use --device cpu or a machine with a GPU")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise AttnsparseError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to "
                                  f"cuda:{count - 1}")
    elif resolved.type not in ("cpu", "meta"):
        raise AttnsparseError(f"--device {device}: attnsparse runs on cpu or cuda; {resolved.type} is not supported")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None = None) -> torch.dtype:
    """`dtype` as a torch.dtype (None: float32); one-line error outside float32 / bfloat16 / float16."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise AttnsparseError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise AttnsparseError(f"--dtype {dtype!r} is not supported; use float32, bfloat16 or float16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: how config.json and results record it."""
    return str(dtype).removeprefix("torch.")


def device_name(device: torch.device) -> str:
    """"cuda:0 (NVIDIA H200)" or "cpu": the device as config.json records it (the GPU's model when known)."""
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def placement(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """{"device": ..., "dtype": ...}: the fields every run's config.json carries."""
    return {"device": device_name(device), "dtype": dtype_name(dtype)}


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (cpu for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of a model's first floating-point parameter (float32 when it has none)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def require_cpu(tensor: torch.Tensor, what: str) -> None:
    """One-line error when `tensor` is not on the CPU: `what` (a CPU-only implementation) has no device version.

    The dispatch point for a device kernel is the caller: it tries the device implementation first and calls this
    only where none exists, so nothing is computed on the CPU by a silent copy.
    """
    if tensor.device.type != "cpu":
        raise AttnsparseError(f"{what} has no {tensor.device.type} implementation (it runs on the CPU only); "
                              "use --device cpu for it")


def check_placement(model: torch.nn.Module, device: str | torch.device | None, dtype: str | torch.dtype | None,
                    what: str = "the model") -> None:
    """A model object passed in stays where it is: a `device` or `dtype` asked for that it does not have is a
    one-line error (move it with `model.to(...)`, or leave both None), never a silent copy or cast."""
    if device is not None:
        wanted = resolve_device(device)
        have = model_device(model)
        if have.type != wanted.type or (wanted.index is not None and have.index != wanted.index):
            raise AttnsparseError(f"{what} is on {have}, not {wanted}; move it first (model.to('{wanted}')) or pass "
                                  "device=None")
    if dtype is not None and model_dtype(model) != resolve_dtype(dtype):
        raise AttnsparseError(f"{what} is {dtype_name(model_dtype(model))}, not {dtype_name(resolve_dtype(dtype))}; "
                              "cast it first (model.to(dtype)) or pass dtype=None")
