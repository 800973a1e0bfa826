"""Which torch device a command runs on: ``--device auto|cpu|cuda|cuda:N`` resolved and checked."""

from __future__ import annotations

import torch


class DeviceUnavailable(RuntimeError):
    """A device was asked for that this machine does not have (CUDA without a GPU)."""


def resolve_device(name: str) -> torch.device:
    """The device ``name`` names; "auto" is CUDA when available, else the CPU.

    Raises ``ValueError`` for a name torch does not know, ``DeviceUnavailable`` for CUDA on a
    machine without it.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"device {name!r} was asked for but CUDA is not available; use --device cpu"
        )
    return device
