"""Training, checkpoints and resume on the synthetic benchmark (tiny, CPU)."""

from __future__ import annotations

import argparse
import copy
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mfnet import evaluate
from mfnet.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from mfnet.config import Config
from mfnet.data.datasets import build_episodes
from mfnet.device import place_model
from mfnet.model.build import build_mfnet
from mfnet.training import loop
from mfnet.training.logs import read_log
from mfnet.training.loop import train
from mfnet.training.objective import StepLosses, compute_losses
from mfnet.training.schedule import poly_lr
from mfnet_runtime.console import configure_logging


def test_poly_schedule() -> None:
    assert poly_lr(0.01, 0, 100) == pytest.approx(0.01)
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5**0.9)
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


def test_zero_triplets_trains_exactly_as_pml_off() -> None:
    """Fig. 5's Nt = 0 is accepted and is PML off: the same optimisation steps, the same weights.
    On a model whose labels vary (so PML has triplets), Nt = 20 moves the weights elsewhere:
    the comparison can fail."""
    from runtime_fixtures import varied_model

    base, config_dict = varied_model(way=2, shot=1, size=48)
    config = Config.from_dict(config_dict).replace(device="cpu", pml_start_epoch=0)
    batch = next(iter(DataLoader(build_episodes(config, "train", 1, 4, seed=0), batch_size=4)))
    # seed 0: a batch with PML triplets at the logits' label positions (seeds 1-3 have none)
    weights, metrics = {}, {}
    for name, loss, use_metric in (("zero", dict(pml_triplets=0), True),
                                   ("off", dict(pml_mode="off"), False),
                                   ("on", dict(pml_triplets=20), True)):  # fmt: skip
        variant = config.replace(**loss)
        model = copy.deepcopy(base)  # eval mode: the calibrated labels, hence PML triplets
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        torch.manual_seed(0)  # the same dropout masks in every variant
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):
            step = compute_losses(model, batch, variant, use_metric, generator)
            metrics.setdefault(name, None if step.metric is None else step.metric.item())
            optimizer.zero_grad()
            step.total.backward()
            optimizer.step()
        weights[name] = model.state_dict()
    assert metrics["zero"] is None and metrics["off"] is None and metrics["on"] > 0
    for key, value in weights["off"].items():
        assert torch.equal(weights["zero"][key], value), key
    assert any(not torch.equal(weights["on"][k], v) for k, v in weights["off"].items())


def test_pml_switches_and_aligned_labels_reach_the_triplet_loss(monkeypatch) -> None:
    """compute_losses hands L_PML the configured reduction and normalisation, and the labels at
    the features' receptive-field centres; the two reductions give
    different metric losses on a model whose labels vary."""
    from mfnet.losses import labels_at_feature_centres
    from mfnet.training import objective
    from runtime_fixtures import varied_model

    base, config_dict = varied_model(way=2, shot=1, size=48)
    config = Config.from_dict(config_dict).replace(device="cpu", pml_start_epoch=0)
    batch = next(iter(DataLoader(build_episodes(config, "train", 1, 4, seed=0), batch_size=4)))
    label = batch["query_label"]  # [B, 48, 48]
    assert len(label.unique()) > 2  # background, both ways (and 255): the labels vary
    seen: list[dict] = []
    real = objective.pixel_triplet_loss

    def recording(embedding, pred, target, **kwargs):
        seen.append(dict(kwargs, target=target))
        return real(embedding, pred, target, **kwargs)

    monkeypatch.setattr(objective, "pixel_triplet_loss", recording)
    metrics = {}
    for reduction, normalize in (("sum", False), ("mean", True)):
        variant = config.replace(pml_reduction=reduction, pml_normalize=normalize)
        step = compute_losses(base, batch, variant, True, torch.Generator().manual_seed(0))
        assert step.metric is not None
        metrics[reduction] = step.metric.item()
        assert (seen[-1]["reduction"], seen[-1]["normalize"]) == (reduction, normalize)
    h, w = seen[-1]["target"].shape[-2:]
    assert torch.equal(seen[-1]["target"], labels_at_feature_centres(label, (h, w), 8))
    corners = [round(i * 47 / (h - 1)) for i in range(h)]  # align_corners positions at 48 -> 6
    assert not torch.equal(seen[-1]["target"], label[:, corners][:, :, corners])
    assert metrics["sum"] > 0 and metrics["sum"] != pytest.approx(metrics["mean"])


def test_train_writes_a_checkpoint_that_rebuilds_the_model(tiny_config) -> None:
    model, path = train(tiny_config, progress=False)
    payload = load_checkpoint(path)
    assert payload["epoch"] == 1 and payload["step"] == 4
    assert payload["config"] == tiny_config.to_dict()
    rebuilt, config = model_from_checkpoint(path)
    assert config == tiny_config
    episode = build_episodes(config, "test", 1, 2, seed=5)
    batch = next(iter(DataLoader(episode, batch_size=2)))
    args = (batch["support_images"], batch["support_masks"], batch["query_image"])
    # rebuilt in the plain layout: the trained model's channels_last only rounds differently
    model = place_model(model, torch.device("cpu"), "contiguous")
    with torch.no_grad():
        assert torch.equal(model.eval()(*args), rebuilt(*args))
    assert not list(path.parent.glob("*.tmp")), "atomic save must not leave temporary files"


