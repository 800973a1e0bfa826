"""python benchmarks/bench_ways.py [--epochs E] [--max-way 5] [--threads T]

Any number of classes on the embedded synthetic benchmark, in one run, on the same seeds and the
same training length (issue 18): a way-flexible model (``--max-way 5``: episodes of 1..5
classes) evaluated at n = 1, 2, 3, 5 against dedicated n-way models trained as long, and the
grouping fallback (``--group-classes``) of the dedicated 2-way model at n = 1 (slots filled
by repeating the prototype), 3 and 5.

Every model is ``python -m mfnet.train`` with the ``synthetic-cpu`` preset (CPU-sized by
``--epochs``), every score ``python -m mfnet.evaluate`` with the preset's protocol (mIoU*,
mIoU, FB-IoU: mean and std over ``--eval-runs`` runs of ``--eval-episodes`` episodes), each in
its own process as a user runs it. Writes ``<out>/ways_synthetic.json`` (device, versions,
commands, metrics, wall times) and prints the markdown table that the README quotes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:  # importable from the tests too
    sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import device_info, now_utc, versions, write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METRICS = ("miou_star", "miou", "fbiou")
WAYS = (1, 2, 3, 5)  # evaluated numbers of classes
GROUPED = (1, 3, 5)  # the 2-way model's fallback: n < N repeats prototypes, n > N groups


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench_ways.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    parser.add_argument("--max-way", type=int, default=5, help="slots of the way-flexible model")
    parser.add_argument("--eval-runs", type=int, default=3, help="evaluation runs (default 3)")
    parser.add_argument(
        "--eval-episodes", type=int, default=500, help="episodes per run (default 500)"
    )
    parser.add_argument("--threads", type=int, default=1, help="threads of every process")
    parser.add_argument(
        "--ways", type=int, nargs="+", default=list(WAYS), help="evaluated n (default 1 2 3 5)"
    )
    parser.add_argument(
        "--grouped",
        type=int,
        nargs="+",
        default=list(GROUPED),
        help="n at which the 2-way model runs in groups (default 1 3 5)",
    )
    parser.add_argument(
        "--train-args",
        default="",
        help="more mfnet.train options for every model, e.g. '--episodes-per-epoch 400'",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON result")
    return parser.parse_args(argv)


def _run(command: list[str]) -> tuple[float, str]:
    """Run a command of the project (in its own process); (wall seconds, its command line)."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, " ".join(["python", *command[1:]])


def train(name: str, switches: list[str], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train one model (no final evaluation); its checkpoint, command and wall time."""
    out = work / name
    wall, line = _run(
        [
            sys.executable, "-m", "mfnet.train", "--out", str(out), "--overwrite",
            "--epochs", str(args.epochs), "--threads", str(args.threads), "--no-progress",
            "--no-evaluate", *shlex.split(args.train_args), *switches,
        ]
    )  # fmt: skip
    return {"checkpoint": str(out / "last.pt"), "command": line, "wall_s": wall}


def evaluate(checkpoint: str, way: int, grouped: bool, args: argparse.Namespace, work: Path):
    """Evaluate a checkpoint on ``way``-way episodes; MFNet's metrics (means and stds)."""
    tag = f"{Path(checkpoint).parent.name}-{way}way{'-grouped' if grouped else ''}"
    result = work / f"eval-{tag}.json"
    wall, line = _run(
        [
            sys.executable, "-m", "mfnet.evaluate", "--checkpoint", checkpoint,
            "--way", str(way), "--no-baseline", "--no-progress", "--threads", str(args.threads),
            "--eval-runs", str(args.eval_runs), "--eval-episodes", str(args.eval_episodes),
            "--json", str(result), *(["--group-classes"] if grouped else []),
        ]
    )  # fmt: skip
    (metrics,) = json.loads(result.read_text())["results"].values()
    return {
        "command": line,
        "wall_s": wall,
        **{key: metrics[key] for m in METRICS for key in (f"{m}_mean", f"{m}_std")},
    }


def cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    return " / ".join(f"{100 * row[f'{m}_mean']:.2f}" for m in METRICS)


def table(rows: dict[str, Any], max_way: int, ways: list[int]) -> str:
    """n | dedicated n-way | way-flexible | 2-way in groups (mIoU* / mIoU / FB-IoU)."""
    lines = [
        f"| n | dedicated n-way | way-flexible (Nmax = {max_way}) | 2-way model in groups |",
        "|---|---|---|---|",
    ]
    for way in ways:
        lines.append(
            f"| {way} | {cell(rows['dedicated'].get(str(way)))} | "
            f"{cell(rows['flexible'].get(str(way)))} | {cell(rows['grouped'].get(str(way)))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {"dedicated": {}, "flexible": {}, "grouped": {}}
    with tempfile.TemporaryDirectory(prefix="mfnet-ways-") as scratch:
        work = Path(scratch)
        flexible = ["--max-way", str(args.max_way), "--way", str(args.max_way)]
        dedicated = sorted({*args.ways, 2})  # the 2-way model also runs in groups
        plan = [("flexible", flexible)] + [(f"way{n}", ["--way", str(n)]) for n in dedicated]
        for name, switches in plan:
            print(f"training {name}: {' '.join(switches)}", flush=True)
            models[name] = train(name, switches, args, work)
        for way in args.ways:
            print(f"evaluating n = {way}", flush=True)
            rows["dedicated"][str(way)] = evaluate(
                models[f"way{way}"]["checkpoint"], way, False, args, work
            )
            rows["flexible"][str(way)] = evaluate(
                models["flexible"]["checkpoint"], way, False, args, work
            )
        for way in args.grouped:
            rows["grouped"][str(way)] = evaluate(
                models["way2"]["checkpoint"], way, True, args, work
            )
    for model in models.values():
        model.pop("checkpoint")
    payload = {
        "benchmark": "ways",
        "created": now_utc(),
        "device": device_info("cpu"),
        "versions": versions(),
        "preset": "synthetic-cpu",
        "epochs": args.epochs,
        "max_way": args.max_way,
        "eval_runs": args.eval_runs,
        "eval_episodes": args.eval_episodes,
        "threads": args.threads,
        "train_args": args.train_args,
        "training": models,
        "results": rows,
    }
    path = args.out / "ways_synthetic.json"
    write_json(path, payload)
    print(table(rows, args.max_way, sorted({*args.ways, *args.grouped})))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
