// Per-element math of the fused PML triplet sampler, shared by the CUDA kernel
// (triplet_sampling.cu) and its C++ CPU twin (triplet_sampling_cpu.cpp), so that both give
// BIT-IDENTICAL results for one (seed, offset).
//
// The specification is mfnet/ops/triplet_sampling.py::sample_triplets_reference. Per image b and
// triplet t, every categorical draw is a masked argmax over the pixels q of an independent random
// key (the Gumbel-max trick), so it is exactly a draw from the reference's distribution:
//
//   anchor   : argmax over A = {q : 1 <= pred[q] <= N, pred[q] == target[q]} of U32(b, t, q, x)
//              (i.i.d. uniform 32-bit keys: the argmax is uniform over A)
//   positive : n = pred[anchor]; argmax over HP_n = {target == n, pred != n} of
//              "spatial": -d(anchor, q) / tau' + G(U32(b, t, q, y)), G = -log(-log(u)) Gumbel
//              "random" : U32(b, t, q, y)
//   negative : argmax over HN_n = {pred == n, target != n, target != 255} of U32(b, t, q, z)
//
// Random bits (counter-based, Philox4x32-10):
//   call key    k = Philox((offset lo, offset hi, "MFNe", "Trip"), key = (seed lo, seed hi)).xy:
//               a pseudorandom function of the full 64-bit seed AND 64-bit offset, so every
//               (seed, offset) pair is its own stream; the constant words separate this domain
//               from other users of the same seed (PyTorch's CUDA generator keys its own Philox
//               streams with the seed itself).
//   pixel words Philox((q, t, b, 0), k): one block of 4 words per (image, triplet, pixel); .x
//               keys the anchor draw, .y the positive, .z the negative, .w is unused. The counter
//               words are distinct for all b, t, q < 2^32 (checked by the ops), so no two draws
//               of one call share random bits.
//
// A candidate is packed into one uint64, (32-bit order key << 32) | ~q: the larger key wins and
// equal keys go to the LOWER index (~q is larger), matching argmax's first-index rule. 0 means
// "no candidate" (an empty pool): a real candidate has ~q >= 1 because q < 2^32 - 1. The draws
// are therefore plain uint64 max-reductions, associative and commutative: any reduction order
// (a CUDA block, a sequential CPU loop) gives the same bits.
//
// Floating point (spatial mode): only IEEE-754 round-to-nearest +, *, sqrt and exact integer
// conversions, written with explicit intrinsics on the device (__fmul_rn, __fadd_rn,
// __fsqrt_rn: never contracted into FMAs, unaffected by --use_fast_math; no value is ever
// subnormal, so flush-to-zero is moot) and with volatile temporaries on the host (no FMA
// contraction by g++/clang either). The logarithm is our own
// (Cephes logf, ~1 ulp) built from those operations, NOT the libm/CUDA logf, whose last bits
// differ between glibc and CUDA. Hence CPU == CUDA bit for bit in every mode.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "philox.h"

namespace mfnet_ext {
namespace triplet {

constexpr int64_t kIgnoreIndex = 255;
constexpr uint32_t kDomainWord0 = 0x4D464E65u;  // "MFNe"
constexpr uint32_t kDomainWord1 = 0x54726970u;  // "Trip"

// ---------------------------------------------------------------------------------------------
// Exact float helpers (identical bits on host and device)

MFNET_RNG_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float r = a * b;  // volatile: the product is rounded, never fused into an FMA
  return r;
#endif
}

MFNET_RNG_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  volatile float r = a + b;
  return r;
#endif
}

MFNET_RNG_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);  // IEEE correctly rounded (sqrtss on x86-64, fsqrt on arm64)
#endif
}

MFNET_RNG_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

MFNET_RNG_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// Natural logarithm of a POSITIVE, NORMAL, FINITE float (Cephes logf, S. Moshier: peak relative
// error 7.6e-8 over 0.5..1e5), evaluated with round-to-nearest mul/add only. Callers guarantee
// the domain: uniform_open01 >= 2^-24, and -log(u) >= 5.9e-8 for those u.
MFNET_RNG_HD float log_positive(float v) {
  const uint32_t bits = float_bits(v);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xffu) - 126;  // v = m * 2^e, m in [0.5, 1)
  const float m = bits_float((bits & 0x007fffffu) | 0x3f000000u);
  float x;
  if (m < 0.70710678118654752440f) {  // m in [0.5, 1/sqrt 2): use 2m - 1 (exact, Sterbenz)
    e -= 1;
    x = add_rn(add_rn(m, m), -1.0f);
  } else {  // m in [1/sqrt 2, 1): m - 1, exact
    x = add_rn(m, -1.0f);
  }
  const float z = mul_rn(x, x);
  float y = 7.0376836292e-2f;
  y = add_rn(mul_rn(y, x), -1.1514610310e-1f);
  y = add_rn(mul_rn(y, x), 1.1676998740e-1f);
  y = add_rn(mul_rn(y, x), -1.2420140846e-1f);
  y = add_rn(mul_rn(y, x), 1.4249322787e-1f);
  y = add_rn(mul_rn(y, x), -1.6668057665e-1f);
  y = add_rn(mul_rn(y, x), 2.0000714765e-1f);
  y = add_rn(mul_rn(y, x), -2.4999993993e-1f);
  y = add_rn(mul_rn(y, x), 3.3333331174e-1f);
  y = mul_rn(mul_rn(y, x), z);
  const float fe = static_cast<float>(e);  // |e| <= 128: exact
  y = add_rn(y, mul_rn(fe, -2.12194440e-4f));  // ln 2 = 0.693359375 - 2.12194440e-4 (split)
  y = add_rn(y, mul_rn(-0.5f, z));
  float r = add_rn(x, y);
  r = add_rn(r, mul_rn(fe, 0.693359375f));
  return r;
}