def test_training_logs_its_lines_and_shows_whole_progress_lines_in_a_log_file(
    tiny_config, capsys
) -> None:
    configure_logging()  # as the commands do: the library's INFO lines on stdout
    train(tiny_config, progress=True)
    captured = capsys.readouterr()  # captured: stderr is not a terminal
    assert captured.out.startswith("training on cpu: ") and "epoch 1: loss " in captured.out
    assert "\r" not in captured.err
    progress = [line for line in captured.err.splitlines() if line.startswith("epoch 1/1: ")]
    assert [line.split(" (")[0] for line in progress] == [f"epoch 1/1: {n}/4" for n in (1, 2, 3, 4)]
    assert "loss=" in progress[-1] and "pml=" in progress[-1]


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
    straight, _ = train(config, progress=False)
    resumed, path = train(
        config.replace(out=config.train.out + "-resumed"), resume=snapshots[0], progress=False
    )
    assert load_checkpoint(path)["epoch"] == 2
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match="fold is 0 in the checkpoint but 1 now"):
        train(config.replace(fold=1), resume=snapshots[0], progress=False)


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
    torch.save(
        {"format": "mfnet-checkpoint-v1", "config": argparse.Namespace(a=1), "model": {}}, path
    )
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(path)


def _train_command(out, *extra: str) -> list[str]:
    """``python -m mfnet.train`` on a tiny config: 3 epochs x 8 steps, dropout and PML on."""
    return [
        sys.executable,
        "-m",
        "mfnet.train",
        "--image-size",
        "48",
        "--channels",
        "16",
        "--epochs",
        "3",
        "--episodes-per-epoch",
        "32",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--pml-start-epoch",
        "1",
        "--dropout",
        "0.3",
        "--no-evaluate",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def _losses(out) -> list[tuple[str, ...]]:
    return [
        tuple(row[k] for k in ("step", "epoch", "loss", "seg", "pml", "lr"))
        for row in read_log(out / "log.csv")
    ]


# The child sends itself the signal while computing the loss of step N (a deterministic point,
# unlike a parent that sleeps and polls): the run must finish that step, save, and stop.
_SIGNAL_AT_STEP = """
import os, signal, sys
from mfnet import train
from mfnet.training import loop

at_step, number = int(sys.argv[1]), getattr(signal, sys.argv[2])
real, calls = loop.compute_losses, [0]

def signalling(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at_step:
        os.kill(os.getpid(), number)
    return real(*args, **kwargs)

loop.compute_losses = signalling
sys.exit(train.main(sys.argv[3:]))
"""


def _train_signalled(out, at_step: int, name: str, env) -> subprocess.CompletedProcess:
    args = _train_command(out)[3:]  # the options after "python -m mfnet.train"
    return subprocess.run(
        [sys.executable, "-c", _SIGNAL_AT_STEP, str(at_step), name, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sigterm_then_resume_repeats_the_per_step_losses_exactly(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    straight = tmp_path / "straight"
    subprocess.run(_train_command(straight), check=True, env=env, capture_output=True)
    expected = _losses(straight)
    assert len(expected) == 24

    out = tmp_path / "interrupted"
    stopped = _train_signalled(out, 11, "SIGTERM", env)  # mid-epoch 2 (8 steps an epoch)
    assert stopped.returncode == 0, stopped.stderr
    assert "SIGTERM" in stopped.stderr and str(out / "last.pt") in stopped.stderr
    payload = load_checkpoint(out / "last.pt")
    assert payload["step"] == 11 and payload["epoch_step"] == 3
    assert _losses(out) == expected[:11]
    assert set(payload["rng"][0]) >= {"python", "numpy", "torch", "generator"}

    subprocess.run(
        _train_command(out, "--resume", str(out / "last.pt")),
        check=True,
        env=env,
        capture_output=True,
    )
    assert _losses(out) == expected  # bit-exact per-step loss sequence, mid-epoch resume included
    assert (out / "curves.png").stat().st_size > 0
    assert any((out / "tensorboard").iterdir())


def test_sigint_stops_after_the_step_with_exit_code_130(tmp_path) -> None:
    out = tmp_path / "run"
    stopped = _train_signalled(out, 2, "SIGINT", {**os.environ, "OMP_NUM_THREADS": "1"})
    assert stopped.returncode == 130, stopped.stderr
    assert "SIGINT" in stopped.stderr and "Traceback" not in stopped.stderr
    assert load_checkpoint(out / "last.pt")["step"] == 2 and len(_losses(out)) == 2


def test_save_every_steps_and_nan_loss_keeps_the_last_good_checkpoint(
    tiny_config, monkeypatch
) -> None:
    config = tiny_config.replace(epochs=2, save_every_steps=3)
    calls = []
    real = loop.compute_losses

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 5:  # step 5 (epoch 2, step 1): NaN
            return StepLosses(losses.total * math.nan, losses.segmentation, losses.metric)
        return losses

    monkeypatch.setattr(loop, "compute_losses", poisoned)
    with pytest.raises(FloatingPointError, match="loss became nan at step 5.*untouched"):
        train(config, progress=False)
    payload = load_checkpoint(Path(config.train.out) / "last.pt")
    assert payload["step"] == 4 and payload["epoch"] == 1 and payload["epoch_step"] == 0
    assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())

    calls.clear()
    monkeypatch.setattr(loop, "compute_losses", real)
    saved = []
    monkeypatch.setattr(
        loop,
        "save_checkpoint",
        lambda path, payload: saved.append((payload["step"], payload["epoch_step"])),
    )
    train(config, progress=False)
    assert saved == [(3, 3), (4, 0), (6, 2), (8, 0)]


def test_bf16_autocast_trains_on_cpu_and_fp16_needs_cuda(tiny_config) -> None:
    torch.manual_seed(0)
    config = tiny_config.replace(dropout=0.0, amp="bf16")
    model = build_mfnet(config.model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    batch = next(iter(DataLoader(build_episodes(config, "train", 1, 4, seed=0), batch_size=4)))
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(12):
        step = compute_losses(model, batch, config, True, generator, amp="bf16")
        assert step.total.dtype == torch.float32 and torch.isfinite(step.total)
        optimizer.zero_grad()
        step.total.backward()
        optimizer.step()
        losses.append(step.segmentation.item())
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
            train(tiny_config.replace(amp="fp16", device="cpu"), progress=False)


def _is_channels_last(tensor: torch.Tensor) -> bool:
    """A 4-D tensor laid out NHWC (and not also NCHW, as a 1x1-spatial one would be)."""
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def test_channels_last_trains_and_scores_as_contiguous_up_to_rounding(tiny_config) -> None:
    config = tiny_config.replace(dropout=0.0, batch_size=4)
    torch.manual_seed(0)
    built = build_mfnet(config.model).train()
    batch = next(iter(DataLoader(build_episodes(config, "train", 1, 4, seed=0), batch_size=4)))
    optimizer = torch.optim.SGD(built.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    for _ in range(30):  # until it predicts more than background and PML finds triplets
        optimizer.zero_grad()
        compute_losses(built, batch, config, True, generator).total.backward()
        optimizer.step()
    steps = {}
    for name in ("channels_last", "contiguous"):
        model = place_model(copy.deepcopy(built), torch.device("cpu"), name)
        convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        spatial = [w for w in convs if w.shape[-1] > 1]  # a 1x1 kernel is both layouts at once
        assert spatial and all(_is_channels_last(w) == (name == "channels_last") for w in spatial)
        losses = compute_losses(model, batch, config, True, torch.Generator().manual_seed(0))
        losses.total.backward()
        output = model.decode_query(
            batch["query_image"],
            model.encode_support(batch["support_images"], batch["support_masks"]),
            return_aux=True,
        )
        assert _is_channels_last(output.embedding) == (name == "channels_last")  # the layout took
        grads = {key: p.grad.clone() for key, p in model.named_parameters() if p.grad is not None}
        steps[name] = (losses, output.logits.detach(), grads)
    fast, plain = steps["channels_last"], steps["contiguous"]
    assert plain[0].metric is not None and plain[0].metric > 0  # PML on and its hinge active
    assert plain[1].argmax(dim=1).unique().numel() > 1  # logits that vary: more than one label
    torch.testing.assert_close(fast[0].total, plain[0].total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], plain[1], rtol=1e-4, atol=1e-5)
    assert fast[2].keys() == plain[2].keys() and len(fast[2]) > 10
    for key, grad in fast[2].items():
        # BatchNorm's small bias gradients cancel the most: up to 0.4 % apart measured
        error = (grad - plain[2][key]).norm() / plain[2][key].norm()
        assert error < 1e-2, (key, float(error))
    every = torch.cat([g.flatten() for g in fast[2].values()])
    reference = torch.cat([plain[2][key].flatten() for key in fast[2]])
    assert (every - reference).norm() / reference.norm() < 1e-3


def test_training_and_evaluation_use_the_configured_memory_format(tiny_config, monkeypatch) -> None:
    model, _ = train(tiny_config, progress=False)  # the synthetic-cpu default: channels_last
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(_is_channels_last(w) for w in convs if w.shape[-1] > 1)
    placed = []
    monkeypatch.setattr(
        evaluate, "place_model", lambda m, d, f: placed.append(f) or place_model(m, d, f)
    )
    plain = tiny_config.replace(memory_format="contiguous")
    results = evaluate.evaluate_model(model, plain, torch.device("cpu"), progress=False)
    assert placed == ["contiguous"] and results["MFNet"].mean("miou_star") >= 0
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(ValueError, match="unknown memory format 'nhwc'"):
        place_model(model, torch.device("cpu"), "nhwc")
