"""torch's intra-op threads from the cores free to this process (the runtime's policy).

The policy itself (affinity cores minus data-loader workers and busy cores, at least 1, or
``--threads``) is ``mfnet_runtime.threads.thread_policy``; this module applies it to torch.
Under ``torchrun`` the cores are shared by the node's processes (``LOCAL_WORLD_SIZE``), each
with its workers; the other ranks are not counted as busy (their share is already taken off).
"""

from __future__ import annotations

import os

import torch

from mfnet_runtime.threads import ThreadPolicy, add_threads_argument, available_cores, thread_policy

__all__ = ["add_threads_argument", "set_torch_threads"]


def set_torch_threads(requested: int | None = None, workers: int = 0) -> ThreadPolicy:
    """Set ``torch.set_num_threads`` from the policy and return it (``describe()`` logs it).

    requested: ``--threads`` (None = computed); workers: data-loader worker processes of this
    process. Raises ``ValueError`` (``RuntimeInputError``) for a bad request.
    """
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = max(1, available_cores() // processes)
    policy = thread_policy(requested, workers, cores, busy=0 if processes > 1 else None)
    torch.set_num_threads(policy.threads)
    return policy
