"""The random states a resumed training run restores, saved in its checkpoint's ``rng`` entry.

(The checkpoint format itself, written and read, is ``mfnet.checkpoint``'s.)
"""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch


def capture_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random state a training step reads: python ``random``, numpy's global generator,
    torch's CPU generator, the CUDA generators (when CUDA is available) and ``generator`` (the
    triplet sampler's). Plain data and tensors only (``weights_only`` loading)."""
    version, internal, gauss = random.getstate()
    # the global generator is numpy's MT19937, whose legacy state is this tuple
    legacy = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    name, keys, position, has_gauss, cached = legacy
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
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
    np.random.set_state(
        (
            saved["name"],
            saved["keys"].numpy().astype(np.uint32),
            saved["position"],
            saved["has_gauss"],
            saved["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
