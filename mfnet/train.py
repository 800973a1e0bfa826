"""``python -m mfnet.train``: episodic N-way K-shot training of MFNet, then evaluation.

With no arguments it runs the ``synthetic-cpu`` preset: the embedded synthetic benchmark (no
download), the small trainable backbone, 2-way 1-shot on fold 0, 8 to 12 minutes on two CPU
cores. After training it evaluates the checkpoint on the fold's novel classes with the paper's
protocol and prints mIoU*, mIoU and FB-IoU next to the training-free prototype baseline.
Any option below overrides the preset; the defaults shown are those of the preset chosen with
--preset (``python -m mfnet.train --preset NAME --help`` shows another preset's), and
--print-config prints the whole resolved configuration as JSON.

A new run refuses an --out folder that already holds a checkpoint (--overwrite replaces it).
``--resume CKPT`` continues a run exactly: the configuration and the output folder come from
the checkpoint, and options given again may change only --epochs, --device, --workers,
--save-every-steps, --visuals and the evaluation options (--eval-*).

Data parallel: ``torchrun --nproc_per_node=G -m mfnet.train ...`` (``--batch-size`` is per
process). SIGTERM / SIGINT stop after the current step with a checkpoint (exit code 0 for
SIGTERM, 130 for SIGINT); ``--resume`` continues it exactly.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mfnet_runtime import options
from mfnet_runtime.console import configure_logging

from .config import PRESETS, Config, add_config_arguments, overrides_from_args, preset
from .device import resolve_device
from .errors import mfnet_command
from .evaluate import evaluate_model, write_results
from .model.mfnet import MFNet
from .protocol import ProtocolResult, format_results, protocol_description
from .threads import add_threads_argument, set_torch_threads
from .training.distributed import DistContext, init_distributed
from .training.logs import write_eval_scalars
from .training.loop import TrainingInterrupted, train
from .training.resume import (
    CHANGEABLE_ON_RESUME,
    ResumeError,
    check_new_run_folder,
    resume_config,
)

SECTIONS = ("model", "loss", "data", "train", "eval")
DEFAULT_PRESET = "synthetic-cpu"


def new_run_config(preset_name: str, overrides: dict[str, Any]) -> Config:
    """A new run's configuration: the preset with ``overrides``; presets other than
    synthetic-cpu write to ``runs/<preset>/fold<fold>`` unless --out is given."""
    overrides = dict(overrides)
    if "out" not in overrides and preset_name != DEFAULT_PRESET:
        fold = overrides.get("fold", PRESETS[preset_name].get("fold", 0))
        overrides["out"] = f"runs/{preset_name}/fold{fold}"
    return preset(preset_name, **overrides)


def _help_defaults(preset_name: str) -> Config | None:
    """The preset's configuration for the help text (None when it needs --data-root)."""
    needs_root = PRESETS[preset_name].get("dataset", "synthetic") != "synthetic"
    try:
        return new_run_config(preset_name, {"data_root": "(required)"} if needs_root else {})
    except ValueError:
        return None


def build_parser(preset_name: str = DEFAULT_PRESET) -> argparse.ArgumentParser:
    """The command line; the help shows ``preset_name``'s values as the defaults."""
    parser = argparse.ArgumentParser(
        prog="python -m mfnet.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="named configuration the options below override (default: "
        f"{DEFAULT_PRESET}; the defaults shown below are {preset_name}'s)",
    )
    parser.add_argument(
        "--resume",
        default=None,
        metavar="CKPT",
        type=options.file_path,
        help="continue the run of this checkpoint, into its own folder, with "
        "its configuration; only "
        + ", ".join("--" + n.replace("_", "-") for n in sorted(CHANGEABLE_ON_RESUME))
        + " may be given to change them",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="let a new run replace the checkpoint already in --out",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration as JSON and exit",
    )
    parser.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate on the novel classes after training (default: on)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show progress bars (default: on)",
    )
    add_threads_argument(parser)
    defaults = _help_defaults(preset_name)
    add_config_arguments(
        parser,
        SECTIONS,
        defaults=defaults,
        default_text=None if defaults is not None else f"preset {preset_name}",
    )
    return parser


