"""Episodic training of MFNet (paper Sec. IV-B): SGD + poly schedule, L = L_SEG + lambda L_PML.

One process, or one process per device under ``torchrun`` (``DistributedDataParallel``; see
``distributed.py``). Runs stop cleanly on SIGTERM / SIGINT after the current step with a
checkpoint from which ``resume`` continues exactly, mid-epoch included. Rank 0 reports through
this module's logger (what trains where, one line per epoch) and, on request, shows each
epoch's progress (``mfnet.progress``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..config import Config
from ..data.datasets import build_episodes
from ..device import place_model, resolve_device
from ..model.build import build_mfnet
from ..model.mfnet import MFNet
from ..progress import ProgressLines, progress_bar
from .distributed import DistContext, broadcast_buffers, shard_indices
from .logs import TrainLogger, plot_curves
from .objective import StepLosses, autocast_context, compute_losses
from .resume import RESUME_FREE
from .rng_state import capture_rng_state, restore_rng_state
from .schedule import poly_lr

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """SIGTERM / SIGINT stopped the run after a step; ``checkpoint`` resumes it exactly."""

    def __init__(self, signal_number: int, checkpoint: Path, step: int) -> None:
        self.signal_number, self.checkpoint, self.step = signal_number, checkpoint, step
        name = signal.Signals(signal_number).name
        super().__init__(
            f"{name} received: stopped after step {step}; checkpoint {checkpoint} "
            f"(continue with --resume {checkpoint})"
        )


class _LossForward(nn.Module):
    """``compute_losses`` as a module's forward, so that ``DistributedDataParallel`` sees the
    forward pass it synchronises gradients for."""

    def __init__(self, model: MFNet, config: Config) -> None:
        super().__init__()
        self.model, self.config = model, config

    def forward(
        self, batch: dict[str, torch.Tensor], use_metric: bool, generator: torch.Generator | None
    ) -> StepLosses:
        """``compute_losses`` of ``batch`` with the run's configuration and precision."""
        return compute_losses(
            self.model, batch, self.config, use_metric, generator, self.config.train.amp
        )


class _StopSignals:
    """Records SIGTERM / SIGINT instead of dying, so the loop can stop after the current step.
    Installs its handlers only in the main thread; restores the previous ones on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: Any) -> None:
        """The signal handler: remember the signal; the loop stops after its step."""
        self.received = number

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


@dataclass(frozen=True)
class _Start:
    """Where a run starts: epoch (0-based), global step, steps already done in that epoch, and
    for a mid-epoch resume this rank's random states and running loss at that point."""

    epoch: int = 0
    step: int = 0
    epoch_step: int = 0
    rng: dict[str, Any] | None = None
    running_loss: float | None = None


