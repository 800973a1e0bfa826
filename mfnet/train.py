"""``python -m mfnet.train``: episodic N-way K-shot training of MFNet, then evaluation.

With no arguments it runs the ``synthetic-cpu`` preset: the embedded synthetic benchmark (no
download), the small trainable backbone, 2-way 1-shot on fold 0, about ten minutes on two CPU
cores. After training it evaluates the checkpoint on the fold's novel classes with the paper's
protocol and prints mIoU*, mIoU and FB-IoU next to the training-free prototype baseline.
Any option below overrides the preset.
"""

from __future__ import annotations

import argparse
import sys
import time

from .config import PRESETS, add_config_arguments, overrides_from_args, preset
from .evaluate import evaluate_model, write_results
from .evaluation import format_results, protocol_description
from .training.checkpoint import CheckpointError
from .training.loop import resolve_device, train

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
    parser.add_argument("--resume", default=None, metavar="CKPT",
                        help="continue training from this checkpoint (same options required)")
    parser.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                        help="evaluate on the novel classes after training (default: on)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show progress bars (default: on)")
    add_config_arguments(parser, SECTIONS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        overrides = overrides_from_args(args, SECTIONS)
        if "out" not in overrides and args.preset != "synthetic-cpu":
            fold = overrides.get("fold", PRESETS[args.preset].get("fold", 0))
            overrides["out"] = f"runs/{args.preset}/fold{fold}"
        config = preset(args.preset, **overrides)
        model, checkpoint = train(config, resume=args.resume, progress=args.progress)
    except (CheckpointError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"checkpoint: {checkpoint}")
    if args.evaluate:
        device = resolve_device(config.train.device)
        results = evaluate_model(model, config, device, progress=args.progress)
        print(format_results(results, protocol_description(config)))
        wall = time.perf_counter() - started
        results_path = checkpoint.parent / "results.json"
        write_results(results_path, results, config,
                      {"checkpoint": str(checkpoint), "wall_time_s": wall})
        print(f"results written to {results_path}")
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
