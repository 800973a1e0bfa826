"""Few-shot segmentation metrics: mIoU* (the paper's default), mIoU (PANet) and FB-IoU.

Paper Sec. IV-B and DESIGN.md section 3. All counts are accumulated per ORIGINAL class id over
every ``update`` of a run (dataset-level accumulation, as PANet/PFENet/HSNet), never as a mean of
per-episode IoUs: IoU_c = sum TP_c / (sum TP_c + sum FP_c + sum FN_c).

Decisions:

* Labels. ``pred`` and ``target`` hold episode labels 0..N: 0 = background, way j (0-based) ->
  label j + 1, which is mapped back to the original class id ``episode_classes[j]``. ``target``
  may hold 255 (ignore): such pixels count nowhere, not even as false positives of the class the
  model painted there.
* mIoU* counts, for every episode class, its TP/FP/FN in every query image, so a class predicted
  in a query whose ground truth does not contain it collects false positives.
* mIoU (PANet ``Metric.record``) skips a class entirely (TP, FP and FN) in a query image whose
  ground truth does not contain it. With ``[B, H, W]`` input the presence test is per image.
* Means. Background is excluded from both means. A mean is over the ``class_ids`` whose
  denominator TP + FP + FN is non-zero; a class that never had data gets NaN in the per-class
  dict and is left out of the mean; if no class has data the mean is NaN. (For mIoU* a class has
  data as soon as it appeared in an episode and either was present in a query or was predicted.)
* FB-IoU (PFENet/HSNet, DESIGN.md): foreground = union of all episode classes, background =
  label 0; a pixel of one episode class predicted as another episode class is a foreground TP
  (the binary foreground/background question only). TP/FP/FN of both are accumulated over all
  updates; FB-IoU = mean of the background IoU and the foreground IoU, over those of the two with
  a non-zero denominator (NaN if neither has one). In 1-way episodes this is PANet's
  ``get_mIoU_binary`` too; in N-way episodes it is NOT: PANet sums its per-class TP/FP/FN of the
  classes present in the query, so there a confusion between two episode classes costs FP and FN
  (docs/decisions.md, "FB-IoU").
* Accumulation is on the CPU in int64 via one ``torch.bincount`` per update (no Python loop over
  pixels), so long runs cannot overflow and GPU tensors can be passed in directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

IGNORE_INDEX = 255


class FewShotMeter:
    """Accumulates TP/FP/FN of one evaluation run over the novel classes of a fold.

    Args:
        class_ids: the fold's novel class ids (original dataset ids, e.g. VOC 1..20); the means
            and per-class dicts are over exactly these ids. Must be unique non-negative ints.
    """

    def __init__(self, class_ids: Sequence[int]) -> None:
        ids = [int(c) for c in class_ids]
        if len(ids) == 0:
            raise ValueError("class_ids must not be empty")
        if len(set(ids)) != len(ids):
            raise ValueError(f"class_ids contains duplicates: {ids}")
        self.class_ids: tuple[int, ...] = tuple(ids)
        self._index: dict[int, int] = {c: k for k, c in enumerate(ids)}
        self.reset()

    def reset(self) -> None:
        """Clear all accumulated counts."""
        k = len(self.class_ids)
        # rows: TP, FP, FN; columns: position of the class in class_ids
        self._counts_star = torch.zeros(3, k, dtype=torch.int64)
        self._counts_panet = torch.zeros(3, k, dtype=torch.int64)
        # rows: TP, FP, FN; columns: background, foreground
        self._counts_fb = torch.zeros(3, 2, dtype=torch.int64)

    def update(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        episode_classes: Sequence[int] | torch.Tensor,
    ) -> None:
        """Add one episode's query prediction(s).

        Args:
            pred: integer tensor [H, W] or [B, H, W], predicted episode labels in 0..N.
            target: integer tensor of the same shape, ground-truth labels in 0..N or 255 (ignore).
            episode_classes: the N original class ids in way order (way j -> label j + 1); all B
                images of a batch share this episode.

        Raises:
            ValueError: non-integer dtype, shape mismatch, values out of range, an episode class
                that is not one of ``class_ids``, duplicate or empty episode classes.
        """
        classes = self._check_episode_classes(episode_classes)
        n_way = len(classes)
        pred, target = _check_label_maps(pred, target, n_way)
        k = n_way + 1  # labels 0..N

        pred = pred.reshape(pred.shape[0], -1)  # [B, H*W]
        target = target.reshape(target.shape[0], -1)  # [B, H*W]
        b = pred.shape[0]
        keep = target != IGNORE_INDEX  # [B, H*W]
        image = torch.arange(b, dtype=torch.int64).unsqueeze(1).expand_as(pred)  # [B, H*W]
        # one bincount gives the per-image confusion matrices (rows truth, columns prediction)
        flat = (image * k + target) * k + pred  # [B, H*W]
        conf = torch.bincount(flat[keep], minlength=b * k * k).reshape(b, k, k)  # [B, K, K]

        tp = conf.diagonal(dim1=1, dim2=2)  # [B, K]
        truth_total = conf.sum(dim=2)  # [B, K]
        pred_total = conf.sum(dim=1)  # [B, K]
        fp = pred_total - tp  # [B, K]
        fn = truth_total - tp  # [B, K]
        present = truth_total > 0  # [B, K]: per-image presence test for PANet's mIoU

        per_label = torch.stack([tp, fp, fn])[:, :, 1:]  # [3, B, N], background dropped
        star = per_label.sum(dim=1)  # [3, N]
        panet = (per_label * present[:, 1:]).sum(dim=1)  # [3, N]
        columns = torch.tensor([self._index[c] for c in classes], dtype=torch.int64)  # [N]
        self._counts_star.index_add_(1, columns, star)
        self._counts_panet.index_add_(1, columns, panet)

        total = conf.sum(dim=0)  # [K, K]
        bg_tp = total[0, 0]
        fg_tp = total[1:, 1:].sum()  # any episode class predicted as any episode class
        bg_fp = total[1:, 0].sum()  # foreground truth predicted as background
        bg_fn = total[0, 1:].sum()  # background truth predicted as foreground
        self._counts_fb += torch.stack(
            [torch.stack([bg_tp, fg_tp]), torch.stack([bg_fp, bg_fn]), torch.stack([bg_fn, bg_fp])]
        )  # [3, 2]: foreground FP = background FN and vice versa

    def state(self) -> dict[str, torch.Tensor]:
        """The raw counts (int64 copies): ``star``, ``panet`` [3, K] and ``fb`` [3, 2], rows
        TP, FP, FN. Counts add over episodes, so the sum of several meters' states is the state
        of one meter that saw all their episodes (used to reduce a sharded evaluation)."""
        return {
            "star": self._counts_star.clone(),
            "panet": self._counts_panet.clone(),
            "fb": self._counts_fb.clone(),
        }

    def merge(self, counts: dict[str, torch.Tensor]) -> None:
        """Add raw counts exported by ``state()`` of a meter over the same ``class_ids``."""
        for name, mine in (
            ("star", self._counts_star),
            ("panet", self._counts_panet),
            ("fb", self._counts_fb),
        ):
            other = counts[name]
            if tuple(other.shape) != tuple(mine.shape):
                raise ValueError(
                    f"{name} counts have shape {tuple(other.shape)}, expected {tuple(mine.shape)}"
                )
            mine += other.to("cpu", torch.int64)

    def compute(self) -> dict:
        """Return the metrics of everything accumulated since the last ``reset``.

        Returns:
            dict with ``miou_star``, ``miou``, ``fbiou`` (floats in [0, 1], NaN without data) and
            ``per_class_star``, ``per_class`` (dict original class id -> IoU float, NaN for a
            class without data).
        """
        per_star = _iou(self._counts_star)
        per_panet = _iou(self._counts_panet)
        fb = _iou(self._counts_fb)
        return {
            "miou_star": _nanmean(per_star),
            "miou": _nanmean(per_panet),
            "fbiou": _nanmean(fb),
            "per_class_star": dict(zip(self.class_ids, per_star, strict=True)),
            "per_class": dict(zip(self.class_ids, per_panet, strict=True)),
        }

    def _check_episode_classes(self, episode_classes: Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(episode_classes, torch.Tensor):
            if episode_classes.dtype.is_floating_point or episode_classes.dtype.is_complex:
                raise ValueError(
                    f"episode_classes must hold integers, got dtype {episode_classes.dtype}"
                )
            classes = [int(c) for c in episode_classes.reshape(-1).tolist()]
        else:
            classes = [int(c) for c in episode_classes]
        if len(classes) == 0:
            raise ValueError("episode_classes must not be empty")
        if len(set(classes)) != len(classes):
            raise ValueError(f"episode_classes contains duplicates: {classes}")
        unknown = [c for c in classes if c not in self._index]
        if unknown:
            raise ValueError(
                f"episode classes {unknown} are not among the meter's class_ids {self.class_ids}"
            )
        return classes


def _check_label_maps(
    pred: torch.Tensor, target: torch.Tensor, n_way: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the label maps and return them as CPU int64 [B, H, W]."""
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    if pred.dim() not in (2, 3):
        raise ValueError(f"pred/target must be [H, W] or [B, H, W], got {tuple(pred.shape)}")
    pred = pred.detach().to("cpu", torch.int64)
    target = target.detach().to("cpu", torch.int64)
    if pred.dim() == 2:
        pred = pred.unsqueeze(0)  # [1, H, W]
        target = target.unsqueeze(0)  # [1, H, W]
    if pred.numel() > 0:
        if int(pred.min()) < 0 or int(pred.max()) > n_way:
            raise ValueError(
                f"pred values must lie in 0..{n_way} for a {n_way}-way episode, "
                f"got range [{int(pred.min())}, {int(pred.max())}]"
            )
        bad = (target != IGNORE_INDEX) & ((target < 0) | (target > n_way))
        if bool(bad.any()):
            raise ValueError(
                f"target values must lie in 0..{n_way} or be {IGNORE_INDEX} (ignore), "
                f"got {sorted(set(target[bad].tolist()))[:10]}"
            )
    return pred, target


def _iou(counts: torch.Tensor) -> list[float]:
    """IoU per column of a [3, K] (TP, FP, FN) count tensor; NaN where the denominator is 0."""
    tp, fp, fn = counts.tolist()
    return [
        t / (t + p + n) if t + p + n > 0 else math.nan for t, p, n in zip(tp, fp, fn, strict=True)
    ]


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