@dataclass
class _Run:
    """The parts of one training run, and ``step``: the optimiser steps done so far."""

    config: Config
    context: DistContext
    device: torch.device
    model: MFNet
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    forward: nn.Module  # _LossForward, wrapped in DistributedDataParallel when data-parallel
    steps_per_epoch: int
    step: int

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run (the poly schedule's length)."""
        return self.config.train.epochs * self.steps_per_epoch

    @property
    def out_dir(self) -> Path:
        """The run's folder: checkpoint, logs, curves."""
        return Path(self.config.train.out)

    @property
    def checkpoint_path(self) -> Path:
        """``<out>/last.pt``, replaced atomically at each save."""
        return self.out_dir / "last.pt"


@dataclass
class _Epoch:
    """One epoch in progress: its number (0-based), whether L_PML is on, the generator of its
    draws (dropout, triplets), steps done (``skipped`` of them before a resume), running loss."""

    number: int
    use_metric: bool
    generator: torch.Generator
    skipped: int
    done: int
    running: float | None


def train(
    config: Config,
    resume: str | Path | None = None,
    progress: bool = True,
    context: DistContext | None = None,
) -> tuple[MFNet, Path]:
    """Train MFNet episodically; returns the model and the path of the final checkpoint.

    A checkpoint (``last.pt``) is written atomically after every epoch (and every
    ``save_every_steps`` steps); ``resume`` continues from one, mid-epoch included, repeating the
    uninterrupted run's steps exactly (its config must match ``config`` except for
    ``RESUME_FREE``). ``context``: this process's place in a data-parallel job (every rank calls
    ``train``; rank 0 alone logs, shows ``progress`` and writes files). Raises
    ``TrainingInterrupted`` after saving when SIGTERM / SIGINT arrived, ``FloatingPointError`` on
    a non-finite loss (the last good checkpoint is left as it is).
    """
    run, start = _set_up(config, context or DistContext(), resume)
    _log_start(run, start, resume)
    train_log = TrainLogger(
        run.out_dir,
        enabled=run.context.is_main,
        resume_step=start.step if resume is not None else None,
    )
    with contextlib.closing(train_log), _StopSignals() as signals:
        for number in range(start.epoch, config.train.epochs):
            _train_epoch(run, number, start, train_log, signals, progress and run.context.is_main)
    if run.context.enabled:
        broadcast_buffers(run.model)
    if run.context.is_main:
        plot_curves(train_log.csv_path, run.out_dir / "curves.png")
    return run.model.eval(), run.checkpoint_path


def _set_up(config: Config, context: DistContext, resume: str | Path | None) -> tuple[_Run, _Start]:
    """The run's device, model, SGD optimiser (and fp16 gradient scaler), the state of the
    ``resume`` checkpoint, and the loss forward (under DDP when data-parallel)."""
    device = context.local_device(resolve_device(config.train.device))
    autocast_context(config.train.amp, device)  # a clear error for fp16 on the CPU, before any work
    torch.manual_seed(config.train.seed)
    model = place_model(
        build_mfnet(config.model, pool_impl=config.train.ops), device, config.train.memory_format
    )
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.train.lr,
        momentum=config.train.momentum,
        weight_decay=config.train.weight_decay,
    )
    scaler = torch.amp.GradScaler("cuda") if config.train.amp == "fp16" else None
    # batch_size is per rank: a global batch is batch_size x world
    steps_per_epoch = config.train.episodes_per_epoch // (
        config.train.batch_size * context.world_size
    )
    if steps_per_epoch == 0:
        raise ValueError("episodes_per_epoch must be at least batch_size x world size")
    start = _Start()
    if resume is not None:
        start = _restore(resume, config, model, optimizer, scaler, context)
    forward: nn.Module = _LossForward(model, config)
    if context.enabled:
        forward = nn.parallel.DistributedDataParallel(
            forward,
            device_ids=[device.index] if device.type == "cuda" else None,
        )  # every parameter gets a gradient at every step (L_PML on or off, any fusion)
    run = _Run(
        config, context, device, model, optimizer, scaler, forward, steps_per_epoch, step=start.step
    )
    return run, start


def _log_start(run: _Run, start: _Start, resume: str | Path | None) -> None:
    """Rank 0's opening lines: where a resumed run continues, what trains where, and a warning
    when the run is too short for L_PML ever to switch on."""
    if not run.context.is_main:
        return
    config, world = run.config, run.context.world_size
    if resume is not None:
        log.info(
            "resumed from %s at epoch %d, step %d of the epoch (global step %d)",
            resume,
            start.epoch + 1,
            start.epoch_step,
            start.step,
        )
    learnable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    processes = (
        f" x {world} processes (global batch {config.train.batch_size * world})"
        if world > 1
        else ""
    )
    log.info(
        "training on %s%s: %s learnable parameters, %d steps, checkpoints in %s",
        run.device,
        processes,
        f"{learnable:,}",
        run.total_steps,
        run.out_dir,
    )
    if config.loss.pml_mode != "off" and config.train.epochs <= config.loss.pml_start_epoch:
        first = config.loss.pml_start_epoch
        log.warning(
            "the pixel-wise metric loss (PML) never switches on in this run: it starts "
            "at epoch %d (--pml-start-epoch %d, counted from 0) but the run has %d "
            "epochs; train longer (--epochs %d or more) or lower --pml-start-epoch",
            first + 1,
            first,
            config.train.epochs,
            first + 1,
        )


def _train_epoch(
    run: _Run,
    number: int,
    start: _Start,
    train_log: TrainLogger,
    signals: _StopSignals,
    progress: bool,
) -> None:
    """Epoch ``number`` (0-based): its optimisation steps, then its log line and checkpoint.
    Raises ``TrainingInterrupted`` after the step in which a stop signal arrived."""
    epoch, batches = _begin_epoch(run, number, start)
    run.model.train()
    bar = progress_bar(
        batches,
        f"epoch {number + 1}/{run.config.train.epochs}",
        unit="step",
        total=run.steps_per_epoch,
        initial=epoch.skipped,
        enabled=progress,
    )
    started = time.perf_counter()
    every = run.config.train.save_every_steps
    for batch in bar:
        losses, lr, stop = _optimisation_step(run, epoch, batch, signals)
        _record_step(run, epoch, losses, lr, train_log, bar)
        if stop:
            _save(run, epoch, epochs_done=number, steps_in_epoch=epoch.done)
            raise TrainingInterrupted(
                signals.received or signal.SIGTERM, run.checkpoint_path, run.step
            )
        if every and run.step % every == 0 and epoch.done < run.steps_per_epoch:
            _save(run, epoch, epochs_done=number, steps_in_epoch=epoch.done)
    bar.close()
    _log_epoch(run, epoch, time.perf_counter() - started)
    _save(run, epoch, epochs_done=number + 1, steps_in_epoch=0)


