"""python benchmarks/bench_threads.py [--repeats 2] [--out benchmarks/results]

The thread table: what the thread policy buys on this machine, quiet and with one competing
busy process (``python -c "while True: pass"``), for the four commands a user runs on the CPU:
training (episodes/s), evaluation (episodes/s), ``mfnet.predict`` (frames/s) and the torch-free
runtime (frames/s). "torch default" passes ``--threads`` = the machine's cores, which is what
torch and ONNX Runtime choose by themselves; "policy" passes nothing, so the command computes its
threads from the free cores (``mfnet_runtime.threads``). Every command runs as a user would run
it, in its own process, on the same small inputs: a checkpoint trained here for one short epoch,
its ONNX export and the runtime's demo inputs. Throughput is parsed from each command's own
report (the training epoch line, the frames-per-second line) or, for evaluation, from its wall
time. Also measured, quiet: the cost of ``--smooth`` (bilinear upsampling of the probabilities
before the argmax) on 640 x 480 frames, against ``--no-smooth``.

Writes ``<out>/threads_<host>.json`` (device, versions, per cell the median and p10/p90 over the
repeats) and prints a markdown table; README.md quotes it.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from _common import device_info, now_utc, percentile, versions, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TRAIN_EPISODES = 320  # one epoch of 40 steps: long enough for a stable rate, short when collapsed
EVAL_EPISODES = 1000
EPISODES_PER_S = re.compile(r"epoch 1: loss [0-9.]+, ([0-9.]+) episodes/s")
FRAMES_PER_S = re.compile(r"frames per second: ([0-9.]+)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench_threads.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per cell (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON result")
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default: a temporary one)"
    )
    return parser.parse_args(argv)


def run(command: list[str], cwd: Path) -> tuple[str, float]:
    """Run one command line of the project (``python -m ...``) -> (its stdout, wall seconds)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the commands choose their own
        env.pop(name, None)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *command], cwd=cwd, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}"
        )
    return done.stdout, seconds


@contextmanager
def competing_process(enabled: bool) -> Iterator[None]:
    """One busy process beside the measured one (a pure-Python spin loop), when ``enabled``."""
    if not enabled:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)  # running, not starting
    try:
        yield
    finally:
        spinner.send_signal(signal.SIGKILL)
        spinner.wait()


def prepare(work: Path) -> dict[str, Path]:
    """A short-trained checkpoint, its ONNX export, the demo inputs and 640 x 480 frames."""
    checkpoint = work / "train" / "last.pt"
    if not checkpoint.exists():
        run(
            ["-m", "mfnet.train", "--epochs", "1", "--episodes-per-epoch", "800",
             "--eval-runs", "1", "--eval-episodes", "20", "--visuals", "0",
             "--out", str(checkpoint.parent), "--overwrite"],
            work,
        )  # fmt: skip
    engines = work / "engines"
    if not (engines / "manifest.json").exists():
        run(["-m", "mfnet.export", "onnx", "--checkpoint", str(checkpoint), "--out",
             str(engines), "--precisions", "fp32"], work)  # fmt: skip
    demo = work / "demo"
    if not (demo / "support").exists():
        run(["-m", "mfnet_runtime", "demo", "--out", str(demo), "--frames", "240"], work)
    large = work / "large"
    large.mkdir(exist_ok=True)
    for path in sorted((demo / "images").glob("*.png")):
        Image.open(path).convert("RGB").resize((640, 480), Image.BILINEAR).save(large / path.name)
    return {"checkpoint": checkpoint, "engines": engines, "demo": demo, "large": large}


