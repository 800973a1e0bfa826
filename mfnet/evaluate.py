"""``python -m mfnet.evaluate --checkpoint PATH``: the paper's evaluation protocol on novel classes.

Prints the protocol options with mIoU*, mIoU and FB-IoU (mean +- std over runs) for MFNet and,
on the same episodes, the training-free prototype baseline. ``--folds 0,1,2,3`` evaluates one
checkpoint per fold (``{fold}`` in the path is replaced) and prints a table laid out like the
paper's (mIoU*/mIoU per fold and mean). ``--naive-way N`` runs a 1-way checkpoint N times per
N-way episode (the naive transfer of Table V). Data-protocol options (test source, small-object
filter, resolution, ...) can be changed at evaluation time; they are printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mfnet_runtime import options
from mfnet_runtime.atomic import atomic_write_bytes
from mfnet_runtime.console import configure_logging

from .checkpoint import load_checkpoint, model_from_checkpoint
from .config import Config, add_config_arguments, overrides_from_args
from .device import place_model, resolve_device
from .errors import mfnet_command
from .model.baseline import PrototypeBaseline
from .model.grouping import GroupedMultiWay
from .model.mfnet import MFNet
from .model.naive import NaiveMultiWay
from .protocol import (
    Predictor,
    ProtocolResult,
    fold_table,
    format_results,
    protocol_description,
    run_protocol,
)
from .threads import add_threads_argument, set_torch_threads
from .training.distributed import DistContext

# The benchmark and fold are the checkpoint's: other folds are evaluated with --folds.
FIXED_BY_CHECKPOINT = ("dataset", "fold")


def evaluate_model(
    model: MFNet,
    config: Config,
    device: torch.device,
    baseline: bool = True,
    progress: bool = True,
    naive: bool = False,
    context: DistContext | None = None,
    grouped: bool = False,
) -> dict[str, ProtocolResult]:
    """Run the protocol for ``model`` (and the baseline on its features) on the same episodes.

    With ``naive``, ``model`` is 1-way and runs once per class of the ``config.model.way``-way
    episodes. With ``grouped``, episodes of any number of classes are decoded in groups of the
    model's slots where they do not fit (``model.grouping``). With a data-parallel
    ``context`` the episodes are sharded over the ranks and the counts summed (every rank
    must call this; all get the same results).
    """
    # the training run's layout, so that a checkpoint scores as it did after its training
    model = place_model(model, device, config.train.memory_format).eval()
    predictors: dict[str, Predictor]
    if naive:
        predictors = {"MFNet 1-way x N": NaiveMultiWay(model)}
    elif grouped:
        predictors = {"MFNet (groups)": GroupedMultiWay(model)}
    else:
        predictors = {"MFNet": model}
    if baseline:
        predictors["baseline"] = PrototypeBaseline(model.extract_features)
    return run_protocol(predictors, config, device, progress=progress, context=context)


def write_results(
    path: Path, results: dict[str, ProtocolResult], config: Config, extra: dict | None = None
) -> None:
    """Write the protocol, configuration and per-predictor summaries (+ ``extra``) as JSON,
    atomically."""
    payload = {
        "protocol": protocol_description(config),
        "config": config.to_dict(),
        "results": {name: result.summary() for name, result in results.items()},
        **(extra or {}),
    }
    atomic_write_bytes(path, json.dumps(payload, indent=2, default=str).encode())


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m mfnet.evaluate``."""
    parser = argparse.ArgumentParser(
        prog="python -m mfnet.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=options.file_path,
        help="checkpoint written by mfnet.train; with --folds, a path containing "
        "{fold}, e.g. runs/pascal-2way-1shot/fold{fold}/last.pt",
    )
    parser.add_argument(
        "--folds",
        default=None,
        type=_folds,
        help="comma-separated folds, one checkpoint each, e.g. 0,1,2,3",
    )
    parser.add_argument(
        "--naive-way",
        type=options.positive_int,
        default=None,
        metavar="N",
        help="evaluate a 1-way checkpoint on N-way episodes by running it N times (paper Table V)",
    )
    parser.add_argument(
        "--way",
        type=options.positive_int,
        default=None,
        metavar="N",
        help="evaluate N-way episodes (default: the checkpoint's way): a way-flexible checkpoint "
        "(--max-way) takes 1..max_way; other numbers need --group-classes",
    )
    parser.add_argument(
        "--group-classes",
        action="store_true",
        help="decode classes that do not fit the model's slots in groups and merge them per "
        "pixel (n > max_way, or n != N for a fixed-N checkpoint; docs/decisions.md)",
    )
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument(
        "--workers",
        type=options.non_negative_int,
        default=None,
        help="data-loader worker processes (default: the checkpoint's setting)",
    )
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score the training-free prototype baseline on the same episodes",
    )
    parser.add_argument(
        "--json", type=options.output_file, default=None, help="write the results to this file"
    )
    parser.add_argument(
        "--table",
        type=options.output_file,
        default=None,
        help="with --folds: write the table to TABLE.md and TABLE.csv",
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars"
    )
    parser.add_argument(
        "--save-visuals",
        type=options.output_directory,
        default=None,
        metavar="DIR",
        help="also draw the first --num-visuals episodes of run 0 (supports, "
        "query, ground truth, prediction) to DIR/fold{fold}.png",
    )
    parser.add_argument(
        "--num-visuals", type=options.positive_int, default=4, help="episodes drawn (default 4)"
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration (the checkpoint's, with the "
        "options given here) as JSON and exit",
    )
    add_threads_argument(parser)
    add_config_arguments(
        parser, ("eval", "data"), exclude=FIXED_BY_CHECKPOINT, default_text="the checkpoint's"
    )
    return parser


def _resolved_config(path: str, args: argparse.Namespace) -> Config:
    """The checkpoint's configuration with the evaluation options given on the command line."""
    config = Config.from_dict(load_checkpoint(path)["config"])
    overrides = overrides_from_args(args, ("eval", "data"))
    if args.workers is not None:
        overrides["workers"] = args.workers
    if args.naive_way is not None:
        overrides["way"] = args.naive_way
    if args.way is not None:
        overrides["way"] = args.way
    return config.replace(**overrides)


def _evaluate_checkpoint(
    path: str, args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, ProtocolResult], Config]:
    """Evaluate one checkpoint and print its results (and draw its visuals on request)."""
    model, _ = model_from_checkpoint(path, map_location=device)
    config = _resolved_config(path, args)
    if args.naive_way is None and not args.group_classes:
        model.check_classes(config.model.way)  # before any episode is drawn
    results = evaluate_model(
        model,
        config,
        device,
        baseline=args.baseline,
        progress=args.progress,
        naive=args.naive_way is not None,
        grouped=args.group_classes,
    )
    print(format_results(results, protocol_description(config)))
    if args.save_visuals is not None and args.naive_way is None:
        from .visualize import save_visuals

        paths = save_visuals(
            model,
            config,
            device,
            args.save_visuals,
            args.num_visuals,
            name=f"fold{config.data.fold}",
        )
        print(f"qualitative results: {', '.join(map(str, paths))}")
    return results, config


