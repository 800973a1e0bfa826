// Philox4x32-10, the counter-based random number generator of Salmon, Moraes, Dror and Shaw,
// "Parallel random numbers: as easy as 1, 2, 3" (SC 2011), as in Random123's philox.h.
//
// A pure function: 128-bit counter + 64-bit key -> 128 random bits. No state, so any thread can
// compute any element of a stream, and host (g++) and device (nvcc) code give the same words:
// everything here is integer arithmetic, __host__ __device__ when compiled by nvcc and plain
// inline C++ otherwise. Checked against Random123's known-answer vectors (tests/kat_vectors)
// by tests/test_cuda_ext_sampling.py through the mfnet_ext::philox_debug test hook.
#pragma once

#include <cstdint>

// Inline everywhere; __host__ __device__ under nvcc (both .cu and .cpp files include this).
#if defined(__CUDACC__)
#define MFNET_RNG_HD __host__ __device__ __forceinline__
#else
#define MFNET_RNG_HD inline
#endif

namespace mfnet_ext {
namespace philox {

struct Counter {  // 4 x 32 bits; also the type of an output block
  uint32_t x, y, z, w;
};

struct Key {  // 2 x 32 bits
  uint32_t x, y;
};

// Constants of Philox4x32 (Random123: PHILOX_M4x32_0/1, PHILOX_W32_0/1).
constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kW1 = 0xBB67AE85u;  // sqrt(3) - 1

// High 32 bits of the 64-bit product a * b.
MFNET_RNG_HD uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

MFNET_RNG_HD Counter single_round(Counter c, Key k) {
  const uint32_t hi0 = mulhi(kM0, c.x);
  const uint32_t lo0 = kM0 * c.x;
  const uint32_t hi1 = mulhi(kM1, c.z);
  const uint32_t lo1 = kM1 * c.z;
  return Counter{hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0};
}

MFNET_RNG_HD Key bump(Key k) { return Key{k.x + kW0, k.y + kW1}; }

// Philox4x32 with 10 rounds: round with the key, then (bump the key, round) nine times.
MFNET_RNG_HD Counter philox4x32_10(Counter c, Key k) {
  c = single_round(c, k);
  k = bump(k); c = single_round(c, k);
  k = bump(k); c = single_round(c, k);
  k = bump(k); c = single_round(c, k);
  k = bump(k); c = single_round(c, k);
  k = bump(k); c = single_round(c, k);
  k = bump(k); c = single_round(c, k);
  k = bump(k); c = single_round(c, k);
  k = bump(k); c = single_round(c, k);
  k = bump(k); c = single_round(c, k);
  return c;
}

MFNET_RNG_HD uint32_t lo32(uint64_t v) { return static_cast<uint32_t>(v); }
MFNET_RNG_HD uint32_t hi32(uint64_t v) { return static_cast<uint32_t>(v >> 32); }

// Uniform float32 in the OPEN interval (0, 1) from 23 random bits: (2k + 1) * 2^-24 with
// k = x >> 9, i.e. the midpoints of 2^23 equal cells. Every step is exact in float32 (an odd
// integer < 2^24, then a power-of-two scale), so host and device agree bit for bit; the extremes
// are 2^-24 and 1 - 2^-24, never 0 or 1, so log(u) and log(-log(u)) are finite.
MFNET_RNG_HD float uniform_open01(uint32_t x) {
  const uint32_t odd = ((x >> 9) << 1) | 1u;  // 2k + 1 < 2^24
  return static_cast<float>(odd) * 5.9604644775390625e-08f;  // * 2^-24
}

}  // namespace philox
}  // namespace mfnet_ext
