"""A trap for code that forgets the device: tests run the GPU code paths on the CPU inside it.

Inside `device_trap()`, torch factories called without `device=` make meta tensors (torch's default-device
mode), so a tensor created on the default device instead of the data's device fails at its first use beside real
data, as a forgotten `device=` fails on a GPU. Copies to the host (`.cpu()`, `.numpy()`, `.tolist()`,
`.to("cpu")`) are recorded, so a test can require that a hot loop makes none.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_HOST_COPIES = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist}


def _names_cpu(value: Any) -> bool:
    """A literal "cpu": `.to(x.device)` is not a host copy even when the test's data is on the CPU."""
    return isinstance(value, str) and value.startswith("cpu")


class HostCopies(TorchFunctionMode):
    """Records every call that copies a tensor to the host, with the attnsparse line that made it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        to_host = func in _HOST_COPIES or (func is torch.Tensor.to and (
            any(_names_cpu(a) for a in args[1:]) or _names_cpu(kwargs.get("device"))))
        if to_host:
            frames = [f for f in traceback.extract_stack() if "/attnsparse/" in f.filename]
            where = f"{frames[-1].filename.split('/attnsparse/')[-1]}:{frames[-1].lineno}" if frames else "?"
            self.calls.append(f"{getattr(func, '__name__', func)} at {where}")
        return func(*args, **kwargs)


@contextmanager
def device_trap() -> Iterator[HostCopies]:
    """Factories default to the meta device and host copies are recorded (see the module docstring)."""
    copies = HostCopies()
    with torch.device("meta"), copies:
        yield copies
