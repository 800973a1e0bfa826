"""Checkpoints, written: atomically, with every random state a resumed run needs.

The format (and reading a checkpoint back) is ``mfnet.checkpoint``'s; this module adds the
training side: ``save_checkpoint`` and the random states a resumed run restores
(``capture_rng_state`` / ``restore_rng_state``).
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mfnet_runtime.atomic import atomic_write_bytes

from ..checkpoint import FORMAT


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus the format tag) to ``path`` atomically.

    The bytes go to a temporary file in the same directory, are flushed to disk, and replace the
    target with ``os.replace``, so an interrupted save never leaves a truncated checkpoint.
    """
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    atomic_write_bytes(path, buffer.getvalue(), durable=True)


def capture_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random state a training step reads: python ``random``, numpy's global generator,
    torch's CPU generator, the CUDA generators (when CUDA is available) and ``generator`` (the
    triplet sampler's). Plain data and tensors only (``weights_only`` loading)."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Inverse of ``capture_rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state["numpy"]
    np.random.set_state((saved["name"], saved["keys"].numpy().astype(np.uint32),
                         saved["position"], saved["has_gauss"], saved["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
