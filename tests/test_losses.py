"""Weighted focal loss (Eq. (1)) and pixel-wise triplet loss (Eq. (6))."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mfnet.losses import labels_at_feature_centres, pixel_triplet_loss, weighted_focal_loss
from mfnet.ops.triplet_sampling import TripletSample

# ----------------------------------------------------------------------------- focal loss


def focal_by_hand(logits: list[list[float]], labels: list[int], gamma: float) -> float:
    """Eq. (1) for one image, pixel by pixel with python math: logits[m] has the K class scores."""
    k = len(logits[0])
    m_total = len(labels)
    loss = 0.0
    for scores, y in zip(logits, labels, strict=True):
        p = math.exp(scores[y]) / sum(math.exp(s) for s in scores)
        omega = 1.0 / math.log(1.1 + labels.count(y) / m_total)
        loss += omega * (1.0 - p) ** gamma * math.log(p)
    return -loss / (m_total * k)


def to_image(logits: list[list[float]], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """2x2 image: logits [1, K, 2, 2], target [1, 2, 2] from per-pixel lists in raster order."""
    x = torch.tensor(logits, dtype=torch.float64).T.reshape(1, -1, 2, 2)  # [1, K, 2, 2]
    y = torch.tensor(labels, dtype=torch.int64).reshape(1, 2, 2)  # [1, 2, 2]
    return x, y


LOGITS_A = [[2.0, -1.0], [0.5, 0.3], [-1.0, 1.5], [0.2, 0.1]]
LABELS_A = [0, 1, 1, 1]
LOGITS_B = [[0.0, 3.0], [1.0, -2.0], [-0.5, 0.5], [2.5, 0.0]]
LABELS_B = [1, 0, 0, 0]


def test_focal_matches_hand_computation() -> None:
    x, y = to_image(LOGITS_A, LABELS_A)
    # M = 4, M_0 = 1, M_1 = 3: omega_0 = 1/log(1.35), omega_1 = 1/log(1.85)
    expected = focal_by_hand(LOGITS_A, LABELS_A, gamma=2.0)
    assert weighted_focal_loss(x, y).item() == pytest.approx(expected, rel=1e-12)
    assert weighted_focal_loss(x, y, gamma=0.5).item() == pytest.approx(
        focal_by_hand(LOGITS_A, LABELS_A, gamma=0.5), rel=1e-12
    )


def test_focal_is_per_image_then_batch_mean() -> None:
    xa, ya = to_image(LOGITS_A, LABELS_A)
    xb, yb = to_image(LOGITS_B, LABELS_B)
    loss = weighted_focal_loss(torch.cat([xa, xb]), torch.cat([ya, yb]))
    expected = (focal_by_hand(LOGITS_A, LABELS_A, 2.0) + focal_by_hand(LOGITS_B, LABELS_B, 2.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_focal_gamma_zero_uniform_weights_is_scaled_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 4, 4, generator=gen, dtype=torch.float64)
    # three classes with equal valid pixel counts, so all omega_n are equal
    target = torch.tensor([0, 1, 2] * 5 + [0], dtype=torch.int64).reshape(1, 4, 4)
    target[0, 3, 3] = 255  # 15 valid pixels, 5 per class -> omega = 1/log(1.1 + 1/3) for all
    omega = 1.0 / math.log(1.1 + 1.0 / 3.0)
    ce = F.cross_entropy(logits, target, ignore_index=255)  # mean over the 15 valid pixels
    loss = weighted_focal_loss(logits, target, gamma=0.0)
    assert loss.item() == pytest.approx(omega * ce.item() / 3, rel=1e-12)


def test_focal_ignore_pixels_change_nothing() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 4, 5), generator=gen)
    target[:, :, 4] = 255  # the last column is ignored
    base = weighted_focal_loss(logits, target)
    cropped = weighted_focal_loss(logits[..., :4].contiguous(), target[..., :4].contiguous())
    assert base.item() == pytest.approx(cropped.item(), rel=1e-12)

    changed = logits.clone()
    changed[..., 4] = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64) * 10
    changed.requires_grad_(True)
    loss = weighted_focal_loss(changed, target)
    assert loss.item() == pytest.approx(base.item(), rel=1e-12)
    loss.backward()
    assert torch.all(changed.grad[..., 4] == 0)
    assert changed.grad[..., :4].abs().sum() > 0


def test_focal_all_ignored_image_contributes_zero() -> None:
    xa, ya = to_image(LOGITS_A, LABELS_A)
    xb, yb = to_image(LOGITS_B, LABELS_B)
    yb = torch.full_like(yb, 255)
    loss = weighted_focal_loss(torch.cat([xa, xb]), torch.cat([ya, yb]))
    assert loss.item() == pytest.approx(focal_by_hand(LOGITS_A, LABELS_A, 2.0) / 2, rel=1e-12)
    assert weighted_focal_loss(xb, yb).item() == 0.0


def test_focal_gradient_finite_for_extreme_logits() -> None:
    logits = torch.tensor([[[[60.0, -60.0], [0.0, 1e-3]], [[-60.0, 60.0], [0.0, 0.0]]]])
    logits.requires_grad_(True)
    target = torch.tensor([[[1, 1], [0, 1]]])  # pixel (0,0) is confidently wrong, (0,1) right
    for gamma in (0.0, 0.5, 2.0):
        loss = weighted_focal_loss(logits, target, gamma=gamma)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and loss > 0
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("logits", "target", "message"),
    [
        (torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 3, dtype=torch.int64), "target must be"),
        (torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int32), "int64"),
        (torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2), 2, dtype=torch.int64), "0..1"),
        (torch.zeros(2, 2, 2), torch.zeros(2, 2, dtype=torch.int64), "logits must be"),
    ],
)
def test_focal_bad_inputs(logits: torch.Tensor, target: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        weighted_focal_loss(logits, target)


# -------------------------------------------------------------------------- triplet loss


def one_triplet_scene() -> tuple[torch.Tensor, torch.Tensor]:
    """1 image, 1x3 grid: pixel 0 anchor, pixel 1 hard positive, pixel 2 hard negative (class 1)."""
    pred = torch.tensor([[[1, 0, 1]]])
    target = torch.tensor([[[1, 1, 0]]])
    return pred, target


def test_triplet_matches_hand_computation() -> None:
    pred, target = one_triplet_scene()
    f_a, f_p, f_n = [3.0, 4.0], [0.0, 1.0], [1.0, 0.0]
    emb = torch.tensor([f_a, f_p, f_n], dtype=torch.float64).T.reshape(1, 2, 1, 3)  # [1, C, 1, 3]

    def sq(u: list[float], v: list[float]) -> float:
        return sum((x - y) ** 2 for x, y in zip(u, v, strict=True))

    raw = max(sq(f_a, f_p) - sq(f_a, f_n) + 1.0, 0.0)  # (9 + 9) - (4 + 16) + 1 = -1 -> 0
    loss = pixel_triplet_loss(emb, pred, target, 1, margin=1.0, normalize=False)
    assert loss.item() == pytest.approx(raw)
    loss = pixel_triplet_loss(emb, pred, target, 1, margin=3.0, normalize=False)
    assert loss.item() == pytest.approx(1.0)  # -2 + 3

    def unit(u: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in u))
        return [x / norm for x in u]

    a, p, n = unit(f_a), unit(f_p), unit(f_n)  # a = (0.6, 0.8)
    expected = max(sq(a, p) - sq(a, n) + 1.0, 0.0)  # (0.36 + 0.04) - (0.16 + 0.64) + 1 = 0.6
    assert expected == pytest.approx(0.6)
    loss = pixel_triplet_loss(emb, pred, target, 1, margin=1.0)
    assert loss.item() == pytest.approx(expected)


def class_one_scene(h: int = 6, w: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 1 on the left half; the prediction is shifted so all three pools are non-empty."""
    target = torch.zeros(1, h, w, dtype=torch.int64)
    target[:, :, : w // 2] = 1
    pred = torch.zeros(1, h, w, dtype=torch.int64)
    pred[:, : h // 2, : w // 2 + 1] = 1  # top-left: anchors + false positives (column w//2)
    return pred, target  # bottom-left: hard positives


def test_triplet_zero_when_margin_satisfied_and_positive_otherwise() -> None:
    pred, target = class_one_scene()
    e = torch.tensor([1.0, 2.0, -0.5])
    is_class = (target == 1).unsqueeze(1).to(torch.float32)  # [1, 1, h, w]
    sign = 2 * is_class - 1  # +1 on class-1 truth (anchors, positives), -1 elsewhere (negatives)
    emb = sign * e.view(1, 3, 1, 1)  # [1, 3, h, w]
    gen = torch.Generator().manual_seed(0)
    # normalised: |a - p|^2 = 0, |a - n|^2 = 4: hinge(0 - 4 + 1) = 0 for every triplet
    assert pixel_triplet_loss(emb, pred, target, 1, generator=gen).item() == 0.0
    # swapped roles: |a - p|^2 = 4, |a - n|^2 = 0: hinge(4 - 0 + 1) = 5 for every triplet
    anchors_only = (pred == 1) & (target == 1)
    swapped = torch.where(anchors_only.unsqueeze(1), emb, -emb)
    loss = pixel_triplet_loss(swapped, pred, target, 1, generator=gen)
    assert loss.item() == pytest.approx(5.0)


def test_triplet_gradient_reaches_the_three_pixels() -> None:
    pred, target = one_triplet_scene()
    emb = torch.tensor([[[[0.0, 1.0, 0.2]], [[1.0, 0.1, 1.0]]]], requires_grad=True)  # [1,2,1,3]
    loss = pixel_triplet_loss(emb, pred, target, 1)
    assert loss.item() > 0
    loss.backward()
    assert torch.isfinite(emb.grad).all()
    assert (emb.grad.abs().sum(dim=1) > 0).all()  # anchor, positive and negative all get gradient


def test_triplet_no_valid_triplet_is_zero_with_graph() -> None:
    pred = torch.zeros(2, 4, 4, dtype=torch.int64)  # nothing predicted: no anchors at all
    target = torch.ones(2, 4, 4, dtype=torch.int64)
    emb = torch.randn(2, 8, 4, 4, requires_grad=True)
    loss = pixel_triplet_loss(emb, pred, target, 2)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert emb.grad is not None and torch.all(emb.grad == 0)


def test_triplet_uses_plugged_sampler_and_detached_embedding_in_feature_mode() -> None:
    pred, target = one_triplet_scene()
    emb = torch.tensor([[[[3.0, 0.0, 1.0]], [[4.0, 1.0, 0.0]]]], requires_grad=True)
    seen: dict[str, object] = {}

    def fixed_sampler(
        pred: torch.Tensor, target: torch.Tensor, num_classes: int, **kwargs: object
    ) -> TripletSample:
        seen.update(kwargs)
        idx = torch.tensor([[0, 0]])
        return TripletSample(
            anchor=idx,
            positive=torch.tensor([[1, 2]]),
            negative=torch.tensor([[2, 1]]),
            valid=torch.tensor([[True, False]]),
        )

    loss = pixel_triplet_loss(emb, pred, target, 1, positive_mode="feature", sampler=fixed_sampler)
    assert loss.item() == pytest.approx(0.6)  # only the valid first triplet counts (see above)
    sampler_emb = seen["embedding"]
    assert isinstance(sampler_emb, torch.Tensor) and not sampler_emb.requires_grad
    assert torch.allclose(sampler_emb.norm(dim=1), torch.ones(1, 1, 3))  # normalised too
    assert seen["positive_mode"] == "feature" and seen["num_triplets"] == 20


def test_triplet_feature_mode_with_reference_sampler_runs() -> None:
    pred, target = class_one_scene()
    emb = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(3), requires_grad=True)
    loss = pixel_triplet_loss(emb, pred, target, 1, positive_mode="feature")
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert emb.grad.abs().sum() > 0


def two_image_sampler(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, **kwargs: object
) -> TripletSample:
    """Fixed triplets on a 1x3 grid: image 0 has two valid triplets, image 1 one (of three)."""
    return TripletSample(
        anchor=torch.tensor([[0, 0, 0], [0, 0, 0]]),
        positive=torch.tensor([[1, 2, 1], [1, 1, 2]]),
        negative=torch.tensor([[2, 1, 2], [2, 2, 1]]),
        valid=torch.tensor([[True, True, False], [True, False, False]]),
    )


def test_triplet_reduction_sum_is_per_image_sum_then_batch_mean() -> None:
    """Eq. (6)'s sum over each image's triplets, then the mean over the B images; "mean" is the
    mean over all valid triplets. Invalid triplets (with non-zero hinges) count in neither."""
    pred = torch.tensor([[[1, 0, 1]], [[1, 0, 1]]])
    target = torch.tensor([[[1, 1, 0]], [[1, 1, 0]]])
    emb = torch.tensor(
        [[[[0.0, 1.0, 0.2]], [[1.0, 0.1, 1.0]]], [[[2.0, 0.5, 0.0]], [[0.3, 1.5, 2.5]]]],
        dtype=torch.float64,
    )  # [2, 2, 1, 3]
    feats = emb.reshape(2, 2, 3).transpose(1, 2)  # [B, L, C]

    def hinge(b: int, a: int, p: int, n: int, unit: bool) -> float:
        f = F.normalize(feats[b], dim=1) if unit else feats[b]
        return max(float((f[a] - f[p]).pow(2).sum() - (f[a] - f[n]).pow(2).sum()) + 10.0, 0.0)

    for unit in (False, True):
        h00, h01, h02 = hinge(0, 0, 1, 2, unit), hinge(0, 0, 2, 1, unit), hinge(0, 0, 1, 2, unit)
        h10, h11 = hinge(1, 0, 1, 2, unit), hinge(1, 0, 1, 2, unit)
        assert len({round(h, 6) for h in (h00, h01, h10)}) == 3 and h02 > 0 and h11 > 0  # varied
        kwargs = dict(margin=10.0, normalize=unit, sampler=two_image_sampler)
        summed = pixel_triplet_loss(emb, pred, target, 1, reduction="sum", **kwargs)
        mean = pixel_triplet_loss(emb, pred, target, 1, reduction="mean", **kwargs)
        assert summed.item() == pytest.approx((h00 + h01 + h10) / 2)
        assert mean.item() == pytest.approx((h00 + h01 + h10) / 3)
    with pytest.raises(ValueError, match="reduction"):
        pixel_triplet_loss(emb, pred, target, 1, reduction="max", sampler=two_image_sampler)


def test_triplet_reduction_sum_without_valid_triplet_is_zero_with_graph() -> None:
    pred = torch.zeros(2, 4, 4, dtype=torch.int64)
    emb = torch.randn(2, 8, 4, 4, requires_grad=True)
    loss = pixel_triplet_loss(emb, pred, torch.ones_like(pred), 2, reduction="sum")
    assert loss.item() == 0.0 and loss.requires_grad


def test_pml_labels_sit_at_the_features_receptive_field_centres() -> None:
    """Feature pixel i of a stride-8 trunk sees input pixels centred on 8i. At the paper's
    473 -> 60, align_corners=True upsampling puts logit i there too (i * 472 / 59): the labels
    taken at the centres pair each logit with its own pixel, a nearest resize (floor(i 473 / 60))
    does not. At 96 -> 12 the centres are the nearest resize's 8i, not i * 95 / 11; VGG's
    unpadded pools centre on 8i + 3.5."""
    h, size = 60, 473
    logits = torch.randn(1, 1, h, h, generator=torch.Generator().manual_seed(0))
    up = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True)[:, 0]
    assert torch.equal(labels_at_feature_centres(up, (h, h), 8), logits[:, 0])
    nearest = F.interpolate(up[:, None], size=(h, h), mode="nearest")[:, 0]
    assert not torch.allclose(nearest, logits[:, 0])  # a nearest resize sits elsewhere at 473

    label = torch.arange(96 * 80).reshape(1, 96, 80) % 251  # varied values: every pixel differs
    picked = labels_at_feature_centres(label, (12, 10), 8)
    assert torch.equal(picked, label[:, ::8, ::8])
    assert torch.equal(picked, F.interpolate(label[:, None].float(), size=(12, 10))[:, 0].long())
    rows, cols = [round(i * 95 / 11) for i in range(12)], [round(j * 79 / 9) for j in range(10)]
    corners = label[:, rows][:, :, cols]
    assert not torch.equal(picked, corners)  # align_corners positions are off at 96 -> 12
    assert torch.equal(labels_at_feature_centres(label, (12, 10), 8, 3.5), label[:, 4::8, 4::8])
    assert labels_at_feature_centres(label, (13, 11), 8)[0, -1, -1] == label[0, 95, 79]  # clamped
    assert labels_at_feature_centres(label, (1, 1), 8).tolist() == [[[0]]]


@pytest.mark.parametrize("name", ["small", "vgg16_bn"])
def test_feature_levels_declare_where_their_pixels_look(name) -> None:
    """The declared stride * i + offset is the centre of the input region feature pixel i
    depends on: the middle of the non-zero gradient's extent, away from the borders."""
    from mfnet.model.backbone import build_backbone

    trunk = build_backbone(name, "none").eval()
    image = torch.randn(1, 3, 384, 384, requires_grad=True)
    for index, level in enumerate(trunk.feature_levels):
        feature = trunk(image)[index]  # [1, C, 48, 48]
        (grad,) = torch.autograd.grad(feature[0, :, 24, 24].sum(), image)
        rows = grad.abs().sum(dim=(0, 1, 3)).nonzero()[:, 0]  # input rows the pixel depends on
        assert 0 < rows.min() and rows.max() < 383  # the whole field lies inside the image
        assert (rows.min() + rows.max()).item() / 2 == level.stride * 24 + level.offset
