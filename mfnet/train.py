"""``python -m mfnet.train``: episodic N-way K-shot training of MFNet, then evaluation.

With no arguments it runs the ``synthetic-cpu`` preset: the embedded synthetic benchmark (no
download), the small trainable backbone, 2-way 1-shot on fold 0, about ten minutes on two CPU
cores. After training it evaluates the checkpoint on the fold's novel classes with the paper's
protocol and prints mIoU*, mIoU and FB-IoU next to the training-free prototype baseline.
Any option below overrides the preset.

Data parallel: ``torchrun --nproc_per_node=G -m mfnet.train ...`` (``--batch-size`` is per
process). SIGTERM / SIGINT stop after the current step with a checkpoint (exit code 0 for
SIGTERM, 130 for SIGINT); ``--resume`` continues it exactly.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from mfnet_runtime import options

from .config import PRESETS, Config, add_config_arguments, overrides_from_args, preset
from .evaluate import evaluate_model, write_results
from .errors import mfnet_command
from .evaluation import format_results, protocol_description
from .training.distributed import DistContext, init_distributed
from .training.logs import write_eval_scalars
from .training.loop import TrainingInterrupted, resolve_device, train

SECTIONS = ("model", "loss", "data", "train", "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mfnet.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="synthetic-cpu", choices=sorted(PRESETS),
                        help="named configuration the options below override "
                             "(default: synthetic-cpu)")
    parser.add_argument("--resume", default=None, metavar="CKPT", type=options.file_path,
                        help="continue training from this checkpoint (same options required)")
    parser.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                        help="evaluate on the novel classes after training (default: on)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show progress bars (default: on)")
    add_config_arguments(parser, SECTIONS)
    return parser


@mfnet_command(FloatingPointError)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    context = DistContext()
    try:
        overrides = overrides_from_args(args, SECTIONS)
        if "out" not in overrides and args.preset != "synthetic-cpu":
            fold = overrides.get("fold", PRESETS[args.preset].get("fold", 0))
            overrides["out"] = f"runs/{args.preset}/fold{fold}"
        config = preset(args.preset, **overrides)
        context = init_distributed(config.train.device)
        return _run(args, config, context, started)
    except TrainingInterrupted as stop:
        if context.is_main:
            print(f"stopped: {stop}", file=sys.stderr)
        return 0 if stop.signal_number == signal.SIGTERM else 130
    finally:
        if context.enabled:
            dist.destroy_process_group()


def _run(args: argparse.Namespace, config: Config, context: DistContext, started: float) -> int:
    model, checkpoint = train(config, resume=args.resume, progress=args.progress,
                              context=context)
    if context.is_main:
        print(f"checkpoint: {checkpoint}")
    if args.evaluate:
        device = resolve_device(config.train.device)
        if context.enabled and device.type == "cuda":
            device = torch.device("cuda", context.local_rank)
        results = evaluate_model(model, config, device, progress=args.progress, context=context)
        if context.is_main:
            print(format_results(results, protocol_description(config)))
            out = Path(config.train.out)
            steps = config.train.epochs * (config.train.episodes_per_epoch
                                           // (config.train.batch_size * context.world_size))
            write_eval_scalars(out, steps, results)
            if config.train.visuals:
                from .visualize import save_visuals
                paths = save_visuals(model, config, device, out / "visuals",
                                     config.train.visuals, name=f"step{steps}")
                print(f"qualitative results: {', '.join(map(str, paths))}")
            wall = time.perf_counter() - started
            results_path = checkpoint.parent / "results.json"
            write_results(results_path, results, config,
                          {"checkpoint": str(checkpoint), "wall_time_s": wall,
                           "world_size": context.world_size})
            print(f"results written to {results_path}")
    if context.is_main:
        print(f"wall time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
