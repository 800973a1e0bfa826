"""Data-parallel training and evaluation: 2 CPU processes (gloo), as under torchrun."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mfnet.metrics import FewShotMeter
from mfnet.model.build import build_mfnet
from mfnet.protocol import run_protocol
from mfnet.training import loop
from mfnet.training.distributed import DistContext, init_distributed, shard_indices


def test_shard_indices_partition_the_episodes() -> None:
    shards = [shard_indices(10, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(shards, [])) == list(range(10))


def test_meter_state_merge_equals_one_meter_over_all_episodes() -> None:
    generator = torch.Generator().manual_seed(0)
    episodes = [
        (
            torch.randint(0, 3, (2, 8, 8), generator=generator),
            torch.randint(0, 3, (2, 8, 8), generator=generator),
            classes,
        )
        for classes in ([1, 2], [3, 1], [2, 3], [1, 3])
    ]
    whole, first, second = FewShotMeter([1, 2, 3]), FewShotMeter([1, 2, 3]), FewShotMeter([1, 2, 3])
    for i, (pred, target, classes) in enumerate(episodes):
        whole.update(pred, target, classes)
        (first if i % 2 else second).update(pred, target, classes)
    merged = FewShotMeter([1, 2, 3])
    merged.merge(first.state())
    merged.merge(second.state())
    assert merged.compute() == whole.compute()
    with pytest.raises(ValueError, match="shape"):
        FewShotMeter([1, 2]).merge(first.state())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, config, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    context = init_distributed("cpu")
    assert dist.get_backend() == "gloo"  # CPU processes, also on a machine with GPUs
    seen: list[int] = []
    real = loop.shard_indices

    def recording(num_items: int, rank: int, world_size: int) -> list[int]:
        indices = real(num_items, rank, world_size)
        seen.extend(indices)  # the episodes of the epoch this rank trains on
        return indices

    loop.shard_indices = recording
    try:
        model, _ = loop.train(config, progress=False, context=context)
        results = run_protocol(
            {"MFNet": model}, config, torch.device("cpu"), progress=False, context=context
        )
        torch.save(
            {"params": model.state_dict(), "seen": seen, "runs": list(results["MFNet"].runs)},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_trains_in_sync_on_disjoint_episodes(tiny_config, tmp_path) -> None:
    # eval_episodes=5: uneven shards (3 + 2)
    config = tiny_config.replace(
        device="cpu",
        epochs=2,
        episodes_per_epoch=16,
        batch_size=2,
        eval_batch_size=1,
        eval_runs=2,
        eval_episodes=5,
    )
    mp.spawn(_worker, args=(2, _free_port(), config, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name  # parameters in sync
    seen = [set(r["seen"]) for r in ranks]
    assert len(ranks[0]["seen"]) == 2 * 8 and not seen[0] & seen[1]  # 4 steps x 2 per epoch
    assert seen[0] | seen[1] == set(range(16))
    # repr: exact float digits, and NaN (a class without data) compares equal to NaN
    assert repr(ranks[0]["runs"]) == repr(ranks[1]["runs"])  # every rank: the reduced metrics

    model = build_mfnet(config.model)
    model.load_state_dict(ranks[0]["params"])
    single = run_protocol(
        {"MFNet": model.eval()}, config, torch.device("cpu"), progress=False, context=DistContext()
    )
    assert repr(list(single["MFNet"].runs)) == repr(ranks[0]["runs"])  # sharded == one process
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert not any(k.startswith("module.") for k in checkpoint["model"])
