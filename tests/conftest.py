"""Shared fixtures: a tiny CPU configuration of the default preset."""

from __future__ import annotations

import pytest
import torch

from mfnet.config import Config, preset


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture
def tiny_config(tmp_path) -> Config:
    """The synthetic-cpu preset shrunk to run in about a second (PML on from the first epoch)."""
    return preset("synthetic-cpu").replace(
        image_size=48, channels=16, epochs=1, episodes_per_epoch=16, batch_size=4, workers=0,
        pml_start_epoch=0, eval_runs=2, eval_episodes=6, eval_batch_size=3,
        out=str(tmp_path / "run"),
    )