// Standard Gumbel variate -log(-log(u)) of the uniform u = uniform_open01(word), in
// [-2.8, 16.7]: always finite.
MFNET_RNG_HD float gumbel(uint32_t word) {
  const float u = philox::uniform_open01(word);
  return -log_positive(-log_positive(u));
}

// ---------------------------------------------------------------------------------------------
// Random words

MFNET_RNG_HD philox::Key call_key(uint64_t seed, uint64_t offset) {
  const philox::Counter c = philox::philox4x32_10(
      philox::Counter{philox::lo32(offset), philox::hi32(offset), kDomainWord0, kDomainWord1},
      philox::Key{philox::lo32(seed), philox::hi32(seed)});
  return philox::Key{c.x, c.y};
}

MFNET_RNG_HD philox::Counter pixel_words(philox::Key key, uint32_t b, uint32_t t, uint32_t q) {
  return philox::philox4x32_10(philox::Counter{q, t, b, 0u}, key);
}

// ---------------------------------------------------------------------------------------------
// Candidates: (order key << 32) | ~q; larger wins, ties to the lower q; 0 = none

MFNET_RNG_HD uint64_t pack(uint32_t order_key, uint32_t q) {
  return (static_cast<uint64_t>(order_key) << 32) | static_cast<uint64_t>(~q);
}

MFNET_RNG_HD uint64_t max_candidate(uint64_t a, uint64_t b) { return a > b ? a : b; }

MFNET_RNG_HD int64_t candidate_index(uint64_t packed) {
  return static_cast<int64_t>(~static_cast<uint32_t>(packed));
}

