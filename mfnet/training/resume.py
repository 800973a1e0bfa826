"""Which configuration a run uses: a new run's from its preset, a resumed run's from its
checkpoint, and the guard against writing a new run over another run's checkpoint.

A resumed run takes its whole configuration and its output folder (the checkpoint's own
folder) from the checkpoint; options given again may change only ``CHANGEABLE_ON_RESUME``,
which do not alter the sequence of training steps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..checkpoint import load_checkpoint
from ..config import Config, EvalConfig

CHECKPOINT_NAME = "last.pt"
# Options a resumed run may change: the run length, the device, I/O, the evaluation protocol.
CHANGEABLE_ON_RESUME = frozenset(
    {"epochs", "device", "memory_format", "workers", "save_every_steps", "visuals"}
    | {f.name for f in dataclasses.fields(EvalConfig)}
)
# What ``train(resume=...)`` accepts as different from the checkpoint: the above, and ``out``
# (a resumed run writes beside its checkpoint, wherever the folder was moved to).
RESUME_FREE = CHANGEABLE_ON_RESUME | {"out"}


class ResumeError(ValueError):
    """A command line that cannot resume this checkpoint, or would overwrite another run."""


def _flag(name: str) -> str:
    """The option of a configuration field: ``save_every_steps`` -> ``--save-every-steps``."""
    return "--" + name.replace("_", "-")


def resume_config(checkpoint: str | Path, overrides: dict[str, Any]) -> Config:
    """The checkpoint's configuration with ``overrides`` (options given on the command line)
    applied, writing into the checkpoint's folder.

    Raises ``ResumeError`` naming the first option that would change what cannot change, e.g.
    ``--way cannot change on resume (checkpoint: 5)``; ``CheckpointError`` for a bad file.
    """
    path = Path(checkpoint)
    saved = Config.from_dict(load_checkpoint(path)["config"])
    flat = {name: value for section in saved.to_dict().values() for name, value in section.items()}
    folder = path.parent
    for name, value in overrides.items():
        comparable = list(value) if isinstance(value, tuple) else value  # to_dict: lists
        if name == "out":
            _check_same_folder(value, folder)
        elif name not in CHANGEABLE_ON_RESUME and comparable != flat[name]:
            allowed = ", ".join(_flag(n) for n in sorted(CHANGEABLE_ON_RESUME))
            raise ResumeError(
                f"{_flag(name)} cannot change on resume (checkpoint: "
                f"{flat[name]}); on resume only these may change: {allowed}"
            )
    changes = {name: value for name, value in overrides.items() if name != "out"}
    return saved.replace(**changes, out=str(folder))


def _check_same_folder(out: str | Path, folder: Path) -> None:
    """A resumed run's --out, if given, must be its checkpoint's folder."""
    if Path(out).resolve() != folder.resolve():
        raise ResumeError(
            f"--out cannot change on resume: a resumed run writes beside its checkpoint "
            f"({folder}); to continue into another folder, copy {folder} there and resume "
            f"from the copy"
        )


def check_new_run_folder(out: str | Path, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds a checkpoint, unless ``overwrite``."""
    existing = Path(out) / CHECKPOINT_NAME
    if existing.exists() and not overwrite:
        raise ResumeError(
            f"{out} already holds a checkpoint ({existing}): continue that run with --resume "
            f"{existing}, choose another --out, or pass --overwrite to replace it"
        )
