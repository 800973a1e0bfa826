"""benchmarks/gpu_check.sh without a GPU: its options, its two stages' steps and time caps, and
a dry run of its first step (the whole stage-1 dry run takes minutes here; its command is in
benchmarks/README.md)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def check(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    environment.pop("OUT", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
        cwd=ROOT,
    )


def steps_of(listing: str) -> list[tuple[str, str]]:
    """(step, cap) rows of ``--list``."""
    return re.findall(r"^(\w+)\s+(\d+|rest)\s", listing, flags=re.M)


def test_stages_list_their_steps_in_order_within_the_lease() -> None:
    one = check("--list")
    assert one.returncode == 0, one.stderr
    assert "stage 1, budget 345 s" in one.stdout
    rows = steps_of(one.stdout)
    assert [name for name, _ in rows] == ["env", "ext", "tests", "ops", "inference"]
    assert sum(int(cap) for _, cap in rows if cap != "rest") < 345  # the rows get the rest
    assert "pytest -q -rs -m cuda tests" in one.stdout
    assert "--skip-variants 'ort_*,trt_*" in one.stdout and "*compile*" in one.stdout
    two = check("--stage", "2", "--list")
    assert two.returncode == 0 and "stage 2, budget 240 s" in two.stdout
    assert [name for name, _ in steps_of(two.stdout)] == ["install", "ort_tests", "ort_rows"]
    assert "tests/test_gpu_paths.py -k 'onnxruntime_cuda or" in two.stdout
    chosen = check("--steps", "env,ops", "--list")
    assert [name for name, _ in steps_of(chosen.stdout)] == ["env", "ops"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stage", "3"], "--stage takes 1 or 2, not '3'"),
        (["--steps", "env,install"], "stage 1 has no step 'install' (its steps: env,ext,tests"),
        (["--budget-s", "ten"], "--budget-s takes whole seconds, not 'ten'"),
        (["--frobnicate"], "unknown option --frobnicate"),
    ],
)
def test_bad_options_are_one_error_line(args, message) -> None:
    result = check(*args, "--list")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: gpu_check: {message}"
    ] or result.stderr.startswith(f"error: gpu_check: {message}")


def test_dry_run_writes_the_summary_logs_and_archive(tmp_path) -> None:
    results = tmp_path / "stage1"
    run = check(
        "--dry-run",
        "--steps",
        "env",
        "--budget-s",
        "120",
        str(results),
        env={"GPU_CHECK_WORK": str(tmp_path / "work")},
        timeout=180,
    )
    summary = (results / "summary.md").read_text()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "stage 1 (dry run on the CPU)" in summary
    assert re.search(r"\| env \| ok \| \d+ s \|", summary), summary
    for step in ("ext", "tests", "ops", "inference"):
        assert f"| {step} | not run (--steps) | - |" in summary
    assert "Every step passed." in summary
    assert "### env.log" in summary and "torch" in summary.split("### env.log")[1]
    with tarfile.open(results / "gpu_check_full.tar.gz") as archive:
        assert {"full/env.log", "full/pip_list.txt"} <= set(archive.getnames())
    assert not (results / "full").exists()  # packed into the archive
    assert len(list(results.iterdir())) <= 8  # what the device tool brings back from $OUT
