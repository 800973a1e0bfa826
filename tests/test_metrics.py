"""FewShotMeter against small hand-computed examples (TP/FP/FN written out by hand)."""

from __future__ import annotations

import math

import pytest
import torch

from mfnet.metrics import FewShotMeter

FOLD = [1, 2, 3, 4, 5]


def t(rows: list) -> torch.Tensor:
    """int64 label map from nested lists."""
    return torch.tensor(rows, dtype=torch.int64)


def assert_same_results(a: dict, b: dict) -> None:
    for key in ("miou_star", "miou", "fbiou"):
        assert a[key] == pytest.approx(b[key], nan_ok=True), key
    for key in ("per_class_star", "per_class"):
        assert a[key].keys() == b[key].keys()
        for c in a[key]:
            assert a[key][c] == pytest.approx(b[key][c], nan_ok=True), (key, c)


def test_one_way_hand_computed() -> None:
    target = t([[0, 1, 1], [0, 1, 1], [0, 0, 0]])
    pred = t([[0, 1, 0], [1, 1, 1], [0, 0, 0]])
    # class 3 (label 1): TP (0,1),(1,1),(1,2) = 3; FP (1,0) = 1; FN (0,2) = 1
    # background: TP 4 ((0,0),(2,0),(2,1),(2,2)); FP (0,2) = 1; FN (1,0) = 1
    meter = FewShotMeter(FOLD)
    meter.update(pred, target, [3])
    res = meter.compute()
    assert res["per_class_star"][3] == pytest.approx(3 / (3 + 1 + 1))
    assert res["per_class"][3] == pytest.approx(3 / (3 + 1 + 1))
    assert res["miou_star"] == pytest.approx(0.6)
    assert res["miou"] == pytest.approx(0.6)
    for c in (1, 2, 4, 5):  # never in an episode: NaN, left out of the mean
        assert math.isnan(res["per_class_star"][c]) and math.isnan(res["per_class"][c])
    assert res["fbiou"] == pytest.approx((4 / 6 + 3 / 5) / 2)


def test_two_way_absent_class_star_below_panet() -> None:
    # episode (2, 4): label 1 = class 2, label 2 = class 4; the query contains only class 2
    target = t([[1, 1, 0, 0], [1, 1, 0, 0]])
    pred = t([[1, 2, 0, 2], [1, 1, 0, 0]])
    # class 2: TP (0,0),(1,0),(1,1) = 3; FP 0; FN (0,1) = 1 -> 3/4 in both metrics
    # class 4: absent. mIoU*: TP 0, FP (0,1),(0,3) = 2, FN 0 -> 0. mIoU (PANet): skipped -> NaN
    meter = FewShotMeter(FOLD)
    meter.update(pred, target, [2, 4])
    res = meter.compute()
    assert res["per_class_star"][2] == pytest.approx(0.75)
    assert res["per_class_star"][4] == 0.0
    assert res["per_class"][2] == pytest.approx(0.75)
    assert math.isnan(res["per_class"][4])
    assert res["miou_star"] == pytest.approx((0.75 + 0.0) / 2)
    assert res["miou"] == pytest.approx(0.75)
    assert res["miou_star"] < res["miou"]
    # foreground: TP 4 (incl. (0,1): class 2 predicted as class 4), FP (0,3) = 1, FN 0 -> 4/5
    # background: TP 3, FP 0, FN (0,3) = 1 -> 3/4
    assert res["fbiou"] == pytest.approx((0.8 + 0.75) / 2)

    # a second episode where class 4 is present: PANet now has data for class 4 too
    target2 = t([[2, 2], [0, 0]])
    pred2 = t([[2, 0], [2, 0]])
    # class 4: TP 1, FP 1 ((1,0)), FN 1 ((0,1)); class 2 absent, never predicted: adds nothing
    meter.update(pred2, target2, [2, 4])
    res = meter.compute()
    assert res["per_class"][4] == pytest.approx(1 / 3)
    assert res["per_class_star"][4] == pytest.approx(1 / (1 + (2 + 1) + 1))
    assert res["per_class"][2] == pytest.approx(0.75)
    assert res["miou"] == pytest.approx((0.75 + 1 / 3) / 2)
    assert res["miou_star"] == pytest.approx((0.75 + 1 / 5) / 2)


def test_fbiou_confusion_between_classes_is_foreground_tp() -> None:
    target = t([[1, 1, 2, 0]])
    pred = t([[1, 2, 2, 0]])
    # (0,1) is class-1 truth predicted as class 2: an error for the classes, fine for FB
    # foreground: TP 3, FP 0, FN 0 -> 1; background: TP 1, FP 0, FN 0 -> 1
    meter = FewShotMeter(FOLD)
    meter.update(pred, target, [1, 2])
    res = meter.compute()
    assert res["fbiou"] == pytest.approx(1.0)
    # class 1: TP 1, FN 1; class 2: TP 1, FP 1 (both present, so both metrics agree)
    assert res["per_class_star"] == pytest.approx(
        {1: 0.5, 2: 0.5, 3: math.nan, 4: math.nan, 5: math.nan}, nan_ok=True
    )
    assert res["miou"] == pytest.approx(0.5)


