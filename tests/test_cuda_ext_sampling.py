"""The fused PML triplet sampler of ``mfnet_ext`` against its specification.

Specification: ``mfnet.ops.triplet_sampling.sample_triplets_reference``. On this CPU machine the
tests run the extension's C++ CPU twin (``torch.ops.mfnet_ext.sample_triplets`` on CPU tensors),
which shares every per-pixel operation and the counter layout with the CUDA kernel. What is
checked:

* Philox4x32-10 against Random123's known-answer vectors, and an independent NumPy model of the
  documented key / counter layout, uniform conversion and logarithm reproduces the op BIT FOR BIT;
* determinism (seed, offset), the pool invariants on odd shapes, validity, the ignore label;
* the empirical distribution over thousands of seeds against the exact probabilities (anchor
  uniform over the anchor pools, positive = softmax(-d / tau') given the anchor, negative uniform
  over HN_n) and against the reference's own draws (chi-square tests, fixed seeds, so the test is
  deterministic);
* ``sample_triplets(impl=...)`` dispatch, errors, the fake kernel (``torch.library.opcheck``).

The ``cuda``-marked tests repeat the checks on a GPU and require the CUDA kernel to equal the CPU
twin bit for bit.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from mfnet.ops import triplet_sampling as ts
from mfnet.ops.triplet_sampling import (
    TripletSample,
    sample_triplets,
    sample_triplets_reference,
)
from test_triplet_sampling import BAD_INPUTS  # noqa: E402 - tests/ is on sys.path

ALPHA = 1e-3  # significance level of every chi-square test (fixed seeds: deterministic)
FIELDS = ("anchor", "positive", "negative", "valid")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def fused(cuda_ext):
    """``mfnet_ext.triplet_sampling`` with the library loaded and its fake kernels registered."""
    from mfnet_ext import triplet_sampling

    triplet_sampling.register_python_kernels()
    return triplet_sampling


def draw(fused, pred, target, n, t=20, seed=0, offset=0, spatial=True, tau=0.1) -> TripletSample:
    return TripletSample(*fused.sample_triplets(pred, target, n, t, tau, spatial, seed, offset))


def same(a: TripletSample, b: TripletSample) -> bool:
    return all(torch.equal(getattr(a, f).cpu(), getattr(b, f).cpu()) for f in FIELDS)


def flat_at(labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """labels [B, h, w], index [B, T] -> labels at the flat indices, [B, T]."""
    return labels.reshape(labels.shape[0], -1).gather(1, index)


def random_scene(seed: int, b: int, h: int, w: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pred/target [b, h, w] with labels 0..n and 255 pixels; pools often empty."""
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, n + 1, (b, h, w), generator=gen)
    target = torch.randint(0, n + 1, (b, h, w), generator=gen)
    target[torch.rand(b, h, w, generator=gen) < 0.15] = 255
    pred[torch.rand(b, h, w, generator=gen) < (0.0, 0.5, 0.85)[seed % 3]] = 0
    return pred, target


# ------------------------------------------------------------------ NumPy model of the kernel
M0, M1, W0, W1 = (np.uint64(v) for v in (0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85))
MASK32 = np.uint64(0xFFFFFFFF)
DOMAIN = (0x4D464E65, 0x54726970)  # "MFNe", "Trip"