def _folds(text: str) -> list[int]:
    """``--folds``: comma-separated fold numbers 0..3."""
    try:
        folds = [int(f) for f in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected folds like 0,1,2,3, got {text!r}") from None
    if not folds or any(not 0 <= f <= 3 for f in folds) or len(set(folds)) != len(folds):
        raise argparse.ArgumentTypeError(f"folds must be distinct numbers 0..3, got {text!r}")
    return folds


@mfnet_command()
def main(argv: list[str] | None = None) -> int:
    """``python -m mfnet.evaluate``: returns the exit code (0; 2 on an error)."""
    args = build_parser().parse_args(argv)
    if args.naive_way is not None and (args.way is not None or args.group_classes):
        raise ValueError(
            "--naive-way runs a 1-way checkpoint N times: drop --way / --group-classes"
        )
    configure_logging()  # the library's warnings (a data cache it cannot write, ...)
    checkpoint = str(args.checkpoint)
    first_path = checkpoint.replace("{fold}", str((args.folds or [0])[0]))
    if args.print_config:
        print(json.dumps(_resolved_config(first_path, args).to_dict(), indent=2))
        return 0
    device = resolve_device(args.device)
    workers = args.workers
    if workers is None:  # the checkpoint's setting, as the protocol will use
        workers = _resolved_config(first_path, args).train.workers
    print(set_torch_threads(args.threads, workers).describe())
    if args.folds is None:
        results, config = _evaluate_checkpoint(checkpoint, args, device)
        if args.json is not None:
            write_results(args.json, results, config, {"checkpoint": checkpoint})
            print(f"results written to {args.json}")
        return 0
    if "{fold}" not in checkpoint and len(args.folds) > 1:
        raise ValueError("with several --folds the checkpoint path needs a {fold} field")
    per_fold = {}
    for fold in args.folds:
        path = checkpoint.replace("{fold}", str(fold))
        per_fold[fold], config = _evaluate_checkpoint(path, args, device)
        if config.data.fold != fold:
            raise ValueError(f"{path} was trained on fold {config.data.fold}, not {fold}")
    markdown, csv = fold_table(per_fold)
    print(markdown)
    if args.table is not None:
        atomic_write_bytes(args.table.with_suffix(".md"), (markdown + "\n").encode())
        atomic_write_bytes(args.table.with_suffix(".csv"), csv.encode())
        print(f"table written to {args.table.with_suffix('.md')} and .csv")
    if args.json is not None:
        atomic_write_bytes(
            args.json,
            json.dumps(
                {str(f): {n: r.summary() for n, r in res.items()} for f, res in per_fold.items()},
                indent=2,
                default=str,
            ).encode(),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