def test_ignore_pixels_count_nowhere() -> None:
    target = t([[1, 255, 0], [1, 255, 0]])
    pred_a = t([[1, 1, 0], [0, 1, 1]])
    pred_b = t([[1, 0, 0], [0, 2, 1]])  # differs only under the 255 pixels
    # class 1 (label 1): TP (0,0) = 1; FP (1,2) = 1 (the 255 pixels do not count); FN (1,0) = 1
    results = []
    for pred in (pred_a, pred_b):
        meter = FewShotMeter(FOLD)
        meter.update(pred, target, [1, 2])
        results.append(meter.compute())
    assert_same_results(results[0], results[1])
    assert results[0]["per_class_star"][1] == pytest.approx(1 / 3)
    assert math.isnan(results[0]["per_class_star"][2])  # label 2 only under 255: no data
    # background: TP (0,2) = 1, FP (1,0) = 1, FN (1,2) = 1; foreground the same
    assert results[0]["fbiou"] == pytest.approx(1 / 3)


def test_accumulation_pools_counts_not_per_update_means() -> None:
    meter = FewShotMeter(FOLD)
    meter.update(t([[1, 0, 0, 0]]), t([[1, 0, 0, 0]]), [5])  # TP 1, FP 0, FN 0 -> IoU 1
    meter.update(t([[1, 1, 1, 1]]), t([[1, 0, 0, 0]]), [5])  # TP 1, FP 3, FN 0 -> IoU 1/4
    res = meter.compute()
    assert res["per_class_star"][5] == pytest.approx(2 / (2 + 3 + 0))  # pooled, not 0.625
    assert res["miou"] == pytest.approx(0.4)
    # background: TP 3 + 0, FP 0, FN 0 + 3 -> 3/6; foreground: TP 2, FP 3, FN 0 -> 2/5
    assert res["fbiou"] == pytest.approx((0.5 + 0.4) / 2)
    meter.reset()
    assert math.isnan(meter.compute()["miou_star"])


def test_batched_update_equals_separate_updates() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (2, 6, 7), generator=gen)
    target = torch.randint(0, 3, (2, 6, 7), generator=gen)
    target[0, :2] = 255
    target[1][target[1] == 2] = 0  # class of label 2 absent from image 1: per-image presence
    batched, separate = FewShotMeter(FOLD), FewShotMeter(FOLD)
    batched.update(pred, target, torch.tensor([4, 1]))
    separate.update(pred[0], target[0], [4, 1])
    separate.update(pred[1], target[1], [4, 1])
    res = batched.compute()
    assert_same_results(res, separate.compute())
    assert res["miou_star"] < res["miou"]  # label 2 was predicted in image 1 where it is absent


def test_never_seen_class_and_empty_meter_are_nan() -> None:
    meter = FewShotMeter(FOLD)
    res = meter.compute()
    assert math.isnan(res["miou_star"]) and math.isnan(res["miou"]) and math.isnan(res["fbiou"])
    assert all(math.isnan(v) for v in res["per_class"].values())


@pytest.mark.parametrize(
    ("pred", "target", "classes", "message"),
    [
        (t([[0, 1]]), t([[0, 1, 0]]), [1], "shapes differ"),
        (t([[0, 2]]), t([[0, 1]]), [1], "pred values"),
        (t([[0, -1]]), t([[0, 1]]), [1], "pred values"),
        (t([[0, 1]]), t([[0, 7]]), [1], "target values"),
        (t([[0, 1]]), t([[0, 1]]), [9], "not among"),
        (t([[0, 1]]), t([[0, 1]]), [1, 1], "duplicates"),
        (t([[0, 1]]), t([[0, 1]]), [], "empty"),
        (t([[0, 1]]).float(), t([[0, 1]]), [1], "integer dtype"),
        (t([[0, 1]]), t([[0, 1]]).bool(), [1], "integer dtype"),
        (t([0, 1]), t([0, 1]), [1], r"\[H, W\]"),
    ],
)
def test_bad_inputs_raise(
    pred: torch.Tensor, target: torch.Tensor, classes: list[int], message: str
) -> None:
    meter = FewShotMeter(FOLD)
    with pytest.raises(ValueError, match=message):
        meter.update(pred, target, classes)
    assert math.isnan(meter.compute()["miou_star"])  # a rejected update adds nothing


def test_bad_class_ids_raise() -> None:
    with pytest.raises(ValueError, match="duplicates"):
        FewShotMeter([1, 1])
    with pytest.raises(ValueError, match="empty"):
        FewShotMeter([])