def commands(inputs: dict[str, Path], work: Path) -> dict[str, tuple[list[str], Callable]]:
    """Each measured command -> (its arguments, how to read its throughput from (stdout, s))."""
    video = inputs["demo"] / "video.mp4"
    source = video if video.exists() else inputs["demo"] / "video_frames"

    def epoch_rate(stdout: str, _: float) -> float:
        return float(EPISODES_PER_S.search(stdout).group(1))

    def frame_rate(stdout: str, _: float) -> float:
        return float(FRAMES_PER_S.search(stdout).group(1))

    return {
        "train episodes/s": (
            ["-m", "mfnet.train", "--epochs", "1", "--episodes-per-epoch", str(TRAIN_EPISODES),
             "--eval-runs", "1", "--eval-episodes", "20", "--visuals", "0",
             "--out", str(work / "bench-train"), "--overwrite"],
            epoch_rate,
        ),
        "evaluate episodes/s": (
            ["-m", "mfnet.evaluate", "--checkpoint", str(inputs["checkpoint"]),
             "--eval-runs", "1", "--eval-episodes", str(EVAL_EPISODES)],
            lambda _, seconds: EVAL_EPISODES / seconds,
        ),
        "predict frames/s": (
            ["-m", "mfnet.predict", "--checkpoint", str(inputs["checkpoint"]),
             "--support", str(inputs["demo"] / "support"), "--input", str(source),
             "--output", str(work / "predicted")],
            frame_rate,
        ),
        "runtime frames/s": (
            ["-m", "mfnet_runtime", "segment", "--engines", str(inputs["engines"]),
             "--support", str(inputs["demo"] / "support"), "--input", str(source),
             "--output", str(work / "segmented")],
            frame_rate,
        ),
    }  # fmt: skip


def cell(values: list[float]) -> dict[str, float]:
    """Median and nearest-rank p10 / p90 of a cell's repeats."""
    ordered = sorted(values)
    return {
        "median": float(np.median(ordered)),
        "p10": percentile(ordered, 0.1),
        "p90": percentile(ordered, 0.9),
        "runs": ordered,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure every cell of the table, write the JSON, print the markdown table."""
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        inputs = prepare(work)
        measured = commands(inputs, work)
        table: dict[str, dict[str, dict[str, float]]] = {}
        for loaded in (False, True):
            for variant, extra in (("torch default", ["--threads", str(cores)]), ("policy", [])):
                column = f"{'loaded' if loaded else 'quiet'}, {variant}"
                for name, (command, rate) in measured.items():
                    values = []
                    for _ in range(args.repeats):
                        with competing_process(loaded):
                            stdout, seconds = run([*command, *extra], work)
                        values.append(rate(stdout, seconds))
                    table.setdefault(name, {})[column] = cell(values)
                    print(f"{column:24s} {name:22s} {table[name][column]['median']:8.1f}",
                          flush=True)  # fmt: skip
        smooth = {}
        for flag in ("--smooth", "--no-smooth"):
            command, rate = measured["runtime frames/s"]
            command = [*command[:-1], str(work / f"large-out{flag}")]
            command[command.index("--input") + 1] = str(inputs["large"])
            values = [rate(*run([*command, flag], work)) for _ in range(args.repeats)]
            smooth[flag] = cell(values)
    payload = {
        "benchmark": "threads",
        "date": now_utc(),
        "command": " ".join(["python benchmarks/bench_threads.py", *(argv or sys.argv[1:])]),
        "device": device_info("cpu"),
        "versions": versions(),
        "cores": cores,
        "competing process": "python -c 'while True: pass'",
        "cells": table,
        "smooth 640x480 runtime frames/s": smooth,
        "smooth cost": smooth["--no-smooth"]["median"] / smooth["--smooth"]["median"],
    }
    path = args.out / f"threads_{os.uname().nodename}.json"
    write_json(path, payload)
    columns = list(next(iter(table.values())))
    print("\n| | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[c]['median']:.1f}" for c in columns) + " |")
    print(
        f"\n--smooth on 640x480 frames: {smooth['--smooth']['median']:.1f} frames/s against "
        f"{smooth['--no-smooth']['median']:.1f} with --no-smooth "
        f"({payload['smooth cost']:.2f}x the time)\nwrote {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