def _chosen_preset(argv: list[str] | None) -> str:
    """--preset, read before the full parser is built (so its help shows that preset)."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--preset", default=DEFAULT_PRESET)
    known, _ = early.parse_known_args(argv)
    return known.preset if known.preset in PRESETS else DEFAULT_PRESET


def resolve_config(args: argparse.Namespace) -> Config:
    """The run's configuration: from the checkpoint with --resume, else from the preset (and
    then the --out folder must not hold another run's checkpoint unless --overwrite)."""
    overrides = overrides_from_args(args, SECTIONS)
    if args.resume is not None:
        if args.preset is not None:
            raise ResumeError(
                "--preset does not apply with --resume: the configuration comes from the checkpoint"
            )
        if args.overwrite:
            raise ResumeError(
                "--overwrite does not apply with --resume: a resumed run "
                "continues its own checkpoint"
            )
        return resume_config(args.resume, overrides)
    config = new_run_config(args.preset or DEFAULT_PRESET, overrides)
    if not args.print_config:
        check_new_run_folder(config.train.out, args.overwrite)
    return config


@mfnet_command(FloatingPointError)
def main(argv: list[str] | None = None) -> int:
    """``python -m mfnet.train``: returns the exit code (0; 130 after SIGINT; 2 on an error)."""
    args = build_parser(_chosen_preset(argv)).parse_args(argv)
    configure_logging()  # the library's lines: "training on ...", "epoch N: ...", warnings
    started = time.perf_counter()
    context = DistContext()
    try:
        config = resolve_config(args)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        policy = set_torch_threads(args.threads, config.train.workers)
        context = init_distributed(config.train.device)
        if context.is_main:
            print(policy.describe())
        return _run(args, config, context, started)
    except TrainingInterrupted as stop:
        if context.is_main:
            print(f"stopped: {stop}", file=sys.stderr)
        return 0 if stop.signal_number == signal.SIGTERM else 130
    finally:
        if context.enabled:
            dist.destroy_process_group()


def _run(args: argparse.Namespace, config: Config, context: DistContext, started: float) -> int:
    """Train, then (with --evaluate) evaluate the model; rank 0 reports and writes the results."""
    model, checkpoint = train(config, resume=args.resume, progress=args.progress, context=context)
    if context.is_main:
        print(f"checkpoint: {checkpoint}")
    if args.evaluate:
        device = context.local_device(resolve_device(config.train.device))
        results = evaluate_model(model, config, device, progress=args.progress, context=context)
        if context.is_main:
            _report(model, config, device, results, checkpoint, context.world_size, started)
    if context.is_main:
        print(f"wall time: {time.perf_counter() - started:.0f} s")
    return 0


def _report(
    model: MFNet,
    config: Config,
    device: torch.device,
    results: dict[str, ProtocolResult],
    checkpoint: Path,
    world_size: int,
    started: float,
) -> None:
    """The final evaluation's table, TensorBoard scalars, qualitative grids (``--visuals``) and
    ``results.json`` beside the checkpoint (with the wall time since ``started``)."""
    print(format_results(results, protocol_description(config)))
    out = Path(config.train.out)
    steps = config.train.epochs * (
        config.train.episodes_per_epoch // (config.train.batch_size * world_size)
    )
    write_eval_scalars(out, steps, results)
    if config.train.visuals:
        from .visualize import save_visuals

        paths = save_visuals(
            model, config, device, out / "visuals", config.train.visuals, name=f"step{steps}"
        )
        print(f"qualitative results: {', '.join(map(str, paths))}")
    wall = time.perf_counter() - started
    results_path = checkpoint.parent / "results.json"
    write_results(
        results_path,
        results,
        config,
        {"checkpoint": str(checkpoint), "wall_time_s": wall, "world_size": world_size},
    )
    print(f"results written to {results_path}")


if __name__ == "__main__":
    sys.exit(main())
