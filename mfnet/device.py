"""Which torch device a command runs on (``--device auto|cpu|cuda|cuda:N`` resolved and checked)
and how a model is placed there (device and memory layout)."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn


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


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def place_model(model: ModuleT, device: torch.device, memory_format: str) -> ModuleT:
    """``model`` moved to ``device`` with its 4-D weights in ``memory_format``
    (``TrainConfig.memory_format``: "channels_last" | "contiguous"). Weights in channels_last
    make the convolutions produce (and take) activations in it; the inputs stay as they are.
    Raises ``ValueError`` for another name."""
    formats = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    if memory_format not in formats:
        raise ValueError(f"unknown memory format {memory_format!r}; use {' or '.join(formats)}")
    return model.to(device).to(memory_format=formats[memory_format])