// Monotone map float -> uint32 (a < b  =>  order(a) < order(b)) for finite floats.
MFNET_RNG_HD uint32_t float_order(float f) {
  const uint32_t u = float_bits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// ---------------------------------------------------------------------------------------------
// Pools (pred p, target g of one pixel; n the anchor's class)

MFNET_RNG_HD bool in_anchor_pool(int64_t p, int64_t g, int64_t num_classes) {
  return p >= 1 && p <= num_classes && p == g;
}

MFNET_RNG_HD bool in_positive_pool(int64_t p, int64_t g, int64_t n) {  // HP_n
  return g == n && p != n;
}

MFNET_RNG_HD bool in_negative_pool(int64_t p, int64_t g, int64_t n) {  // HN_n
  return p == n && g != n && g != kIgnoreIndex;
}

// Anchor candidate of pixel q (0 when q is not in the anchor pool).
MFNET_RNG_HD uint64_t anchor_candidate(philox::Key key, uint32_t b, uint32_t t, uint32_t q,
                                       int64_t p, int64_t g, int64_t num_classes) {
  if (!in_anchor_pool(p, g, num_classes)) return 0;
  return pack(pixel_words(key, b, t, q).x, q);
}

// log-weight of the spatial kernel, -d(a, q) / tau' = d * neg_inv_tau, with d the Euclidean
// distance between the centres of the anchor (row ay, column ax) and pixel q on a grid of the
// given width. Integer offsets, squared exactly in 64 bits (h * w < 2^32 keeps the sum below
// 2^64), then one correctly rounded conversion (exact below 2^24) and a correctly rounded sqrt.
MFNET_RNG_HD float spatial_log_weight(uint32_t ay, uint32_t ax, uint32_t q, uint32_t width,
                                      float neg_inv_tau) {
  const uint32_t qy = q / width;
  const uint32_t qx = q - qy * width;
  const uint64_t dy = ay > qy ? ay - qy : qy - ay;
  const uint64_t dx = ax > qx ? ax - qx : qx - ax;
  const float d = sqrt_rn(static_cast<float>(dy * dy + dx * dx));
  return mul_rn(d, neg_inv_tau);
}

// Positive and negative candidates of pixel q for an anchor at (ay, ax) of class n; at most one
// is non-zero (HP_n and HN_n are disjoint: pred != n versus pred == n).
MFNET_RNG_HD void pool_candidates(philox::Key key, uint32_t b, uint32_t t, uint32_t q,
                                  int64_t p, int64_t g, int64_t n, uint32_t ay, uint32_t ax,
                                  uint32_t width, bool spatial, float neg_inv_tau,
                                  uint64_t& positive, uint64_t& negative) {
  positive = 0;
  negative = 0;
  if (in_positive_pool(p, g, n)) {
    const uint32_t word = pixel_words(key, b, t, q).y;
    const uint32_t order_key =
        spatial
            ? float_order(add_rn(spatial_log_weight(ay, ax, q, width, neg_inv_tau), gumbel(word)))
            : word;
    positive = pack(order_key, q);
  } else if (in_negative_pool(p, g, n)) {
    negative = pack(pixel_words(key, b, t, q).z, q);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: argument checks shared by the CPU and CUDA ops (the dispatcher picks the device)

struct SamplerArgs {
  int64_t batch, height, width, pixels, triplets, num_classes;
  bool spatial;
  float neg_inv_tau;  // -1 / (tau * max(h, w)), 0 in "random" mode
  philox::Key key;    // call_key(seed, offset)
};

inline SamplerArgs check_sampler_args(const at::Tensor& pred, const at::Tensor& target,
                                      int64_t num_classes, int64_t num_triplets, double tau,
                                      bool spatial, int64_t seed, int64_t offset) {
  constexpr const char* op = "mfnet_ext::sample_triplets: ";
  TORCH_CHECK(pred.scalar_type() == at::kLong && target.scalar_type() == at::kLong, op,
              "pred and target must be int64, got ", pred.scalar_type(), " and ",
              target.scalar_type());
  TORCH_CHECK(pred.dim() == 3, op, "pred must be [B, h, w], got shape ", pred.sizes());
  TORCH_CHECK(pred.sizes() == target.sizes(), op, "pred and target shapes differ: ",
              pred.sizes(), " vs ", target.sizes());
  TORCH_CHECK(pred.device() == target.device(), op, "pred and target devices differ: ",
              pred.device(), " vs ", target.device());
  SamplerArgs args;
  args.batch = pred.size(0);
  args.height = pred.size(1);
  args.width = pred.size(2);
  TORCH_CHECK(args.batch >= 1 && args.height >= 1 && args.width >= 1, op,
              "pred/target must not be empty, got shape ", pred.sizes());
  args.pixels = args.height * args.width;
  // 32-bit pixel, triplet and image counters; ~q must stay non-zero (see pack)
  TORCH_CHECK(args.pixels < static_cast<int64_t>(UINT32_MAX), op, "h * w = ", args.pixels,
              " pixels is too many (< 2^32 - 1)");
  TORCH_CHECK(args.batch <= static_cast<int64_t>(UINT32_MAX), op, "batch too large");
  TORCH_CHECK(num_classes >= 1, op, "num_classes must be >= 1, got ", num_classes);
  TORCH_CHECK(num_triplets >= 1 && num_triplets <= static_cast<int64_t>(UINT32_MAX), op,
              "num_triplets must be in 1..2^32-1, got ", num_triplets);
  args.triplets = num_triplets;
  args.num_classes = num_classes;
  args.spatial = spatial;
  args.neg_inv_tau = 0.0f;
  if (spatial) {
    TORCH_CHECK(tau > 0.0 && std::isfinite(tau), op, "tau must be > 0 and finite, got ", tau);
    const double tau_px = tau * static_cast<double>(std::max(args.height, args.width));
    const float neg_inv = static_cast<float>(-1.0 / tau_px);
    TORCH_CHECK(std::isfinite(neg_inv), op, "tau = ", tau, " is too small (1 / (tau * max(h, w))",
                " overflows float32)");
    // a subnormal scale would be flushed on the device under -ftz: treat it as 0 (uniform)
    args.neg_inv_tau = std::fabs(neg_inv) < FLT_MIN ? 0.0f : neg_inv;
  }
  args.key = call_key(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  return args;
}

// philox_debug test hook: counter int64 [n, 4], key int64 [n, 2] (low 32 bits of each used)
inline void check_philox_debug_args(const at::Tensor& counter, const at::Tensor& key) {
  constexpr const char* op = "mfnet_ext::philox_debug: ";
  TORCH_CHECK(counter.scalar_type() == at::kLong && key.scalar_type() == at::kLong, op,
              "counter and key must be int64");
  TORCH_CHECK(counter.dim() == 2 && counter.size(1) == 4, op, "counter must be [n, 4], got ",
              counter.sizes());
  TORCH_CHECK(key.dim() == 2 && key.size(1) == 2 && key.size(0) == counter.size(0), op,
              "key must be [n, 2] with the counter's n, got ", key.sizes());
  TORCH_CHECK(counter.device() == key.device(), op, "counter and key devices differ");
}

}  // namespace triplet
}  // namespace mfnet_ext
