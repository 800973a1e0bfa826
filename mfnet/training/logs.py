"""Training logs of rank 0: a CSV of per-step losses, TensorBoard scalars, a PNG of the curves.

``<out>/log.csv`` holds one row per optimiser step (step, epoch, loss, seg, pml, lr; losses with
full float precision, so two runs can be compared exactly); a resumed run appends to it.
``<out>/tensorboard/`` holds the same scalars (means over ``TENSORBOARD_EVERY`` steps) plus the
evaluation metrics. Other ranks use a
logger that writes nothing.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, TextIO

CSV_FIELDS = ("step", "epoch", "loss", "seg", "pml", "lr")
TENSORBOARD_EVERY = 10  # steps averaged per TensorBoard point (an event costs ~0.1 ms a scalar)


class TrainLogger:
    """Writes ``log.csv`` and TensorBoard events under ``out_dir`` (``enabled=False``: nothing).

    ``resume_step``: rows of steps after it (written by an interrupted run after its last
    checkpoint) are dropped, so the CSV holds each step once.
    """

    def __init__(
        self,
        out_dir: str | Path,
        enabled: bool = True,
        resume_step: int | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self._writer: Any = None  # TensorBoard's SummaryWriter (imported on use), or None
        self._csv: TextIO | None = None
        self._pending: dict[str, list[float]] = {}
        self._last_step = 0
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.csv_path
        rows = read_log(path) if resume_step is not None and path.is_file() else []
        rows = [row for row in rows if int(row["step"]) <= (resume_step or 0)]
        self._csv = path.open("w", newline="")
        self._table = csv.writer(self._csv)
        self._table.writerow(CSV_FIELDS)
        for row in rows:
            self._table.writerow([row[name] for name in CSV_FIELDS])
        self._csv.flush()
        if tensorboard:
            self._writer = _summary_writer()(
                str(self.out_dir / "tensorboard"),
                purge_step=resume_step + 1 if resume_step else None,
            )

    @property
    def csv_path(self) -> Path:
        """The per-step CSV, ``<out_dir>/log.csv``."""
        return self.out_dir / "log.csv"

    def step(
        self, step: int, epoch: int, loss: float, seg: float, pml: float | None, lr: float
    ) -> None:
        """Record optimiser step ``step`` (1-based) of epoch ``epoch`` (1-based): a CSV row, and
        every ``TENSORBOARD_EVERY`` steps the means since the last TensorBoard point."""
        self._last_step = step
        if self._csv is None:  # not enabled
            return
        self._table.writerow(
            [step, epoch, repr(loss), repr(seg), "" if pml is None else repr(pml), repr(lr)]
        )
        self._csv.flush()  # an interrupted run keeps every finished step
        if self._writer is None:
            return
        for name, value in (("loss", loss), ("seg", seg), ("pml", pml), ("lr", lr)):
            if value is not None:
                self._pending.setdefault(name, []).append(value)
        if step % TENSORBOARD_EVERY == 0:
            self._write_pending(step)

    def _write_pending(self, step: int) -> None:
        """One TensorBoard point per scalar at ``step``: the mean of the steps since the last."""
        for name, values in self._pending.items():
            self._writer.add_scalar(f"train/{name}", sum(values) / len(values), step)
        self._pending = {}

    def close(self) -> None:
        """Write the pending TensorBoard means and close both files."""
        if self._writer is not None and self._pending:
            self._write_pending(self._last_step)
        if self._csv is not None:
            self._csv.close()
            self._csv = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _summary_writer() -> type:
    """TensorBoard's ``SummaryWriter`` (imported on use: it is slow to import), or a
    ``MissingDependencyError`` naming the install command."""
    from mfnet_runtime.errors import require

    return require(
        "torch.utils.tensorboard",
        "TensorBoard logs",
        "pip install tensorboard (a dependency of mfnet: pip install -e .)",
    ).SummaryWriter


def write_eval_scalars(out_dir: str | Path, step: int, results: dict) -> None:
    """TensorBoard scalars of an evaluation (``{predictor: ProtocolResult}``) at ``step``:
    mIoU*, mIoU, FB-IoU (means over runs) and the per-class IoU*."""
    scalars = []  # (tag, value)
    for name, result in results.items():
        summary = result.summary()
        scalars += [
            (f"eval/{name}/{tag}", summary[f"{metric}_mean"])
            for metric, tag in (("miou_star", "mIoU*"), ("miou", "mIoU"), ("fbiou", "FB-IoU"))
        ]
        scalars += [
            (f"eval/{name}/IoU*_class{class_id}", value)
            for class_id, value in summary["per_class_star"].items()
            if not math.isnan(value)
        ]
    with _summary_writer()(str(Path(out_dir) / "tensorboard")) as writer:
        for tag, value in scalars:
            writer.add_scalar(tag, value, step)


def read_log(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``log.csv`` as dicts of strings."""
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


def plot_curves(csv_path: str | Path, png_path: str | Path) -> Path:
    """Draw loss terms and the learning rate against the step (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(csv_path)
    steps = [int(row["step"]) for row in rows]
    figure, (losses, rates) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("loss", "seg", "pml"):
        points = [(s, float(row[name])) for s, row in zip(steps, rows, strict=True) if row[name]]
        if points:
            xs, ys = zip(*points, strict=True)
            losses.plot(xs, _smooth(ys), label=name, linewidth=1)
    losses.set_xlabel("step")
    losses.set_ylabel("loss (moving average)")
    losses.legend()
    rates.plot(steps, [float(row["lr"]) for row in rows], color="tab:gray")
    rates.set_xlabel("step")
    rates.set_ylabel("learning rate")
    figure.tight_layout()
    png_path = Path(png_path)
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return png_path


def _smooth(values: tuple[float, ...], momentum: float = 0.95) -> list[float]:
    """Exponential moving average of ``values``, as the training loop's running loss."""
    out, running = [], None
    for value in values:
        running = value if running is None else momentum * running + (1 - momentum) * value
        out.append(running)
    return out
