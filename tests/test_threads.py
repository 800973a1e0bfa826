"""The thread policy: intra-op threads from the cores free to the process (affinity minus
data-loader workers and busy cores, at least 1, or --threads), applied to torch and to ONNX
Runtime."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from mfnet.threads import set_torch_threads
from mfnet_runtime import threads as policy_module
from mfnet_runtime.errors import RuntimeInputError
from mfnet_runtime.threads import thread_policy


@pytest.mark.parametrize(
    "cores, workers, expected",
    [
        (2, 0, 2),
        (2, 1, 1),
        (2, 2, 1),
        (2, 5, 1),
        (8, 2, 6),
        (1, 0, 1),
        (16, 4, 12),
    ],
)
def test_threads_are_the_free_cores(cores, workers, expected) -> None:
    policy = thread_policy(None, workers, cores=cores, busy=0)
    assert policy.threads == expected and not policy.requested
    assert policy.describe() == f"threads: {expected} ({cores} cores, {workers} loader workers)"


def test_an_explicit_request_wins_and_bad_ones_are_refused() -> None:
    policy = thread_policy(3, workers=1, cores=2)
    assert policy.threads == 3 and policy.requested
    assert "set by --threads" in policy.describe()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(RuntimeInputError, match="threads must be an integer >= 1"):
            thread_policy(bad, cores=2)
    with pytest.raises(RuntimeInputError, match="workers must be >= 0"):
        thread_policy(None, workers=-1, cores=2)


def test_cores_come_from_the_affinity_not_the_machine(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5, 7}, raising=False)
    assert policy_module.available_cores() == 3
    assert thread_policy(None, workers=1, busy=0).threads == 2


def test_torch_gets_the_policy(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(policy_module, "busy_cores", lambda: 0)
    policy = set_torch_threads(None, workers=1)
    assert policy.threads == 3 and torch.get_num_threads() == 3
    assert set_torch_threads(1).threads == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two processes share the 4 cores
    assert set_torch_threads(None, workers=1).threads == 1
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize(
    "cores, workers, busy, expected", [(2, 0, 1, 1), (2, 1, 1, 1), (8, 2, 3, 3), (4, 0, 9, 1)]
)
def test_cores_busy_with_other_processes_are_not_used(cores, workers, busy, expected) -> None:
    policy = thread_policy(None, workers, cores=cores, busy=busy)
    assert policy.threads == expected and policy.busy == busy
    assert policy.describe() == (
        f"threads: {expected} ({cores} cores, {workers} loader workers, "
        f"{busy} busy with other processes)"
    )


def test_busy_cores_reads_the_fewest_runnable_tasks(tmp_path) -> None:
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("1.52 0.98 0.40 3/412 9911\n")
    assert policy_module.busy_cores(loadavg, samples=2, interval_s=0) == 2  # 3 minus the reader
    loadavg.write_text("0.00 0.00 0.00 1/200 17\n")
    assert policy_module.busy_cores(loadavg, samples=1) == 0
    for unreadable in (tmp_path / "missing", tmp_path):
        assert policy_module.busy_cores(unreadable, samples=1) == 0  # not Linux: count nothing
    loadavg.write_text("garbage")
    assert policy_module.busy_cores(loadavg, samples=1) == 0


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="needs Linux's /proc/loadavg")
def test_a_busy_process_is_seen_and_costs_a_thread() -> None:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # the spinner is running, not starting up
        assert policy_module.busy_cores() >= 1
        assert thread_policy(None, cores=2).threads == 1
        assert set_torch_threads(None).busy >= 1
    finally:
        spinner.kill()
        spinner.wait()