def philox_np(counter, key):
    """Philox4x32-10 on uint64 arrays holding 32-bit words (Salmon et al. 2011)."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.asarray(k, dtype=np.uint64) for k in key)
    for r in range(10):
        if r:
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        p0, p1 = M0 * c0, M1 * c2  # < 2^64: exact
        hi0, hi1 = p0 >> np.uint64(32), p1 >> np.uint64(32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, p1 & MASK32, hi0 ^ c3 ^ k1, p0 & MASK32
    return c0, c1, c2, c3


def uniform_np(words) -> np.ndarray:
    odd = ((np.asarray(words, dtype=np.uint64) >> np.uint64(9)) << np.uint64(1)) | np.uint64(1)
    return odd.astype(np.float32) * np.float32(2.0**-24)


_LOG_POLY = (
    -1.1514610310e-1,
    1.1676998740e-1,
    -1.2420140846e-1,
    1.4249322787e-1,
    -1.6668057665e-1,
    2.0000714765e-1,
    -2.4999993993e-1,
    3.3333331174e-1,
)


def log_np(v: np.ndarray) -> np.ndarray:
    """The kernel's logarithm (Cephes logf), float32 op for op (NumPy rounds every op: no FMA)."""
    f32 = np.float32
    v = np.asarray(v, dtype=np.float32)
    bits = v.view(np.uint32)
    e = ((bits >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int32) - 126
    m = ((bits & np.uint32(0x007FFFFF)) | np.uint32(0x3F000000)).view(np.float32)
    small = m < f32(0.70710678118654752440)
    e = np.where(small, e - 1, e)
    x = np.where(small, (m + m) + f32(-1.0), m + f32(-1.0)).astype(np.float32)
    z = x * x
    y = np.full_like(x, f32(7.0376836292e-2))
    for c in _LOG_POLY:
        y = y * x + f32(c)
    y = (y * x) * z
    fe = e.astype(np.float32)
    y = y + fe * f32(-2.12194440e-4)
    y = y + f32(-0.5) * z
    r = x + y
    return r + fe * f32(0.693359375)


def gumbel_np(words) -> np.ndarray:
    return -log_np(-log_np(uniform_np(words)))


def float_order_np(f: np.ndarray) -> np.ndarray:
    u = np.asarray(f, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return np.where(u & np.uint64(0x80000000), ~u & MASK32, u | np.uint64(0x80000000))


def model_sampler(pred, target, n_cls, t_count, tau, spatial, seed, offset) -> TripletSample:
    """The documented algorithm of csrc/triplet_sampling.h in NumPy (key, counters, packing)."""
    p = pred.numpy().reshape(pred.shape[0], -1)
    g = target.numpy().reshape(pred.shape[0], -1)
    b_count, pixels = p.shape
    h, w = pred.shape[1:]
    s, o = seed % 2**64, offset % 2**64
    key = philox_np((o & 0xFFFFFFFF, o >> 32, *DOMAIN), (s & 0xFFFFFFFF, s >> 32))[:2]
    bb, tt, qq = np.meshgrid(
        np.arange(b_count), np.arange(t_count), np.arange(pixels), indexing="ij"
    )  # [B, T, L]
    words = philox_np((qq, tt, bb, np.zeros_like(qq)), key)
    not_q = (~qq.astype(np.uint64)) & MASK32

    def best(order_key, pool):  # argmax of (key << 32 | ~q) over the pool; 0 = empty
        packed = np.where(pool, (order_key << np.uint64(32)) | not_q, np.uint64(0))
        return packed.max(axis=2), packed.argmax(axis=2)

    pb, gb = p[:, None, :], g[:, None, :]  # [B, 1, L]
    a_best, anchor = best(words[0], (pb >= 1) & (pb <= n_cls) & (pb == gb))
    cls = np.take_along_axis(p, anchor, axis=1)[:, :, None]  # [B, T, 1]
    hp = (gb == cls) & (pb != cls)
    hn = (pb == cls) & (gb != cls) & (gb != 255)
    if spatial:
        ay, ax = (anchor // w)[:, :, None], (anchor % w)[:, :, None]
        d = np.sqrt(((qq // w - ay) ** 2 + (qq % w - ax) ** 2).astype(np.float32))
        logw = d * np.float32(-1.0 / (tau * max(h, w)))
        pos_key = float_order_np(logw + gumbel_np(words[1]))
    else:
        pos_key = words[1]
    p_best, positive = best(pos_key, hp)
    n_best, negative = best(words[2], hn)
    valid = (a_best > 0) & (p_best > 0) & (n_best > 0)
    zero = np.zeros_like(anchor)
    return TripletSample(
        *(torch.from_numpy(np.where(valid, i, zero)) for i in (anchor, positive, negative)),
        valid=torch.from_numpy(valid),
    )


# ---------------------------------------------------------------------------------- Philox
KAT = [  # Random123 tests/kat_vectors, "philox4x32 10": counter[4] key[2] -> result[4]
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def random_counters(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, 2**32, (n, 4), generator=gen),
        torch.randint(0, 2**32, (n, 2), generator=gen),
    )


def test_philox_known_answers(fused) -> None:
    counter = torch.tensor([c for c, _, _ in KAT])
    key = torch.tensor([k for _, k, _ in KAT])
    words, _ = fused.philox_debug(counter, key)
    assert words.tolist() == [list(r) for _, _, r in KAT]
    # the NumPy model used below agrees with the vectors, and with the op on random blocks
    model = np.stack(philox_np(counter.numpy().T, key.numpy().T), axis=1)
    assert model.tolist() == [list(r) for _, _, r in KAT]
    counter, key = random_counters(4096)
    words, _ = fused.philox_debug(counter, key)
    model = np.stack(philox_np(counter.numpy().T, key.numpy().T), axis=1).astype(np.int64)
    assert np.array_equal(words.numpy(), model)


def test_gumbel_variates(fused) -> None:
    counter, key = random_counters(1 << 17, seed=1)
    words, gumbel = fused.philox_debug(counter, key)
    g = gumbel.numpy()
    # bit-exact against the NumPy model of the kernel's float32 arithmetic
    assert np.array_equal(g.view(np.uint32), gumbel_np(words.numpy()).view(np.uint32))
    # and accurate: within ~4 ulp of 1 of -log(-log(u)) in float64 (u exact in float32)
    u = uniform_np(words.numpy()).astype(np.float64)
    exact = -np.log(-np.log(u))
    assert np.all(np.abs(g - exact) <= 5e-7 * np.maximum(1.0, np.abs(exact)))
    # extremes (through the model, equal to the op above): u is never 0 or 1, so the variate
    # is finite and accurate at both ends of the word range
    edge = np.array([0, 511, 512, 0x7FFFFFFF, 0xFFFFFE00, 0xFFFFFFFF], dtype=np.uint64)
    u_edge = uniform_np(edge).astype(np.float64)
    assert u_edge.min() == 2.0**-24 and u_edge.max() == 1.0 - 2.0**-24
    g_edge = gumbel_np(edge).astype(np.float64)
    assert np.all(np.abs(g_edge + np.log(-np.log(u_edge))) <= 5e-7 * np.abs(g_edge).clip(1.0))
    # the uniform keys are uniform: the top 4 bits of 2^19 words, chi-square
    top = (words.numpy().ravel() >> 28).astype(np.int64)
    assert stats.chisquare(np.bincount(top, minlength=16)).pvalue > ALPHA


# ---------------------------------------------------------------- layout, determinism, pools
@pytest.mark.parametrize("spatial", [True, False])
@pytest.mark.parametrize(
    ("b", "h", "w", "n", "t"),
    [(2, 7, 11, 2, 20), (3, 1, 23, 1, 5), (2, 13, 1, 5, 20), (1, 6, 9, 5, 1)],
)
def test_matches_numpy_model_bit_for_bit(fused, spatial, b, h, w, n, t) -> None:
    for seed, offset in ((0, 0), (12345, 7), (-1, 2**40 + 3), (2**63 + 5, 2**64 - 1)):
        pred, target = random_scene(abs(seed) % 97, b, h, w, n)
        got = draw(fused, pred, target, n, t, seed, offset, spatial, tau=0.2)
        want = model_sampler(pred, target, n, t, 0.2, spatial, seed, offset)
        assert same(got, want), (seed, offset)


def test_seed_and_offset_determinism(fused) -> None:
    pred, target = random_scene(7, 2, 12, 12, 2)
    for spatial in (True, False):
        a = draw(fused, pred, target, 2, 32, seed=5, spatial=spatial)
        assert same(a, draw(fused, pred, target, 2, 32, seed=5, spatial=spatial))
        assert a.valid.sum() > 10
        for other in (
            draw(fused, pred, target, 2, 32, seed=6, spatial=spatial),
            draw(fused, pred, target, 2, 32, seed=5, offset=1, spatial=spatial),
        ):
            assert not torch.equal(a.anchor, other.anchor)
    # one stream of anchors for both modes, and seeds are taken modulo 2^64
    assert torch.equal(
        draw(fused, pred, target, 2, 32, seed=5).anchor,
        draw(fused, pred, target, 2, 32, seed=5, spatial=False).anchor,
    )
    assert same(draw(fused, pred, target, 2, seed=-1), draw(fused, pred, target, 2, seed=2**64 - 1))
    # image b's draws do not depend on the other images of the batch
    full = draw(fused, pred, target, 2, 32, seed=9)
    first = draw(fused, pred[:1], target[:1], 2, 32, seed=9)
    assert same(TripletSample(*(getattr(full, f)[:1] for f in FIELDS)), first)


def check_invariants(s: TripletSample, pred: torch.Tensor, target: torch.Tensor, n: int) -> None:
    """Every valid triplet comes from its pools; invalid ones carry zeros; validity per image."""
    b_count, t_count = pred.shape[0], s.anchor.shape[1]
    assert s.anchor.dtype == s.positive.dtype == s.negative.dtype == torch.int64
    assert s.valid.dtype == torch.bool
    assert (
        s.anchor.shape
        == s.positive.shape
        == s.negative.shape
        == s.valid.shape
        == (b_count, t_count)
    )
    pred, target = pred.cpu(), target.cpu()
    s = TripletSample(*(getattr(s, f).cpu() for f in FIELDS))
    v = s.valid
    cls = flat_at(pred, s.anchor)
    assert torch.all((cls[v] >= 1) & (cls[v] <= n) & (flat_at(target, s.anchor)[v] == cls[v]))
    assert torch.all(flat_at(target, s.positive)[v] == cls[v])  # HP_n
    assert torch.all(flat_at(pred, s.positive)[v] != cls[v])
    assert torch.all(flat_at(pred, s.negative)[v] == cls[v])  # HN_n
    t_neg = flat_at(target, s.negative)[v]
    assert torch.all((t_neg != cls[v]) & (t_neg != 255))
    for idx in (s.anchor, s.positive, s.negative):
        assert torch.all(idx[~v] == 0)
        assert torch.all(flat_at(target, idx)[v] != 255)  # ignore pixels are never chosen
    for i in range(b_count):
        p, t = pred[i], target[i]
        complete, anchored = [], []
        for c in range(1, n + 1):
            if ((p == c) & (t == c)).any():
                anchored.append(c)
                complete.append(
                    bool(((t == c) & (p != c)).any() and ((p == c) & (t != c) & (t != 255)).any())
                )
        if anchored and all(complete):
            assert v[i].all()
        if not any(complete):
            assert not v[i].any()
        # a valid row's class always has complete pools; a complete class is never invalid
        for j in range(t_count):
            if v[i, j]:
                assert complete[anchored.index(int(cls[i, j]))]


@pytest.mark.parametrize("spatial", [True, False])
@pytest.mark.parametrize(
    ("b", "h", "w", "n", "t"),
    [(3, 7, 11, 2, 20), (2, 1, 31, 1, 20), (2, 17, 1, 2, 1), (4, 5, 6, 5, 20), (1, 1, 1, 1, 3)],
)
def test_pool_invariants(fused, spatial, b, h, w, n, t) -> None:
    counts = {"valid": 0, "invalid": 0}
    for seed in range(12):
        pred, target = random_scene(seed, b, h, w, n)
        s = draw(fused, pred, target, n, t, seed=1000 + seed, spatial=spatial)
        check_invariants(s, pred, target, n)
        counts["valid"] += int(s.valid.sum())
        counts["invalid"] += int((~s.valid).sum())
    if h * w > 1:
        assert counts["valid"] > 0 and counts["invalid"] > 0  # both cases exercised


def test_empty_pools_make_triplets_invalid(fused) -> None:
    target = torch.tensor([[[2, 2, 0, 0], [1, 1, 0, 255]]])
    pred = torch.tensor(
        [[[2, 2, 0, 0], [1, 0, 0, 1]]]
    )  # class 2: no HP; class 1: its only FP is on 255
    s = draw(fused, pred, target, 2, 50, seed=3)
    assert not s.valid.any()
    assert torch.all(s.anchor == 0) and torch.all(s.positive == 0) and torch.all(s.negative == 0)
    zeros = torch.zeros(2, 3, 3, dtype=torch.int64)
    s = draw(fused, zeros, torch.ones_like(zeros), 1, 20)
    assert not s.valid.any() and s.valid.shape == (2, 20)


# -------------------------------------------------------------------------- distributions
def distribution_scene() -> tuple[torch.Tensor, torch.Tensor]:
    """A 5 x 6 map with 2 classes: 6 anchors (4 of class 1, 2 of class 2), HP_1 = 4 pixels,
    HP_2 = 3, HN_1 = 3, HN_2 = 2; pixels (4, 1) and (4, 3) are in HP_2 and HN_1, pixel (2, 2) in
    HP_1 and HN_2; two 255 pixels are predicted as foreground and must never be negatives."""
    pred = torch.zeros(5, 6, dtype=torch.int64)
    target = torch.zeros(5, 6, dtype=torch.int64)
    for y, x in ((0, 0), (1, 1), (4, 5), (2, 3)):
        pred[y, x] = target[y, x] = 1
    for y, x in ((0, 5), (3, 0)):
        pred[y, x] = target[y, x] = 2
    for y, x, p in ((0, 1, 0), (2, 2, 2), (4, 0, 0), (1, 4, 0)):  # HP_1
        target[y, x], pred[y, x] = 1, p
    for y, x, p in ((1, 5, 0), (4, 1, 1)):  # HP_2
        target[y, x], pred[y, x] = 2, p
    pred[3, 3], pred[4, 3], target[4, 3] = 1, 1, 2  # HN_1 = (3,3), (4,3), (4,1)
    pred[0, 3] = 2  # HN_2 = (2,2), (0,3)
    pred[1, 2], target[1, 2] = 2, 255
    pred[3, 5], target[3, 5] = 1, 255
    return pred, target


def exact_probabilities(pred: torch.Tensor, target: torch.Tensor, tau: float) -> dict:
    """P(anchor), P(positive | anchor) = softmax(-d / tau'), P(negative | class) (uniform)."""
    h, w = pred.shape
    p, t = pred.flatten(), target.flatten()
    anchors = [int(q) for q in torch.nonzero((p == t) & (p >= 1)).flatten()]
    out = {"anchor": {a: 1.0 / len(anchors) for a in anchors}, "positive": {}, "negative": {}}
    for a in anchors:
        n = int(p[a])
        hp = [int(q) for q in torch.nonzero((t == n) & (p != n)).flatten()]
        weights = [math.exp(-math.dist(divmod(a, w), divmod(q, w)) / (tau * max(h, w))) for q in hp]
        out["positive"][a] = {q: wt / sum(weights) for q, wt in zip(hp, weights, strict=True)}
        hn = [int(q) for q in torch.nonzero((p == n) & (t != n) & (t != 255)).flatten()]
        out["negative"][n] = {q: 1.0 / len(hn) for q in hn}
    return out


def goodness_of_fit(samples: TripletSample, pred: torch.Tensor, exact: dict) -> dict:
    """p-values of the anchors' frequencies, of the positives given each anchor and of the
    negatives given each class against ``exact`` (chi-square; conditional statistics summed)."""
    a = samples.anchor.flatten().tolist()
    pos = samples.positive.flatten().tolist()
    neg = samples.negative.flatten().tolist()
    cls = pred.flatten()[samples.anchor.flatten()].tolist()
    assert samples.valid.all()
    result = {}
    anchors = sorted(exact["anchor"])
    observed = [a.count(q) for q in anchors]
    assert sum(observed) == len(a)  # nothing outside the anchor pool
    result["anchor"] = stats.chisquare(
        observed, [len(a) * exact["anchor"][q] for q in anchors]
    ).pvalue
    for name, draws, given, table in (
        ("positive", pos, a, exact["positive"]),
        ("negative", neg, cls, exact["negative"]),
    ):
        total, dof = 0.0, 0
        for cond, probs in table.items():
            picked = [d for d, g in zip(draws, given, strict=True) if g == cond]
            counts = np.array([picked.count(q) for q in sorted(probs)], dtype=np.float64)
            assert counts.sum() == len(picked)  # nothing outside the pool
            expected = len(picked) * np.array([probs[q] for q in sorted(probs)])
            total += float(((counts - expected) ** 2 / expected).sum())
            dof += len(probs) - 1
        result[name] = float(stats.chi2.sf(total, dof))
    return result


def homogeneity(first: TripletSample, second: TripletSample) -> float:
    """chi-square p-value that two samples of joint (anchor, positive, negative) outcomes come
    from one distribution."""

    def codes(s: TripletSample) -> list[tuple[int, int, int]]:
        return list(
            zip(
                s.anchor.flatten().tolist(),
                s.positive.flatten().tolist(),
                s.negative.flatten().tolist(),
                strict=True,
            )
        )

    c1, c2 = Counter(codes(first)), Counter(codes(second))
    outcomes = sorted(set(c1) | set(c2))
    table = np.array([[c[o] for o in outcomes] for c in (c1, c2)])
    return float(stats.chi2_contingency(table).pvalue)


# 36000 triplets per sampler: the fused one over 1500 seeds (its calls are cheap), the reference
# (the control, ~5 ms a call on the CPU) over 300 seeds of 5x larger batches
DIST_SEEDS, DIST_BATCH, DIST_T, DIST_TAU = 1500, 2, 12, 0.4
REF_SEEDS, REF_BATCH = 300, 10


def fused_draws(fused, device: str) -> TripletSample:
    pred, target = (
        x.expand(DIST_BATCH, -1, -1).contiguous().to(device) for x in distribution_scene()
    )
    runs = [
        draw(fused, pred, target, 2, DIST_T, seed=seed, tau=DIST_TAU) for seed in range(DIST_SEEDS)
    ]
    return TripletSample(*(torch.cat([getattr(r, f).cpu() for r in runs]) for f in FIELDS))


def reference_draws() -> TripletSample:
    pred, target = (x.expand(REF_BATCH, -1, -1) for x in distribution_scene())
    runs = [
        sample_triplets_reference(
            pred, target, 2, DIST_T, tau=DIST_TAU, generator=torch.Generator().manual_seed(seed)
        )
        for seed in range(REF_SEEDS)
    ]
    return TripletSample(*(torch.cat([getattr(r, f) for r in runs]) for f in FIELDS))


def test_distribution_matches_exact_and_reference(fused) -> None:
    pred, target = distribution_scene()
    exact = exact_probabilities(pred, target, DIST_TAU)
    mine, ref = fused_draws(fused, "cpu"), reference_draws()
    p_mine = goodness_of_fit(mine, pred, exact)
    p_ref = goodness_of_fit(ref, pred, exact)
    p_same = homogeneity(mine, ref)
    print(f"chi-square p-values: fused {p_mine}, reference {p_ref}, fused vs reference {p_same}")
    assert min(p_mine.values()) > ALPHA, p_mine
    assert min(p_ref.values()) > ALPHA, p_ref  # control: the test accepts the specification
    assert p_same > ALPHA
    # the spatial kernel really acts: the nearest hard positive of anchor (1, 1) is drawn more
    # often than the farthest, as the exact probabilities say
    a = 1 * 6 + 1
    picked = mine.positive.flatten()[mine.anchor.flatten() == a]
    near, far = (int((picked == q).sum()) for q in (0 * 6 + 1, 4 * 6 + 0))
    assert near > 1.5 * far


def test_random_mode_positive_is_uniform(fused) -> None:
    pred, target = (x.expand(DIST_BATCH, -1, -1).contiguous() for x in distribution_scene())
    runs = [
        draw(fused, pred, target, 2, DIST_T, seed=seed, spatial=False)
        for seed in range(DIST_SEEDS // 3)
    ]
    s = TripletSample(*(torch.cat([getattr(r, f) for r in runs]) for f in FIELDS))
    exact = exact_probabilities(pred[0], target[0], 1.0)
    exact["positive"] = {a: {q: 1.0 / len(ps) for q in ps} for a, ps in exact["positive"].items()}
    p = goodness_of_fit(s, pred[0], exact)
    assert min(p.values()) > ALPHA, p


# --------------------------------------------------------------------------------- dispatch
def test_impl_cuda_on_cpu_runs_the_twin_with_the_generators_seed(fused) -> None:
    pred, target = random_scene(4, 3, 9, 10, 2)
    for mode in ("spatial", "random"):
        got = sample_triplets(
            pred,
            target,
            2,
            16,
            mode,
            tau=0.2,
            generator=torch.Generator().manual_seed(11),
            impl="cuda",
        )
        seed = int(
            torch.randint(0, 2**63 - 1, (1,), generator=torch.Generator().manual_seed(11)).item()
        )
        want = draw(fused, pred, target, 2, 16, seed, 0, mode == "spatial", tau=0.2)
        assert same(got, want)
        check_invariants(got, pred, target, 2)
    gen = torch.Generator().manual_seed(3)
    first = sample_triplets(pred, target, 2, 16, generator=gen, impl="cuda")
    second = sample_triplets(pred, target, 2, 16, generator=gen, impl="cuda")
    assert not torch.equal(first.anchor, second.anchor)  # the generator advanced
    torch.manual_seed(21)
    global_first = sample_triplets(pred, target, 2, 16, impl="cuda")
    torch.manual_seed(21)
    assert same(global_first, sample_triplets(pred, target, 2, 16, impl="cuda"))
    # no autograd: indices and masks only
    assert not any(getattr(first, f).requires_grad for f in FIELDS)


@pytest.mark.parametrize("mode", ["spatial", "random", "feature"])
def test_impl_auto_on_cpu_is_the_reference(mode: str) -> None:
    pred, target = random_scene(5, 2, 8, 7, 2)
    emb = torch.randn(2, 3, 8, 7, generator=torch.Generator().manual_seed(0))
    got = sample_triplets(
        pred, target, 2, 12, mode, generator=torch.Generator().manual_seed(8), embedding=emb
    )
    want = sample_triplets_reference(
        pred, target, 2, 12, mode, generator=torch.Generator().manual_seed(8), embedding=emb
    )
    assert same(got, want)
    ref = sample_triplets(
        pred,
        target,
        2,
        12,
        mode,
        generator=torch.Generator().manual_seed(8),
        embedding=emb,
        impl="reference",
    )
    assert same(ref, want)


def test_feature_mode_is_not_fused(fused) -> None:
    pred, target = random_scene(5, 1, 4, 4, 2)
    emb = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="feature.*no fused kernel"):
        sample_triplets(pred, target, 2, positive_mode="feature", embedding=emb, impl="cuda")


def test_impl_cuda_fails_loudly_without_the_extension(monkeypatch) -> None:
    import mfnet_ext

    def unavailable(*args, **kwargs):
        raise mfnet_ext.ExtensionUnavailable("no CUDA compiler (test)")

    monkeypatch.setattr(mfnet_ext, "load", unavailable)
    pred, target = random_scene(1, 1, 4, 5, 2)
    with pytest.raises(RuntimeError, match=r"impl='cuda'.*no CUDA compiler.*mfnet_ext build"):
        sample_triplets(pred, target, 2, impl="cuda")
    # "auto" never needs it on the CPU, and falls back to the reference when it is missing
    gen = torch.Generator().manual_seed(2)
    want = sample_triplets_reference(pred, target, 2, generator=torch.Generator().manual_seed(2))
    assert same(sample_triplets(pred, target, 2, generator=gen), want)
    monkeypatch.setattr(ts, "extension_for", lambda impl, device: None)  # "auto" on a GPU, no ext
    assert same(sample_triplets(pred, target, 2, generator=torch.Generator().manual_seed(2)), want)
    with pytest.raises(ValueError, match="impl"):
        sample_triplets(pred, target, 2, impl="triton")


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS)
def test_impl_cuda_validates_like_the_reference(fused, kwargs: dict, message: str) -> None:
    args = {
        "pred": torch.zeros(1, 3, 3, dtype=torch.int64),
        "target": torch.zeros(1, 3, 3, dtype=torch.int64),
        "num_classes": 2,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sample_triplets_reference(**args)
    with pytest.raises(ValueError, match=message):
        sample_triplets(**args, impl="cuda")


def test_check_labels_false_skips_only_the_value_checks(fused) -> None:
    pred = torch.tensor([[[1, 3, 0], [1, 1, 0]]])  # 3 > N: an out-of-range prediction
    target = torch.tensor([[[1, 3, 1], [0, 7, 255]]])
    with pytest.raises(ValueError, match="pred values"):
        sample_triplets(pred, target, 2, impl="cuda")
    s = sample_triplets(
        pred,
        target,
        2,
        30,
        impl="cuda",
        check_labels=False,
        generator=torch.Generator().manual_seed(0),
    )
    # pixel 1 (pred = target = 3) is no anchor: anchors need 1 <= pred <= N
    assert torch.all(s.anchor[s.valid] != 1) and s.valid.any()
    with pytest.raises(ValueError, match="int64"):
        sample_triplets(pred.float(), target, 2, impl="cuda", check_labels=False)


def test_op_checks_its_arguments(fused) -> None:
    pred, target = random_scene(0, 2, 4, 5, 2)
    op = torch.ops.mfnet_ext.sample_triplets.default
    cases = [
        ((pred.int(), target, 2, 5, 0.1, True, 0, 0), "int64"),
        ((pred[0], target[0], 2, 5, 0.1, True, 0, 0), r"\[B, h, w\]"),
        ((pred, target[:, :3], 2, 5, 0.1, True, 0, 0), "shapes differ"),
        ((pred[:0], target[:0], 2, 5, 0.1, True, 0, 0), "empty"),
        ((pred, target, 0, 5, 0.1, True, 0, 0), "num_classes"),
        ((pred, target, 2, 0, 0.1, True, 0, 0), "num_triplets"),
        ((pred, target, 2, 5, 0.0, True, 0, 0), "tau"),
        ((pred, target, 2, 5, float("nan"), True, 0, 0), "tau"),
        ((pred, target, 2, 5, 1e-300, True, 0, 0), "too small"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    op(pred, target, 2, 5, 0.0, False, 0, 0)  # tau is unused in random mode


def test_seed_and_offset_needs_the_labels_device(fused) -> None:
    with pytest.raises(RuntimeError, match="generator is on cpu"):
        fused.seed_and_offset(torch.Generator(), "cuda")
    gen = torch.Generator().manual_seed(1)
    seed, offset = fused.seed_and_offset(gen, "cpu")
    assert offset == 0 and seed == int(
        torch.randint(0, 2**63 - 1, (1,), generator=torch.Generator().manual_seed(1)).item()
    )


def test_opcheck_schema_and_fake_kernels(fused) -> None:
    pred, target = random_scene(3, 2, 5, 7, 2)
    torch.library.opcheck(
        torch.ops.mfnet_ext.sample_triplets.default, (pred, target, 2, 6, 0.1, True, 1, 2)
    )
    counter, key = random_counters(8)
    torch.library.opcheck(torch.ops.mfnet_ext.philox_debug.default, (counter, key))


# ------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@needs_cuda
def test_cuda_philox_and_gumbel_equal_the_cpu(fused) -> None:
    counter = torch.tensor([c for c, _, _ in KAT])
    key = torch.tensor([k for _, k, _ in KAT])
    words, _ = fused.philox_debug(counter.cuda(), key.cuda())
    assert words.cpu().tolist() == [list(r) for _, _, r in KAT]
    counter, key = random_counters(1 << 18, seed=2)
    cpu = fused.philox_debug(counter, key)
    gpu = fused.philox_debug(counter.cuda(), key.cuda())
    assert torch.equal(cpu[0], gpu[0].cpu())
    assert torch.equal(cpu[1].view(torch.int32), gpu[1].cpu().view(torch.int32))  # bit for bit


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("spatial", [True, False])
@pytest.mark.parametrize(
    ("b", "h", "w", "n", "t"),
    [
        (3, 7, 11, 2, 20),  # 77 pixels: 128-thread blocks
        (2, 1, 300, 1, 20),
        (2, 23, 29, 5, 33),  # 256-thread blocks
        (4, 60, 60, 2, 20),
        (1, 97, 101, 3, 5),  # 1024-thread blocks
        (1, 1, 1, 1, 3),
    ],
)
def test_cuda_equals_cpu_twin_bit_for_bit(fused, spatial, b, h, w, n, t) -> None:
    for seed, offset in ((0, 0), (987654321, 3), (-5, 2**50)):
        pred, target = random_scene(abs(seed) % 11, b, h, w, n)
        cpu = draw(fused, pred, target, n, t, seed, offset, spatial)
        gpu = draw(fused, pred.cuda(), target.cuda(), n, t, seed, offset, spatial)
        assert gpu.anchor.is_cuda and same(cpu, gpu), (seed, offset)
        check_invariants(gpu, pred, target, n)
    if h * w <= 100:
        assert same(
            draw(fused, pred.cuda(), target.cuda(), n, t, 1, 2, spatial),
            model_sampler(pred, target, n, t, 0.1, spatial, 1, 2),
        )


@pytest.mark.cuda
@needs_cuda
def test_cuda_sampler_runs_on_the_current_stream(fused) -> None:
    from test_cuda_ext_pooling import side_stream_results

    pred, target = random_scene(4, 4, 60, 60, 2)
    cpu = draw(fused, pred, target, 2, 20, 7, 0)
    pred, target = pred.cuda(), target.cuda()
    results = side_stream_results(
        lambda: list(fused.sample_triplets(pred, target, 2, 20, 0.1, True, 7, 0)),
        [getattr(cpu, f) for f in FIELDS],
    )
    assert cpu.valid.any()  # some triplets exist, so equality is not between empty draws
    assert same(cpu, TripletSample(*results))


@pytest.mark.cuda
@needs_cuda
def test_cuda_distribution_and_determinism(fused) -> None:
    pred, target = distribution_scene()
    mine = fused_draws(fused, "cuda")
    assert same(mine, fused_draws(fused, "cpu"))
    p = goodness_of_fit(mine, pred, exact_probabilities(pred, target, DIST_TAU))
    assert min(p.values()) > ALPHA, p
    big_pred, big_target = random_scene(2, 4, 60, 60, 2)
    big_pred, big_target = big_pred.cuda(), big_target.cuda()
    first = draw(fused, big_pred, big_target, 2, 20, seed=17)
    for _ in range(3):
        assert same(first, draw(fused, big_pred, big_target, 2, 20, seed=17))


@pytest.mark.cuda
@needs_cuda
def test_cuda_front_uses_the_generators_philox_state(fused) -> None:
    pred, target = (x.cuda() for x in random_scene(6, 2, 30, 40, 2))
    gen = torch.Generator(device="cuda").manual_seed(123)
    state = gen.get_state()
    offset = gen.get_offset()
    got = sample_triplets(pred, target, 2, 20, generator=gen)  # "auto": the kernel on CUDA
    assert got.anchor.is_cuda and gen.get_offset() == offset + 4
    assert same(got, draw(fused, pred, target, 2, 20, seed=123, offset=offset))
    gen.set_state(state)
    assert same(got, sample_triplets(pred, target, 2, 20, generator=gen, impl="cuda"))
    assert not same(got, sample_triplets(pred, target, 2, 20, generator=gen, impl="cuda"))
    check_invariants(got, pred, target, 2)
    # the synchronisation-free path (no label-value checks) samples just the same
    s = sample_triplets(pred, target, 2, 20, generator=gen, check_labels=False)
    check_invariants(s, pred, target, 2)
