"""The reference triplet sampler: pools, validity, determinism and sampling distributions."""

from __future__ import annotations

import math

import pytest
import torch

from mfnet.ops.triplet_sampling import TripletSample, sample_triplets_reference


def flat_at(labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """labels [B, h, w], index [B, T] -> labels at the flat indices, [B, T]."""
    return labels.reshape(labels.shape[0], -1).gather(1, index)  # [B, T]


def random_scene(
    seed: int, b: int = 3, h: int = 5, w: int = 6, n: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random pred/target [b, h, w] with labels 0..n, 255 pixels, and an embedding [b, 4, h, w]."""
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, n + 1, (b, h, w), generator=gen)
    target = torch.randint(0, n + 1, (b, h, w), generator=gen)
    target[torch.rand(b, h, w, generator=gen) < 0.15] = 255
    # sparsify the prediction of two seeds in three so that pools are often empty
    pred[torch.rand(b, h, w, generator=gen) < (0.0, 0.5, 0.8)[seed % 3]] = 0
    emb = torch.randn(b, 4, h, w, generator=gen)
    return pred, target, emb


@pytest.mark.parametrize("mode", ["spatial", "random", "feature"])
def test_samples_only_from_their_pools(mode: str) -> None:
    n = 2
    counts = {"valid": 0, "invalid": 0}
    for seed in range(40):
        pred, target, emb = random_scene(seed, n=n)
        gen = torch.Generator().manual_seed(1000 + seed)
        s = sample_triplets_reference(
            pred, target, n, num_triplets=16, positive_mode=mode, generator=gen, embedding=emb
        )
        assert s.anchor.dtype == torch.int64 and s.valid.dtype == torch.bool
        assert s.anchor.shape == s.positive.shape == s.negative.shape == s.valid.shape == (3, 16)
        cls = flat_at(pred, s.anchor)  # [B, T], the anchor's class
        v = s.valid
        # anchor in A_n, n a foreground class
        assert torch.all((cls[v] >= 1) & (flat_at(target, s.anchor)[v] == cls[v]))
        # positive in HP_n
        assert torch.all(flat_at(target, s.positive)[v] == cls[v])
        assert torch.all(flat_at(pred, s.positive)[v] != cls[v])
        # negative in HN_n
        assert torch.all(flat_at(pred, s.negative)[v] == cls[v])
        t_neg = flat_at(target, s.negative)[v]
        assert torch.all((t_neg != cls[v]) & (t_neg != 255))
        # invalid triplets carry zeros
        for idx in (s.anchor, s.positive, s.negative):
            assert torch.all(idx[~v] == 0)
        # validity per image: all valid if every anchored class has both pools, none if none has
        for i in range(pred.shape[0]):
            p, t = pred[i], target[i]
            complete, anchored = [], []
            for c in range(1, n + 1):
                if ((p == c) & (t == c)).any():
                    anchored.append(c)
                    hp = ((t == c) & (p != c)).any()
                    hn = ((p == c) & (t != c) & (t != 255)).any()
                    complete.append(bool(hp and hn))
            if anchored and all(complete):
                assert v[i].all()
            if not any(complete):
                assert not v[i].any()
        counts["valid"] += int(v.sum())
        counts["invalid"] += int((~v).sum())
    assert counts["valid"] > 100 and counts["invalid"] > 10  # both cases really exercised


def test_empty_pools_make_triplets_invalid() -> None:
    target = torch.tensor([[[2, 2, 0, 0], [1, 1, 0, 255]]])
    # class 2: anchors (0,0),(0,1), no hard positive; class 1: anchors, HP (1,1), but its only
    # false positive lies on a 255 pixel, so HN_1 is empty
    pred = torch.tensor([[[2, 2, 0, 0], [1, 0, 0, 1]]])
    s = sample_triplets_reference(
        pred, target, 2, num_triplets=50, generator=torch.Generator().manual_seed(0)
    )
    assert not s.valid.any()
    assert torch.all(s.anchor == 0) and torch.all(s.positive == 0) and torch.all(s.negative == 0)

    no_anchor = torch.zeros(2, 3, 3, dtype=torch.int64)  # nothing predicted
    s = sample_triplets_reference(no_anchor, torch.ones(2, 3, 3, dtype=torch.int64), 1)
    assert not s.valid.any() and s.valid.shape == (2, 20)


def test_seed_determinism() -> None:
    pred, target, emb = random_scene(7, b=2, h=12, w=12)

    def draw(seed: int, mode: str) -> TripletSample:
        return sample_triplets_reference(
            pred,
            target,
            2,
            num_triplets=32,
            positive_mode=mode,
            generator=torch.Generator().manual_seed(seed),
            embedding=emb,
        )

    for mode in ("spatial", "random", "feature"):
        a, b, c = draw(5, mode), draw(5, mode), draw(6, mode)
        for field in ("anchor", "positive", "negative", "valid"):
            assert torch.equal(getattr(a, field), getattr(b, field))
        assert a.valid.sum() > 10
        assert not torch.equal(a.anchor, c.anchor)
    # the random stream is consumed identically in every mode: same anchors for one seed
    assert torch.equal(draw(5, "spatial").anchor, draw(5, "random").anchor)


def grid_distance(a: torch.Tensor, q: torch.Tensor, w: int) -> torch.Tensor:
    """Euclidean grid distance between flat indices a and q (same shape), float64."""
    return torch.sqrt(((a // w - q // w) ** 2 + (a % w - q % w) ** 2).to(torch.float64))


def test_spatial_positives_are_closer_than_random_ones() -> None:
    h = w = 32
    gen = torch.Generator().manual_seed(0)
    target = torch.zeros(2, h, w, dtype=torch.int64)
    target[:, :, :24] = 1
    pred = (torch.rand(2, h, w, generator=gen) < 0.5).to(torch.int64)
    mean_dist = {}
    for mode in ("spatial", "random"):
        s = sample_triplets_reference(
            pred,
            target,
            1,
            num_triplets=400,
            positive_mode=mode,
            tau=0.1,
            generator=torch.Generator().manual_seed(1),
        )
        assert s.valid.all()
        mean_dist[mode] = grid_distance(s.anchor, s.positive, w).mean().item()
    # spatial: tau' = 3.2 px; the nearest hard positive is usually 1 px away. random: about 12 px.
    assert mean_dist["spatial"] < 0.4 * mean_dist["random"]


def test_spatial_positive_distribution_matches_kernel() -> None:
    h = w = 12
    tau = 0.3
    anchor_yx = (5, 5)
    positives = [(5, 6), (7, 5), (5, 8), (2, 5), (5, 0), (9, 9), (0, 0), (11, 11)]
    negatives = [(0, 11), (11, 0), (3, 9), (10, 3)]
    pred = torch.zeros(1, h, w, dtype=torch.int64)
    target = torch.zeros(1, h, w, dtype=torch.int64)
    target[0, anchor_yx[0], anchor_yx[1]] = 1
    pred[0, anchor_yx[0], anchor_yx[1]] = 1
    for y, x in positives:
        target[0, y, x] = 1
    for y, x in negatives:
        pred[0, y, x] = 1
    draws = 20000
    s = sample_triplets_reference(
        pred,
        target,
        1,
        num_triplets=draws,
        positive_mode="spatial",
        tau=tau,
        generator=torch.Generator().manual_seed(123),
    )
    assert s.valid.all()
    assert torch.all(s.anchor == anchor_yx[0] * w + anchor_yx[1])

    tau_px = tau * max(h, w)
    weights = [math.exp(-math.dist(anchor_yx, yx) / tau_px) for yx in positives]
    expected = torch.tensor([wt / sum(weights) for wt in weights], dtype=torch.float64)
    flat_pos = torch.tensor([y * w + x for y, x in positives])
    observed = (s.positive[0].unsqueeze(1) == flat_pos).sum(dim=0).to(torch.float64)  # [P]
    assert observed.sum() == draws  # nothing outside HP
    assert (observed / draws - expected).abs().max() < 0.012  # ~4 sigma at p = 0.3, n = 20000
    chi2 = ((observed - draws * expected) ** 2 / (draws * expected)).sum().item()
    assert chi2 < 30.0  # 7 degrees of freedom: P(chi2 > 30) < 1e-4

    flat_neg = torch.tensor([y * w + x for y, x in negatives])
    neg_freq = (s.negative[0].unsqueeze(1) == flat_neg).sum(dim=0).to(torch.float64) / draws
    assert neg_freq.sum() == 1.0
    assert (neg_freq - 0.25).abs().max() < 0.012  # negatives are uniform, whatever the distance

    r = sample_triplets_reference(
        pred,
        target,
        1,
        num_triplets=draws,
        positive_mode="random",
        generator=torch.Generator().manual_seed(124),
    )
    pos_freq = (r.positive[0].unsqueeze(1) == flat_pos).sum(dim=0).to(torch.float64) / draws
    assert (pos_freq - 1 / len(positives)).abs().max() < 0.01  # random mode: uniform over HP


def test_anchors_uniform_over_union_of_class_pools() -> None:
    # 3 anchors of class 1 and 1 of class 2 -> each anchor pixel has probability 1/4
    pred = torch.tensor([[[1, 1, 1, 2, 1, 2, 0, 0]]])
    target = torch.tensor([[[1, 1, 1, 2, 0, 0, 1, 2]]])
    draws = 20000
    s = sample_triplets_reference(
        pred, target, 2, num_triplets=draws, generator=torch.Generator().manual_seed(9)
    )
    assert s.valid.all()
    freq = torch.bincount(s.anchor[0], minlength=8).to(torch.float64) / draws
    assert torch.all(freq[4:] == 0)
    assert (freq[:4] - 0.25).abs().max() < 0.012
    cls = flat_at(pred, s.anchor)[0]
    # class 2 anchors pair with class 2 pools only: positive 7, negative 5
    assert torch.all(s.positive[0][cls == 2] == 7) and torch.all(s.negative[0][cls == 2] == 5)
    assert torch.all(s.positive[0][cls == 1] == 6) and torch.all(s.negative[0][cls == 1] == 4)


def test_feature_mode_picks_farthest_positive_and_closest_negative() -> None:
    # 1x6 grid: pixel 0 anchor, pixels 1-3 hard positives, pixels 4-5 hard negatives (class 1)
    pred = torch.tensor([[[1, 0, 0, 0, 1, 1]]])
    target = torch.tensor([[[1, 1, 1, 1, 0, 0]]])
    emb = torch.tensor(
        [[[[0.0, 1.0, -3.0, 2.0, 5.0, -0.5]], [[0.0, 0.0, 0.0, 0.5, 0.0, 0.0]]]]
    )  # [1, 2, 1, 6]
    for seed in range(3):
        s = sample_triplets_reference(
            pred,
            target,
            1,
            num_triplets=5,
            positive_mode="feature",
            generator=torch.Generator().manual_seed(seed),
            embedding=emb,
        )
        assert s.valid.all()
        assert torch.all(s.anchor == 0)
        assert torch.all(s.positive == 2)  # |(-3, 0)|^2 = 9 is the largest among 1, 9, 4.25
        assert torch.all(s.negative == 5)  # 0.25 < 25
    with pytest.raises(ValueError, match="embedding"):
        sample_triplets_reference(pred, target, 1, positive_mode="feature")


# (bad arguments, expected message): shared with the fused sampler's tests
BAD_INPUTS = [
    ({"positive_mode": "nearest"}, "positive_mode"),
    ({"num_classes": 0}, "num_classes"),
    ({"num_triplets": 0}, "num_triplets"),
    ({"tau": 0.0}, "tau"),
    ({"pred": torch.zeros(1, 3, 3)}, "int64"),
    ({"target": torch.zeros(1, 3, 4, dtype=torch.int64)}, "shapes differ"),
    ({"pred": torch.zeros(3, 3, dtype=torch.int64)}, r"\[B, h, w\]"),
    ({"pred": torch.full((1, 3, 3), 3, dtype=torch.int64)}, "pred values"),
    ({"target": torch.full((1, 3, 3), 7, dtype=torch.int64)}, "target values"),
    (
        {
            "pred": torch.zeros(0, 3, 3, dtype=torch.int64),
            "target": torch.zeros(0, 3, 3, dtype=torch.int64),
        },
        "empty",
    ),
    ({"embedding": torch.zeros(1, 4, 3, 2)}, "embedding must be"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS)
def test_bad_inputs_raise(kwargs: dict, message: str) -> None:
    args = {
        "pred": torch.zeros(1, 3, 3, dtype=torch.int64),
        "target": torch.zeros(1, 3, 3, dtype=torch.int64),
        "num_classes": 2,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sample_triplets_reference(**args)
