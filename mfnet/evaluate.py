"""``python -m mfnet.evaluate --checkpoint PATH``: the paper's evaluation protocol on novel classes.

Prints the protocol options with mIoU*, mIoU and FB-IoU (mean +- std over runs) for MFNet and,
on the same episodes, the training-free prototype baseline; optionally writes them as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from .config import Config, add_config_arguments, overrides_from_args
from .evaluation import ProtocolResult, format_results, protocol_description, run_protocol
from .model.baseline import PrototypeBaseline
from .model.mfnet import MFNet
from .training.checkpoint import CheckpointError, model_from_checkpoint
from .training.loop import resolve_device


def evaluate_model(
    model: MFNet, config: Config, device: torch.device, baseline: bool = True,
    progress: bool = True,
) -> dict[str, ProtocolResult]:
    """Run the protocol for ``model`` (and the baseline on its features) on the same episodes."""
    model = model.to(device).eval()
    predictors = {"MFNet": model}
    if baseline:
        predictors["baseline"] = PrototypeBaseline(model.extract_features)
    return run_protocol(predictors, config, device, progress=progress)


def write_results(path: Path, results: dict[str, ProtocolResult], config: Config,
                  extra: dict | None = None) -> None:
    payload = {
        "protocol": protocol_description(config),
        "config": config.to_dict(),
        "results": {name: result.summary() for name, result in results.items()},
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mfnet.evaluate",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by mfnet.train")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--workers", type=int, default=2, help="data-loader worker processes")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also score the training-free prototype baseline on the same episodes")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this file")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show progress bars")
    add_config_arguments(parser, ("eval",))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        model, config = model_from_checkpoint(args.checkpoint, map_location=device)
    except (CheckpointError, RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = config.replace(**overrides_from_args(args, ("eval",)), workers=args.workers)
    results = evaluate_model(model, config, device, baseline=args.baseline, progress=args.progress)
    print(format_results(results, protocol_description(config)))
    if args.json is not None:
        write_results(args.json, results, config, {"checkpoint": str(args.checkpoint)})
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
