"""Training, checkpoints and resume on the synthetic benchmark (tiny, CPU)."""

from __future__ import annotations

import argparse
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

from mfnet.data.benchmarks import build_episodes
from mfnet.model.build import build_mfnet
from mfnet.training.checkpoint import (
    CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint,
)
from mfnet.training import loop
from mfnet.training.loop import compute_losses, train
from mfnet.training.schedule import poly_lr


def test_poly_schedule() -> None:
    assert poly_lr(0.01, 0, 100) == pytest.approx(0.01)
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_lr(0.01, 100, 100) == 0.0
    with pytest.raises(ValueError):
        poly_lr(0.01, 0, 0)


def test_loss_goes_down_on_a_short_run(tiny_config) -> None:
    torch.manual_seed(0)
    config = tiny_config.replace(dropout=0.0)
    model = build_mfnet(config.model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    batch = next(iter(DataLoader(build_episodes(config, "train", 1, 4, seed=0), batch_size=4)))
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        step = compute_losses(model, batch, config, use_metric_loss=True, generator=generator)
        assert step.metric is not None and torch.isfinite(step.total)
        optimizer.zero_grad()
        step.total.backward()
        optimizer.step()
        losses.append(step.segmentation.item())
    assert sum(losses[-5:]) < 0.75 * sum(losses[:5]), losses


def test_train_writes_a_checkpoint_that_rebuilds_the_model(tiny_config) -> None:
    model, path = train(tiny_config, progress=False, log=lambda _: None)
    payload = load_checkpoint(path)
    assert payload["epoch"] == 1 and payload["step"] == 4
    assert payload["config"] == tiny_config.to_dict()
    rebuilt, config = model_from_checkpoint(path)
    assert config == tiny_config
    episode = build_episodes(config, "test", 1, 2, seed=5)
    batch = next(iter(DataLoader(episode, batch_size=2)))
    args = (batch["support_images"], batch["support_masks"], batch["query_image"])
    with torch.no_grad():
        assert torch.equal(model.eval()(*args), rebuilt(*args))
    assert not list(path.parent.glob("*.tmp")), "atomic save must not leave temporary files"


def test_resume_repeats_an_uninterrupted_run(tiny_config, monkeypatch) -> None:
    config = tiny_config.replace(epochs=2, dropout=0.3)  # dropout: RNG state matters too
    snapshots = []

    def save_and_keep(path, payload):  # keep the epoch-1 checkpoint, as if killed after it
        save_checkpoint(path, payload)
        if payload["epoch"] == 1:
            snapshot = path.with_name("epoch1.pt")
            shutil.copy(path, snapshot)
            snapshots.append(snapshot)

    monkeypatch.setattr(loop, "save_checkpoint", save_and_keep)
    straight, _ = train(config, progress=False, log=lambda _: None)
    resumed, path = train(config.replace(out=config.train.out + "-resumed"), resume=snapshots[0],
                          progress=False, log=lambda _: None)
    assert load_checkpoint(path)["epoch"] == 2
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match="fold is 0 in the checkpoint but 1 now"):
        train(config.replace(fold=1), resume=snapshots[0], progress=False, log=lambda _: None)


def test_bad_checkpoints_are_clear_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not an MFNet checkpoint"):
        load_checkpoint(foreign)
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(truncated, {"config": {}, "model": {"w": torch.zeros(1000)}})
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(truncated)


def test_checkpoint_with_an_arbitrary_object_is_refused(tmp_path) -> None:
    """weights_only=True: a pickled object that is not plain data is never unpickled."""
    path = tmp_path / "object.pt"
    torch.save({"format": "mfnet-checkpoint-v1", "config": argparse.Namespace(a=1), "model": {}},
               path)
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(path)