def _begin_epoch(run: _Run, number: int, start: _Start) -> tuple[_Epoch, Iterator]:
    """Epoch ``number``'s state and its batches: this rank's share of the epoch's episodes,
    without the steps done before a resume."""
    config, context = run.config, run.context
    batch_size = config.train.batch_size
    skip = start.epoch_step if number == start.epoch else 0
    # Fresh, reproducible episodes every epoch: seed = f(data_seed, epoch); rank r takes
    # r, r + W, ... and the steps already done before a resume are skipped.
    episodes = build_episodes(
        config,
        "train",
        config.model.shot,
        config.train.episodes_per_epoch,
        seed=config.data.data_seed * 1_000_003 + number,
        batch_group=batch_size * context.world_size,  # way-flexible: one n per global batch
    )
    indices = shard_indices(len(episodes), context.rank, context.world_size)[
        : run.steps_per_epoch * batch_size
    ]
    loader = DataLoader(
        Subset(episodes, indices[skip * batch_size :]),
        batch_size=batch_size,
        shuffle=False,
        drop_last=True,
        num_workers=config.train.workers,
        pin_memory=run.device.type == "cuda",
        worker_init_fn=_ignore_stop_signals,
    )
    use_metric = config.loss.pml_mode != "off" and number >= config.loss.pml_start_epoch
    # Per-epoch seeds (dropout, triplet draws), distinct per rank; mid-epoch, the saved states.
    # Creating the loader's iterator draws from torch's generator.
    epoch_seed = config.train.seed * 1000 + number + (context.rank * 1_000_003 << 20)
    generator = torch.Generator(device=run.device).manual_seed(epoch_seed)
    if skip:
        batches = iter(loader)
        assert start.rng is not None  # _restore refuses a mid-epoch checkpoint without them
        restore_rng_state(start.rng, generator)
        return _Epoch(number, use_metric, generator, skip, skip, start.running_loss), batches
    torch.manual_seed(epoch_seed)
    return _Epoch(number, use_metric, generator, 0, 0, None), iter(loader)


def _optimisation_step(
    run: _Run, epoch: _Epoch, batch: dict[str, torch.Tensor], signals: _StopSignals
) -> tuple[StepLosses, float, bool]:
    """One SGD step on ``batch`` at the poly learning rate; returns the losses, that rate and
    whether any rank got a stop signal (checked after the forward, so a signal that arrives
    during it stops after this step). A non-finite loss raises ``FloatingPointError`` before
    the parameters change."""
    config = run.config
    batch = {key: value.to(run.device, non_blocking=True) for key, value in batch.items()}
    lr = poly_lr(config.train.lr, run.step, run.total_steps, config.train.poly_power)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    losses = run.forward(batch, epoch.use_metric, epoch.generator)
    stop, finite = _agree(
        signals.received is not None, bool(torch.isfinite(losses.total)), run.context, run.device
    )
    if not finite:
        raise FloatingPointError(
            f"loss became {losses.total.item()} at step {run.step + 1} (epoch "
            f"{epoch.number + 1}); stopped without saving: the last good checkpoint "
            f"{run.checkpoint_path} is untouched; lower --lr (now {config.train.lr}) or check "
            f"the data"
        )
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(losses.total).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        losses.total.backward()
        run.optimizer.step()
    run.step += 1
    return losses, lr, stop


def _record_step(
    run: _Run,
    epoch: _Epoch,
    losses: StepLosses,
    lr: float,
    train_log: TrainLogger,
    bar: ProgressLines | tqdm,
) -> None:
    """Count the step done, update the running loss (EMA 0.95), write its log row and show the
    losses beside the progress."""
    epoch.done += 1
    value = losses.total.item()
    epoch.running = value if epoch.running is None else 0.95 * epoch.running + 0.05 * value
    metric = None if losses.metric is None else losses.metric.item()
    segmentation = losses.segmentation.item()
    train_log.step(run.step, epoch.number + 1, value, segmentation, metric, lr)
    postfix = {"loss": f"{epoch.running:.4f}", "seg": f"{segmentation:.4f}", "lr": f"{lr:.2e}"}
    if metric is not None:
        postfix["pml"] = f"{metric:.4f}"
    bar.set_postfix(postfix)


