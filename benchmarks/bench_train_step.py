"""python benchmarks/bench_train_step.py [--threads 1] [--rounds 5] [--steps 20] [--out DIR]

The time of one training step of the default run (the ``synthetic-cpu`` preset: forward,
L_SEG + lambda L_PML, backward, SGD step) for each memory layout of the model
(``--memory-format``: channels_last, contiguous), on the same fixed batches, in one process.
The layouts take turns: every round times ``--steps`` steps of each, after warm-up steps of
each, so that a change in the machine's load between rounds reaches both alike. Threads are
set explicitly (``--threads``, default 1: what the thread policy gives training beside its
loader worker on two cores).

Writes ``<out>/train_step_<cpu>.json`` (device, versions, per layout the median and p10/p90 of
the per-step times over all rounds, and each layout's median as a ratio to contiguous) and
prints the table; docs/decisions.md quotes it.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mfnet.config import MEMORY_FORMATS, Config, preset
from mfnet.data.datasets import build_episodes
from mfnet.device import place_model
from mfnet.model.build import build_mfnet
from mfnet.training.objective import compute_losses

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
if str(BENCH_DIR) not in sys.path:  # importable from the tests too
    sys.path.insert(0, str(BENCH_DIR))

from _common import device_info, now_utc, summarize, versions, write_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench_train_step.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every layout (5)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round (20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per layout (3)")
    parser.add_argument(
        "--image-size", type=int, default=None, help="input side (default: the preset's, 96)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON result")
    return parser.parse_args(argv)


class StepRunner:
    """One layout's model and optimiser; ``step(batch)`` is one training step (PML on)."""

    def __init__(self, model: torch.nn.Module, config: Config, memory_format: str) -> None:
        self.config = config
        self.model = place_model(model, torch.device("cpu"), memory_format).train()
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(parameters, lr=config.train.lr, momentum=0.9)
        self.generator = torch.Generator().manual_seed(0)

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        losses = compute_losses(self.model, batch, self.config, True, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        self.optimizer.step()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if min(args.threads, args.rounds, args.steps) < 1 or args.warmup < 0:
        print("error: --threads, --rounds and --steps must be at least 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    config = preset("synthetic-cpu", device="cpu")
    if args.image_size:
        config = config.replace(image_size=args.image_size)
    torch.manual_seed(config.train.seed)
    built = build_mfnet(config.model)
    runners = {name: StepRunner(copy.deepcopy(built), config, name) for name in MEMORY_FORMATS}
    count = max(args.steps, args.warmup)
    episodes = build_episodes(config, "train", 1, count * config.train.batch_size, seed=1)
    batches = list(DataLoader(episodes, batch_size=config.train.batch_size))  # drawn up front
    for runner in runners.values():
        for batch in batches[: args.warmup]:
            runner.step(batch)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for round_number in range(args.rounds):
        for name, runner in runners.items():
            for batch in batches[: args.steps]:
                started = time.perf_counter()
                runner.step(batch)
                samples[name].append((time.perf_counter() - started) * 1e3)
        print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr)
    stats = {name: summarize(values) for name, values in samples.items()}
    for name in stats:
        stats[name]["ratio_to_contiguous"] = (
            stats[name]["median_ms"] / stats["contiguous"]["median_ms"]
        )
    info = device_info("cpu")
    payload = {
        "benchmark": "train_step",
        "measured_at": now_utc(),
        "device": info,
        "versions": versions(),
        "settings": {
            "preset": "synthetic-cpu",
            "image_size": config.model.image_size,
            "batch_size": config.train.batch_size,
            "way": config.model.way,
            "shot": config.model.shot,
            "threads": args.threads,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "warmup": args.warmup,
        },
        "layouts": stats,
    }
    tag = re.sub(r"[^a-z0-9]+", "_", info["cpu"].lower()).strip("_")[:40] or "cpu"
    path = args.out / f"train_step_{tag}.json"
    write_json(path, payload)
    print("| layout | median ms/step | p10 | p90 | x contiguous |")
    print("|---|---:|---:|---:|---:|")
    for name, cell in stats.items():
        print(
            f"| {name} | {cell['median_ms']:.1f} | {cell['p10_ms']:.1f} | {cell['p90_ms']:.1f} "
            f"| {cell['ratio_to_contiguous']:.2f} |"
        )
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
