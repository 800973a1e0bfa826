"""Episodic training of MFNet (paper Sec. IV-B): SGD + poly schedule, L = L_SEG + lambda L_PML.

One process, or one process per device under ``torchrun`` (``DistributedDataParallel``; see
``distributed.py``). Runs stop cleanly on SIGTERM / SIGINT after the current step with a
checkpoint from which ``resume`` continues exactly, mid-epoch included.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..config import Config
from ..data.benchmarks import build_episodes
from ..losses import pixel_triplet_loss, weighted_focal_loss
from ..model.build import build_mfnet
from ..model.mfnet import MFNet, QueryOutput
from ..ops.triplet_sampling import sample_triplets
from ..checkpoint import CheckpointError, load_checkpoint
from .checkpoint import capture_rng_state, restore_rng_state, save_checkpoint
from .distributed import DistContext, broadcast_buffers, shard_indices
from .logs import TrainLogger, plot_curves
from .resume import RESUME_FREE
from .schedule import poly_lr



class TrainingInterrupted(Exception):
    """SIGTERM / SIGINT stopped the run after a step; ``checkpoint`` resumes it exactly."""

    def __init__(self, signal_number: int, checkpoint: Path, step: int) -> None:
        self.signal_number, self.checkpoint, self.step = signal_number, checkpoint, step
        name = signal.Signals(signal_number).name
        super().__init__(f"{name} received: stopped after step {step}; checkpoint {checkpoint} "
                         f"(continue with --resume {checkpoint})")


@dataclass(frozen=True)
class StepLosses:
    total: torch.Tensor
    segmentation: torch.Tensor
    metric: torch.Tensor | None


class DeviceUnavailable(RuntimeError):
    """A device was asked for that this machine does not have (CUDA without a GPU)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {name!r} was asked for but CUDA is not available; "
                                "use --device cpu")
    return device


def autocast_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's autocast: none for "off", bfloat16 or float16 (CUDA only) otherwise."""
    if amp == "off":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (it uses a GradScaler); on the CPU use "
                         "--amp bf16 or --amp off")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def compute_losses(
    model: MFNet,
    batch: dict[str, torch.Tensor],
    config: Config,
    use_metric_loss: bool,
    generator: torch.Generator | None = None,
    amp: str = "off",
) -> StepLosses:
    """Forward one batch of episodes and compute L_SEG (+ lambda L_PML when switched on).

    With ``amp`` the forward runs under autocast; the losses always run in float32.
    """
    device = batch["query_image"].device
    with autocast_context(amp, device):
        cache = model.encode_support(batch["support_images"], batch["support_masks"])
        output = model.decode_query(batch["query_image"], cache, return_aux=True)
    assert isinstance(output, QueryOutput)
    with contextlib.nullcontext() if amp == "off" else torch.autocast(device.type, enabled=False):
        return _losses(model, output, batch["query_label"], config, use_metric_loss, generator)


