"""The thread policy: intra-op threads from the cores free to the process (affinity minus
data-loader workers, at least 1, or --threads), applied to torch and to ONNX Runtime."""

from __future__ import annotations

import os

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
    policy = thread_policy(None, workers, cores=cores)
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
    assert thread_policy(None, workers=1).threads == 2


def test_torch_gets_the_policy(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    policy = set_torch_threads(None, workers=1)
    assert policy.threads == 3 and torch.get_num_threads() == 3
    assert set_torch_threads(1).threads == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two processes share the 4 cores
    assert set_torch_threads(None, workers=1).threads == 1
    assert torch.get_num_threads() == 1
