// Fused spatially weighted triplet sampler of PML (paper Sec. III-D), CUDA.
//
// One thread block per (image b, triplet t), blockIdx.x = b * T + t:
//   pass 1  every thread scans a strided share of the h * w pixels, keeps the best anchor
//           candidate (uniform 32-bit Philox key, packed with ~q); a block max-reduction
//           (warp shuffles, then warp 0 over the per-warp partials) gives the anchor to all
//           threads. An empty anchor pool ends the block: the row is invalid.
//   pass 2  n = pred[anchor]; one more scan keeps the best hard-positive candidate (spatial:
//           -d / tau' + Gumbel; random: uniform key) and the best hard-negative candidate
//           (uniform key); one block reduction of both.
//   write   thread 0 writes anchor / positive / negative (0 where invalid) and valid.
// The per-pixel math, the counters and the packing are in triplet_sampling.h, shared with the CPU
// twin (triplet_sampling_cpu.cpp): same seed and offset -> the same bits on both. Schemas are in
// registration.cpp; this file only registers CUDA kernels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <climits>
#include <tuple>

#include "triplet_sampling.h"

namespace mfnet_ext {
namespace {

using triplet::SamplerArgs;

constexpr unsigned kFullWarp = 0xffffffffu;

__device__ __forceinline__ uint64_t warp_max(uint64_t v) {
#pragma unroll
  for (int lane_mask = 16; lane_mask > 0; lane_mask >>= 1) {
    v = triplet::max_candidate(v, __shfl_xor_sync(kFullWarp, v, lane_mask));
  }
  return v;  // every lane holds the warp's maximum
}

// Block-wide maximum of two packed candidates; every thread receives both. All threads of the
// block must call it (it contains barriers). Calling it twice in a row is safe: the partials are
// read by warp 0 before the second barrier, and every thread has read `total` before it passes
// the first barrier of the next call, the only point after which `total` is written again.
template <int kThreads>
__device__ __forceinline__ void block_max2(uint64_t& a, uint64_t& b,
                                           uint64_t (*warp_partial)[2], uint64_t* total) {
  constexpr int kWarps = kThreads / 32;
  a = warp_max(a);
  b = warp_max(b);
  if constexpr (kWarps > 1) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) {
      warp_partial[warp][0] = a;
      warp_partial[warp][1] = b;
    }
    __syncthreads();
    if (warp == 0) {
      uint64_t wa = lane < kWarps ? warp_partial[lane][0] : 0;
      uint64_t wb = lane < kWarps ? warp_partial[lane][1] : 0;
      wa = warp_max(wa);
      wb = warp_max(wb);
      if (lane == 0) {
        total[0] = wa;
        total[1] = wb;
      }
    }
    __syncthreads();
    a = total[0];
    b = total[1];
  }
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    sample_triplets_kernel(const int64_t* __restrict__ pred, const int64_t* __restrict__ target,
                           const SamplerArgs args, int64_t* __restrict__ anchor_out,
                           int64_t* __restrict__ positive_out,
                           int64_t* __restrict__ negative_out, bool* __restrict__ valid_out) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, at most 1024 threads");
  __shared__ uint64_t warp_partial[kThreads / 32][2];
  __shared__ uint64_t total[2];

  const int64_t row = blockIdx.x;  // b * T + t
  const uint32_t b = static_cast<uint32_t>(row / args.triplets);
  const uint32_t t = static_cast<uint32_t>(row - static_cast<int64_t>(b) * args.triplets);
  const int64_t* __restrict__ p_img = pred + static_cast<int64_t>(b) * args.pixels;
  const int64_t* __restrict__ g_img = target + static_cast<int64_t>(b) * args.pixels;

  // pass 1: the anchor, uniform over the union of the anchor pools
  uint64_t best_anchor = 0;
  for (int64_t q = threadIdx.x; q < args.pixels; q += kThreads) {
    best_anchor = triplet::max_candidate(
        best_anchor, triplet::anchor_candidate(args.key, b, t, static_cast<uint32_t>(q), p_img[q],
                                               g_img[q], args.num_classes));
  }
  uint64_t unused = 0;
  block_max2<kThreads>(best_anchor, unused, warp_partial, total);
  if (best_anchor == 0) {  // the same value in every thread: the whole block leaves
    if (threadIdx.x == 0) {
      anchor_out[row] = 0;
      positive_out[row] = 0;
      negative_out[row] = 0;
      valid_out[row] = false;
    }
    return;
  }
  const int64_t a = triplet::candidate_index(best_anchor);
  const int64_t n = p_img[a];  // the anchor's class
  const uint32_t width = static_cast<uint32_t>(args.width);
  const uint32_t ay = static_cast<uint32_t>(a) / width;
  const uint32_t ax = static_cast<uint32_t>(a) - ay * width;

  // pass 2: hard positive (spatially weighted or uniform) and hard negative (uniform) of class n
  uint64_t best_positive = 0;
  uint64_t best_negative = 0;
  for (int64_t q = threadIdx.x; q < args.pixels; q += kThreads) {
    uint64_t pos, neg;
    triplet::pool_candidates(args.key, b, t, static_cast<uint32_t>(q), p_img[q], g_img[q], n, ay,
                             ax, width, args.spatial, args.neg_inv_tau, pos, neg);
    best_positive = triplet::max_candidate(best_positive, pos);
    best_negative = triplet::max_candidate(best_negative, neg);
  }
  block_max2<kThreads>(best_positive, best_negative, warp_partial, total);