def _losses(model: MFNet, output: QueryOutput, label: torch.Tensor, config: Config,
            use_metric_loss: bool, generator: torch.Generator | None) -> StepLosses:
    """L_SEG (+ lambda L_PML) of one forward pass; label [B, H, W]. Outputs are cast to float32
    (a no-op without mixed precision)."""
    if output.branch_logits is not None:  # binary branches: a binary loss per class, no PML
        losses = [
            weighted_focal_loss(output.branch_logits[:, n].float(),
                                torch.where(label == 255, label, (label == n + 1).long()),
                                gamma=config.loss.focal_gamma)
            for n in range(model.way)
        ]
        segmentation = torch.stack(losses).mean()
        return StepLosses(segmentation, segmentation, None)
    segmentation = weighted_focal_loss(output.logits.float(), label,
                                       gamma=config.loss.focal_gamma)
    if not use_metric_loss:
        return StepLosses(segmentation, segmentation, None)
    h, w = output.feature_logits.shape[-2:]
    label_small = F.interpolate(label[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    metric = pixel_triplet_loss(
        output.embedding.float(),
        output.feature_logits.argmax(dim=1),  # [B, h, w]
        label_small,  # [B, h, w]
        num_classes=model.way,
        num_triplets=config.loss.pml_triplets,
        margin=config.loss.pml_margin,
        positive_mode=config.loss.pml_mode,
        tau=config.loss.pml_tau,
        generator=generator,
        # config.train.ops: "auto" = the fused sampler on a GPU, the reference on the CPU
        sampler=functools.partial(sample_triplets, impl=config.train.ops),
    )
    return StepLosses(segmentation + config.loss.pml_weight * metric, segmentation, metric)


class _LossForward(nn.Module):
    """``compute_losses`` as a module's forward, so that ``DistributedDataParallel`` sees the
    forward pass it synchronises gradients for."""

    def __init__(self, model: MFNet, config: Config) -> None:
        super().__init__()
        self.model, self.config = model, config

    def forward(self, batch: dict[str, torch.Tensor], use_metric: bool,
                generator: torch.Generator | None) -> StepLosses:
        return compute_losses(self.model, batch, self.config, use_metric, generator,
                              self.config.train.amp)


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
        self.received = number

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def train(
    config: Config,
    resume: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    context: DistContext | None = None,
) -> tuple[MFNet, Path]:
    """Train MFNet episodically; returns the model and the path of the final checkpoint.

    A checkpoint (``last.pt``) is written atomically after every epoch (and every
    ``save_every_steps`` steps); ``resume`` continues from one, mid-epoch included, repeating the
    uninterrupted run's steps exactly (its config must match ``config`` except for
    ``RESUME_FREE``). ``context``: this process's place in a data-parallel job (every rank calls
    ``train``; rank 0 alone logs and writes files). Raises ``TrainingInterrupted`` after saving
    when SIGTERM / SIGINT arrived, ``FloatingPointError`` on a non-finite loss (the last good
    checkpoint is left as it is).
    """
    context = context or DistContext()
    rank, world = context.rank, context.world_size
    if not context.is_main:
        log, progress = (lambda _: None), False
    device = resolve_device(config.train.device)
    if context.enabled and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    amp = config.train.amp
    autocast_context(amp, device)  # a clear error for fp16 on the CPU, before any work
    torch.manual_seed(config.train.seed)
    model = build_mfnet(config.model, pool_impl=config.train.ops).to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        parameters,
        lr=config.train.lr,
        momentum=config.train.momentum,
        weight_decay=config.train.weight_decay,
    )
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    batch_size = config.train.batch_size  # per rank: a global batch is batch_size x world
    steps_per_epoch = config.train.episodes_per_epoch // (batch_size * world)
    if steps_per_epoch == 0:
        raise ValueError("episodes_per_epoch must be at least batch_size x world size")
    total_steps = config.train.epochs * steps_per_epoch
    start_epoch, step, epoch_step, resumed = 0, 0, 0, None
    if resume is not None:
        resumed = _restore(resume, config, model, optimizer, scaler, context)
        start_epoch, step, epoch_step = resumed["epoch"], resumed["step"], resumed["epoch_step"]
        log(f"resumed from {resume} at epoch {start_epoch + 1}, step {epoch_step} of the epoch "
            f"(global step {step})")
    out_dir = Path(config.train.out)
    checkpoint_path = out_dir / "last.pt"
    log(f"training on {device}"
        + (f" x {world} processes (global batch {batch_size * world})" if world > 1 else "")
        + f": {sum(p.numel() for p in parameters):,} learnable parameters, "
        f"{total_steps} steps, checkpoints in {out_dir}")
    if config.loss.pml_mode != "off" and config.train.epochs <= config.loss.pml_start_epoch:
        start = config.loss.pml_start_epoch
        log(f"warning: the pixel-wise metric loss (PML) never switches on in this run: it starts "
            f"at epoch {start + 1} (--pml-start-epoch {start}, counted from 0) but the run has "
            f"{config.train.epochs} epochs; train longer (--epochs {start + 1} or more) or lower "
            f"--pml-start-epoch")
    forward: nn.Module | None = None
    if context.enabled:
        forward = nn.parallel.DistributedDataParallel(
            _LossForward(model, config),
            device_ids=[device.index] if device.type == "cuda" else None,
        )  # every parameter gets a gradient at every step (L_PML on or off, any fusion)
    logger = TrainLogger(out_dir, enabled=context.is_main,
                         resume_step=step if resumed is not None else None)

    def save(epochs_done: int, steps_in_epoch: int, generator: torch.Generator,
             running: float | None) -> None:
        rng = capture_rng_state(generator)
        states = [rng] * world
        if context.enabled:
            dist.all_gather_object(states, rng)  # every rank's draws, for an exact resume
        if not context.is_main:
            return
        for name, value in model.state_dict().items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise FloatingPointError(
                    f"parameter {name} is not finite at step {step}; {checkpoint_path} is left "
                    f"as it was (the last good checkpoint)")
        payload = {
            "config": config.to_dict(), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": epochs_done, "step": step,
            "epoch_step": steps_in_epoch, "world_size": world, "rng": states,
            "running_loss": running,
        }
        if scaler is not None:
            payload["scaler"] = scaler.state_dict()
        save_checkpoint(checkpoint_path, payload)

    try:
        with _StopSignals() as signals:
            for epoch in range(start_epoch, config.train.epochs):
                skip = epoch_step if epoch == start_epoch else 0
                # Fresh, reproducible episodes every epoch: seed = f(data_seed, epoch); rank r
                # takes r, r + W, ... and the steps already done before a resume are skipped.
                episodes = build_episodes(config, "train", config.model.shot,
                                          config.train.episodes_per_epoch,
                                          seed=config.data.data_seed * 1_000_003 + epoch)
                indices = shard_indices(len(episodes), rank, world)[:steps_per_epoch * batch_size]
                loader = DataLoader(
                    Subset(episodes, indices[skip * batch_size:]),
                    batch_size=batch_size,
                    shuffle=False,
                    drop_last=True,
                    num_workers=config.train.workers,
                    pin_memory=device.type == "cuda",
                    worker_init_fn=_ignore_stop_signals,
                )
                use_metric = config.loss.pml_mode != "off" and epoch >= config.loss.pml_start_epoch
                # Per-epoch seeds (dropout, triplet draws), distinct per rank; mid-epoch, the
                # saved states. Creating the loader's iterator draws from torch's generator.
                epoch_seed = config.train.seed * 1000 + epoch + (rank * 1_000_003 << 20)
                generator = torch.Generator(device=device).manual_seed(epoch_seed)
                running = None
                if skip:
                    batches: Iterator = iter(loader)
                    restore_rng_state(resumed["rng"], generator)
                    running = resumed["running_loss"]
                else:
                    torch.manual_seed(epoch_seed)
                    batches = iter(loader)
                model.train()
                bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.train.epochs}", unit="step",
                           total=steps_per_epoch, initial=skip, disable=not progress,
                           dynamic_ncols=True)
                started, done = time.perf_counter(), skip
                for batch in bar:
                    batch = {key: value.to(device, non_blocking=True)
                             for key, value in batch.items()}
                    lr = poly_lr(config.train.lr, step, total_steps, config.train.poly_power)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    if forward is not None:
                        losses = forward(batch, use_metric, generator)
                    else:
                        losses = compute_losses(model, batch, config, use_metric, generator, amp)
                    stop, finite = _agree(signals.received is not None,
                                          bool(torch.isfinite(losses.total)), context, device)
                    if not finite:
                        raise FloatingPointError(
                            f"loss became {losses.total.item()} at step {step + 1} (epoch "
                            f"{epoch + 1}); stopped without saving: the last good checkpoint "
                            f"{checkpoint_path} is untouched; lower --lr (now "
                            f"{config.train.lr}) or check the data")
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(losses.total).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        losses.total.backward()
                        optimizer.step()
                    step, done = step + 1, done + 1
                    value = losses.total.item()
                    running = value if running is None else 0.95 * running + 0.05 * value
                    metric = None if losses.metric is None else losses.metric.item()
                    segmentation = losses.segmentation.item()
                    logger.step(step, epoch + 1, value, segmentation, metric, lr)
                    postfix = {"loss": f"{running:.4f}", "seg": f"{segmentation:.4f}",
                               "lr": f"{lr:.2e}"}
                    if metric is not None:
                        postfix["pml"] = f"{metric:.4f}"
                    bar.set_postfix(postfix)
                    if stop:
                        save(epoch, done, generator, running)
                        raise TrainingInterrupted(signals.received or signal.SIGTERM,
                                                  checkpoint_path, step)
                    every = config.train.save_every_steps
                    if every and step % every == 0 and done < steps_per_epoch:
                        save(epoch, done, generator, running)
                bar.close()
                elapsed = time.perf_counter() - started
                rate = (done - skip) * batch_size * world / max(elapsed, 1e-9)
                log(f"epoch {epoch + 1}: loss {running:.4f}, {rate:.1f} episodes/s, "
                    f"{elapsed:.0f} s")
                save(epoch + 1, 0, generator, running)
    finally:
        logger.close()
    if context.enabled:
        broadcast_buffers(model)
    if context.is_main:
        plot_curves(logger.csv_path, out_dir / "curves.png")
    return model.eval(), checkpoint_path


