"""Data-parallel training under ``torchrun``: process group, episode sharding, count reduction.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them the run is a single
process (world size 1) and nothing here touches ``torch.distributed``. Episodes of an epoch are
indexed deterministically, so rank r simply takes indices r, r + W, r + 2W, ...: no duplicates,
no missing episode (up to the last incomplete global batch, which is dropped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job; ``world_size == 1`` for a plain run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether this is a data-parallel job (more than one process)."""
        return self.world_size > 1

    def local_device(self, device: torch.device) -> torch.device:
        """This process's device: under data parallelism a CUDA ``device`` becomes
        ``cuda:<local rank>`` (one GPU per process); otherwise ``device`` itself."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device


def init_distributed(device_name: str) -> DistContext:
    """Join the ``torchrun`` process group if the environment names one (nccl on CUDA, gloo on
    CPU); a no-op returning the single-process context otherwise or if already initialised."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device_name != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def shard_indices(num_items: int, rank: int, world_size: int) -> list[int]:
    """Indices of ``num_items`` that ``rank`` handles: r, r + W, ..."""
    return list(range(rank, num_items, world_size))


def all_reduce_sum(
    tensors: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Sum each tensor over all ranks (returned on the CPU); identity for a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    reduced = {}
    for name, value in tensors.items():
        buffer = value.to(device).clone()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        reduced[name] = buffer.cpu()
    return reduced


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank. DDP syncs them at the start of
    each forward, so after the last step they differ; evaluation shards need one model."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)