  if (threadIdx.x == 0) {
    const bool ok = best_positive != 0 && best_negative != 0;
    anchor_out[row] = ok ? a : 0;
    positive_out[row] = ok ? triplet::candidate_index(best_positive) : 0;
    negative_out[row] = ok ? triplet::candidate_index(best_negative) : 0;
    valid_out[row] = ok;
  }
}

template <int kThreads>
void launch_sample_triplets(const at::Tensor& pred, const at::Tensor& target,
                            const SamplerArgs& args, at::Tensor& anchor, at::Tensor& positive,
                            at::Tensor& negative, at::Tensor& valid, cudaStream_t stream) {
  const int64_t rows = args.batch * args.triplets;
  sample_triplets_kernel<kThreads><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      pred.const_data_ptr<int64_t>(), target.const_data_ptr<int64_t>(), args,
      anchor.mutable_data_ptr<int64_t>(), positive.mutable_data_ptr<int64_t>(),
      negative.mutable_data_ptr<int64_t>(), valid.mutable_data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_triplets_cuda(
    const at::Tensor& pred_in, const at::Tensor& target_in, int64_t num_classes,
    int64_t num_triplets, double tau, bool spatial, int64_t seed, int64_t offset) {
  const SamplerArgs args = triplet::check_sampler_args(pred_in, target_in, num_classes,
                                                       num_triplets, tau, spatial, seed, offset);
  TORCH_CHECK(pred_in.is_cuda(), "mfnet_ext::sample_triplets (CUDA): inputs on ",
              pred_in.device());
  const int64_t rows = args.batch * args.triplets;
  TORCH_CHECK(rows <= static_cast<int64_t>(INT_MAX), "mfnet_ext::sample_triplets: B * T = ", rows,
              " exceeds the grid limit 2^31 - 1");
  const c10::cuda::CUDAGuard device_guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const auto index_options = pred.options().dtype(at::kLong);
  at::Tensor anchor = at::empty({args.batch, args.triplets}, index_options);
  at::Tensor positive = at::empty({args.batch, args.triplets}, index_options);
  at::Tensor negative = at::empty({args.batch, args.triplets}, index_options);
  at::Tensor valid = at::empty({args.batch, args.triplets}, pred.options().dtype(at::kBool));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(pred.device().index()).stream();
  // enough threads for a few pixels each; small maps do not pay for idle warps
  if (args.pixels <= 128) {
    launch_sample_triplets<128>(pred, target, args, anchor, positive, negative, valid, stream);
  } else if (args.pixels <= 1024) {
    launch_sample_triplets<256>(pred, target, args, anchor, positive, negative, valid, stream);
  } else {
    launch_sample_triplets<1024>(pred, target, args, anchor, positive, negative, valid, stream);
  }
  return {anchor, positive, negative, valid};
}

// Test hook: Philox4x32-10 words of each (counter, key) row and the Gumbel variate of each word.
__global__ void philox_debug_kernel(const int64_t* __restrict__ counter,
                                    const int64_t* __restrict__ key, int64_t n,
                                    int64_t* __restrict__ words, float* __restrict__ gumbels) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const philox::Counter r = philox::philox4x32_10(
        philox::Counter{static_cast<uint32_t>(counter[4 * i]),
                        static_cast<uint32_t>(counter[4 * i + 1]),
                        static_cast<uint32_t>(counter[4 * i + 2]),
                        static_cast<uint32_t>(counter[4 * i + 3])},
        philox::Key{static_cast<uint32_t>(key[2 * i]), static_cast<uint32_t>(key[2 * i + 1])});
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      words[4 * i + j] = static_cast<int64_t>(w[j]);
      gumbels[4 * i + j] = triplet::gumbel(w[j]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> philox_debug_cuda(const at::Tensor& counter_in,
                                                     const at::Tensor& key_in) {
  triplet::check_philox_debug_args(counter_in, key_in);
  const c10::cuda::CUDAGuard device_guard(counter_in.device());
  const at::Tensor counter = counter_in.contiguous();
  const at::Tensor key = key_in.contiguous();
  const int64_t n = counter.size(0);
  at::Tensor words = at::empty({n, 4}, counter.options());
  at::Tensor gumbels = at::empty({n, 4}, counter.options().dtype(at::kFloat));
  if (n > 0) {
    constexpr int kThreads = 256;
    const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 4096);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(counter.device().index()).stream();
    philox_debug_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        counter.const_data_ptr<int64_t>(), key.const_data_ptr<int64_t>(), n,
        words.mutable_data_ptr<int64_t>(), gumbels.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {words, gumbels};
}

}  // namespace
}  // namespace mfnet_ext

TORCH_LIBRARY_IMPL(mfnet_ext, CUDA, m) {
  m.impl("sample_triplets", &mfnet_ext::sample_triplets_cuda);
  m.impl("philox_debug", &mfnet_ext::philox_debug_cuda);
}