def _ignore_stop_signals(worker_id: int) -> None:
    """Data-loader workers leave SIGTERM / SIGINT to the main process (a signal sent to the whole
    process group would otherwise kill them before the main process has saved)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _agree(stop: bool, finite: bool, context: DistContext,
           device: torch.device) -> tuple[bool, bool]:
    """Whether any rank got a stop signal, and whether every rank's loss is finite (one small
    all_reduce per step under DDP, so that all ranks stop at the same step)."""
    if not context.enabled:
        return stop, finite
    flags = torch.tensor([float(stop), float(not finite)],
                         device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0] > 0), not bool(flags[1] > 0)


def _restore(path: str | Path, config: Config, model: MFNet, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler | None, context: DistContext) -> dict[str, Any]:
    payload = load_checkpoint(path)
    saved = payload["config"]
    current = config.to_dict()
    # Everything but the run length, device, I/O options must match, or it is another run.
    for section, values in saved.items():
        for name, value in values.items():
            if name not in RESUME_FREE and current[section].get(name) != value:
                raise CheckpointError(
                    f"cannot resume from {path}: {name} is {value!r} in the checkpoint but "
                    f"{current[section].get(name)!r} now; resume with the same options"
                )
    for key in ("optimizer", "epoch", "step"):
        if key not in payload:
            raise CheckpointError(f"{path} has no {key!r}: it is not a training checkpoint")
    epoch_step = int(payload.get("epoch_step", 0))
    saved_world = int(payload.get("world_size", 1))
    if epoch_step and saved_world != context.world_size:
        raise CheckpointError(
            f"{path} was written mid-epoch by {saved_world} processes; resume it with the same "
            f"number (now {context.world_size}) or from an end-of-epoch checkpoint")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if scaler is not None and "scaler" in payload:
        scaler.load_state_dict(payload["scaler"])
    states = payload.get("rng") or [None]
    rng = states[context.rank] if len(states) == context.world_size else states[0]
    if epoch_step and rng is None:
        raise CheckpointError(f"{path} has no random states: it cannot be resumed mid-epoch")
    return {"epoch": int(payload["epoch"]), "step": int(payload["step"]),
            "epoch_step": epoch_step, "rng": rng, "running_loss": payload.get("running_loss")}