def _log_epoch(run: _Run, epoch: _Epoch, elapsed: float) -> None:
    """Rank 0's line for a finished epoch: running loss, episodes per second (all ranks), time."""
    if not run.context.is_main:
        return
    episodes = (epoch.done - epoch.skipped) * run.config.train.batch_size * run.context.world_size
    log.info(
        "epoch %d: loss %.4f, %.1f episodes/s, %.0f s",
        epoch.number + 1,
        epoch.running,
        episodes / max(elapsed, 1e-9),
        elapsed,
    )


def _save(run: _Run, epoch: _Epoch, epochs_done: int, steps_in_epoch: int) -> None:
    """Write ``last.pt`` (rank 0) after ``epochs_done`` epochs and ``steps_in_epoch`` steps of the
    next, with every rank's random states so that a resume repeats the following steps."""
    rng = capture_rng_state(epoch.generator)
    states = [rng] * run.context.world_size
    if run.context.enabled:
        dist.all_gather_object(states, rng)  # every rank's draws, for an exact resume
    if not run.context.is_main:
        return
    _check_finite_parameters(run)
    payload = {
        "config": run.config.to_dict(),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "epoch": epochs_done,
        "step": run.step,
        "epoch_step": steps_in_epoch,
        "world_size": run.context.world_size,
        "rng": states,
        "running_loss": epoch.running,
    }
    if run.scaler is not None:
        payload["scaler"] = run.scaler.state_dict()
    save_checkpoint(run.checkpoint_path, payload)


def _check_finite_parameters(run: _Run) -> None:
    """Refuse to overwrite the last good checkpoint with non-finite parameters."""
    for name, value in run.model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise FloatingPointError(
                f"parameter {name} is not finite at step {run.step}; {run.checkpoint_path} is "
                f"left as it was (the last good checkpoint)"
            )


def _ignore_stop_signals(worker_id: int) -> None:
    """Data-loader workers leave SIGTERM / SIGINT to the main process (a signal sent to the whole
    process group would otherwise kill them before the main process has saved)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _agree(
    stop: bool, finite: bool, context: DistContext, device: torch.device
) -> tuple[bool, bool]:
    """Whether any rank got a stop signal, and whether every rank's loss is finite (one small
    all_reduce per step under DDP, so that all ranks stop at the same step)."""
    if not context.enabled:
        return stop, finite
    flags = torch.tensor(
        [float(stop), float(not finite)], device=device if device.type == "cuda" else "cpu"
    )
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0] > 0), not bool(flags[1] > 0)


def _restore(
    path: str | Path,
    config: Config,
    model: MFNet,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    context: DistContext,
) -> _Start:
    """Load the training checkpoint ``path`` into ``model``, ``optimizer`` (and ``scaler``);
    returns where the run continues. Raises ``CheckpointError`` for another run's checkpoint."""
    payload = load_checkpoint(path)
    _check_same_run(path, payload["config"], config.to_dict())
    for key in ("optimizer", "epoch", "step"):
        if key not in payload:
            raise CheckpointError(f"{path} has no {key!r}: it is not a training checkpoint")
    epoch_step = int(payload.get("epoch_step", 0))
    saved_world = int(payload.get("world_size", 1))
    if epoch_step and saved_world != context.world_size:
        raise CheckpointError(
            f"{path} was written mid-epoch by {saved_world} processes; resume it with the same "
            f"number (now {context.world_size}) or from an end-of-epoch checkpoint"
        )
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if scaler is not None and "scaler" in payload:
        scaler.load_state_dict(payload["scaler"])
    states = payload.get("rng") or [None]
    rng = states[context.rank] if len(states) == context.world_size else states[0]
    if epoch_step and rng is None:
        raise CheckpointError(f"{path} has no random states: it cannot be resumed mid-epoch")
    return _Start(
        epoch=int(payload["epoch"]),
        step=int(payload["step"]),
        epoch_step=epoch_step,
        rng=rng,
        running_loss=payload.get("running_loss"),
    )


def _check_same_run(path: str | Path, saved: dict[str, dict], current: dict[str, dict]) -> None:
    """Everything but the run length, device and I/O options (``RESUME_FREE``) must match the
    checkpoint's configuration, or it is another run."""
    for section, values in saved.items():
        changed = [
            name
            for name, value in values.items()
            if name not in RESUME_FREE and current[section].get(name) != value
        ]
        if changed:
            name = changed[0]
            raise CheckpointError(
                f"cannot resume from {path}: {name} is {values[name]!r} in the checkpoint but "
                f"{current[section].get(name)!r} now; resume with the same options"
            )
