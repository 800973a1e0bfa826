// Fused masked global pooling on the GPU, forward and backward, registered for the CUDA
// dispatch key. Specification: mfnet/ops/masked_pooling.py::masked_global_pool_reference.
//
// No resized mask is materialised: every kernel evaluates the bilinear (align_corners=True)
// weight of a feature pixel from the four mask samples around its source position
// (masked_pooling.h, shared with the CPU kernels); the mask of an image is a few hundred KB that
// stays in L2, so the only large traffic is one read of the features (forward) or one write of
// their gradient (backward).
//
// Kernels (all launched on the current CUDA stream of the inputs' device):
//  * mask_area_kernel: one block per image, area[b] = sum_p weight(b, p) (fixed-order block
//    reduction). Forward and backward use the same kernel, so they divide by the same bits.
//  * pool_forward_kernel: one block per (image, tile of kChannels channels). Threads stride over
//    the pixels (coalesced loads: a channel's h * w pixels are contiguous), compute the weight
//    once per pixel for all channels of the tile, and accumulate f * weight in the opmath type
//    (float32 for float32/float16/bfloat16, float64 for float64) in registers; then a warp-shuffle
//    + shared-memory reduction in a fixed order. No atomics: results are deterministic.
//  * pool_backward_kernel: one thread per (image, pixel, tile of kBackwardChannels channels):
//    grad_features[b, c, p] = grad_pooled[b, c] / max(area[b], eps) * weight(b, p), coalesced
//    stores along p.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "masked_pooling.h"

namespace mfnet_ext {
namespace {

constexpr int kThreads = 256;  // threads per block
constexpr int kWarps = kThreads / 32;
constexpr int kBackwardChannels = 16;  // channels written per backward thread

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

// area[b] = sum over the h * w feature pixels of the resized mask weight of image b.
template <typename acc_t, typename mask_t>
__global__ void __launch_bounds__(kThreads)
    mask_area_kernel(const mask_t* __restrict__ masks, acc_t* __restrict__ area,
                     const ResizeGeometry geometry) {
  const int64_t b = blockIdx.x;
  const mask_t* mask = masks + b * static_cast<int64_t>(geometry.H) * geometry.W;
  const int hw = geometry.h * geometry.w;
  acc_t sum = 0;
  for (int p = threadIdx.x; p < hw; p += kThreads) {
    sum += static_cast<acc_t>(resized_mask_weight(mask, geometry, p));
  }
  __shared__ acc_t partial[kWarps];
  sum = warp_sum(sum);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    partial[warp] = sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t total = 0;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) {
      total += partial[i];
    }
    area[b] = total;
  }
}

// out[b, c] = sum_p f[b, c, p] * weight(b, p) / max(area[b], eps) for the kChannels channels
// c0 .. c0 + kChannels - 1 of block (b, tile).
template <typename scalar_t, typename mask_t, int kChannels>
__global__ void __launch_bounds__(kThreads)
    pool_forward_kernel(const scalar_t* __restrict__ features, const mask_t* __restrict__ masks,
                        const at::opmath_type<scalar_t>* __restrict__ area,
                        scalar_t* __restrict__ out, const int64_t C, const int64_t channel_tiles,
                        const ResizeGeometry geometry) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.x / channel_tiles;
  const int64_t c0 = (blockIdx.x % channel_tiles) * kChannels;
  const int channels = static_cast<int>(C - c0 < kChannels ? C - c0 : kChannels);
  const int hw = geometry.h * geometry.w;
  const scalar_t* f = features + (b * C + c0) * hw;
  const mask_t* mask = masks + b * static_cast<int64_t>(geometry.H) * geometry.W;

  acc_t acc[kChannels];
#pragma unroll
  for (int k = 0; k < kChannels; ++k) {
    acc[k] = 0;
  }
  for (int p = threadIdx.x; p < hw; p += kThreads) {
    const acc_t weight = static_cast<acc_t>(resized_mask_weight(mask, geometry, p));
#pragma unroll
    for (int k = 0; k < kChannels; ++k) {
      if (k < channels) {
        acc[k] += static_cast<acc_t>(f[static_cast<int64_t>(k) * hw + p]) * weight;
      }
    }
  }

  __shared__ acc_t partial[kChannels][kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < kChannels; ++k) {
    const acc_t sum = warp_sum(acc[k]);
    if (lane == 0) {
      partial[k][warp] = sum;
    }
  }
  __syncthreads();
  if (threadIdx.x < channels) {
    acc_t sum = 0;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) {
      sum += partial[threadIdx.x][i];
    }
    out[b * C + c0 + threadIdx.x] = static_cast<scalar_t>(sum / pool_denominator(area[b]));
  }
}

// grad_features[b, c, p] = grad_pooled[b, c] / max(area[b], eps) * weight(b, p): block
// (b, channel tile, pixel block), one pixel per thread, kBackwardChannels channels per thread.
template <typename scalar_t, typename mask_t>
__global__ void __launch_bounds__(kThreads)
    pool_backward_kernel(const scalar_t* __restrict__ grad_pooled,
                         const mask_t* __restrict__ masks,
                         const at::opmath_type<scalar_t>* __restrict__ area,
                         scalar_t* __restrict__ grad_features, const int64_t C,
                         const int64_t channel_tiles, const int64_t pixel_blocks,
                         const ResizeGeometry geometry) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t index = blockIdx.x;
  const int64_t pixel_block = index % pixel_blocks;
  index /= pixel_blocks;
  const int64_t c0 = (index % channel_tiles) * kBackwardChannels;
  const int64_t b = index / channel_tiles;
  const int hw = geometry.h * geometry.w;
  const int p = static_cast<int>(pixel_block) * kThreads + static_cast<int>(threadIdx.x);
  if (p >= hw) {
    return;
  }
  const int channels =
      static_cast<int>(C - c0 < kBackwardChannels ? C - c0 : kBackwardChannels);
  const mask_t* mask = masks + b * static_cast<int64_t>(geometry.H) * geometry.W;
  const acc_t weight = static_cast<acc_t>(resized_mask_weight(mask, geometry, p));
  const acc_t denominator = pool_denominator(area[b]);
  const scalar_t* grad = grad_pooled + b * C + c0;
  scalar_t* out = grad_features + (b * C + c0) * hw + p;
#pragma unroll
  for (int k = 0; k < kBackwardChannels; ++k) {
    if (k < channels) {
      // as the reference's autograd: (grad / area) * weight
      out[static_cast<int64_t>(k) * hw] =
          static_cast<scalar_t>(static_cast<acc_t>(grad[k]) / denominator * weight);
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned int grid_size(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op,
              ": the input is too large for one launch (", blocks, " blocks)");
  return static_cast<unsigned int>(blocks);
}

int multiprocessor_count(c10::DeviceIndex device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

template <typename acc_t, typename mask_t>
void launch_area(const mask_t* masks, acc_t* area, int64_t B, const ResizeGeometry& geometry,
                 cudaStream_t stream) {
  mask_area_kernel<acc_t, mask_t>
      <<<grid_size(B, "mfnet_ext::masked_global_pool"), kThreads, 0, stream>>>(masks, area,
                                                                               geometry);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename mask_t, int kChannels>
void launch_forward_tiles(const scalar_t* features, const mask_t* masks,
                          const at::opmath_type<scalar_t>* area, scalar_t* out,
                          const PoolShapes& s, const ResizeGeometry& geometry,
                          cudaStream_t stream) {
  const int64_t tiles = ceil_div(s.C, kChannels);
  pool_forward_kernel<scalar_t, mask_t, kChannels>
      <<<grid_size(s.B * tiles, "mfnet_ext::masked_global_pool"), kThreads, 0, stream>>>(
          features, masks, area, out, s.C, tiles, geometry);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename mask_t>
void launch_forward(const scalar_t* features, const mask_t* masks,
                    at::opmath_type<scalar_t>* area, scalar_t* out, const PoolShapes& s,
                    const ResizeGeometry& geometry, c10::DeviceIndex device,
                    cudaStream_t stream) {
  launch_area(masks, area, s.B, geometry, stream);
  // 8 channels per block keep 8 independent loads in flight per thread; when that gives fewer
  // than two blocks per multiprocessor (small batches), 2 channels per block spread the work.
  if (s.B * ceil_div(s.C, 8) >= 2 * static_cast<int64_t>(multiprocessor_count(device))) {
    launch_forward_tiles<scalar_t, mask_t, 8>(features, masks, area, out, s, geometry, stream);
  } else {
    launch_forward_tiles<scalar_t, mask_t, 2>(features, masks, area, out, s, geometry, stream);
  }
}

template <typename scalar_t, typename mask_t>
void launch_backward(const scalar_t* grad_pooled, const mask_t* masks,
                     at::opmath_type<scalar_t>* area, scalar_t* grad_features,
                     const PoolShapes& s, const ResizeGeometry& geometry, cudaStream_t stream) {
  launch_area(masks, area, s.B, geometry, stream);
  const int64_t tiles = ceil_div(s.C, kBackwardChannels);
  const int64_t pixel_blocks = ceil_div(s.h * s.w, kThreads);
  pool_backward_kernel<scalar_t, mask_t>
      <<<grid_size(s.B * tiles * pixel_blocks, "mfnet_ext::masked_global_pool_backward"),
         kThreads, 0, stream>>>(grad_pooled, masks, area, grad_features, s.C, tiles,
                                pixel_blocks, geometry);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::ScalarType accumulation_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor masked_global_pool_cuda(const at::Tensor& features, const at::Tensor& masks) {
  const PoolShapes s = check_pool_inputs(features, masks);
  TORCH_CHECK(features.is_cuda(), "mfnet_ext::masked_global_pool (CUDA kernel): expected CUDA "
              "tensors, got ", features.device());
  const c10::cuda::CUDAGuard guard(features.device());
  at::Tensor out = at::empty({s.B, s.C}, features.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor f = features.contiguous();
  bool as_uint8 = false;
  const at::Tensor m = kernel_masks(masks, &as_uint8);
  at::Tensor area =
      at::empty({s.B}, features.options().dtype(accumulation_type(features.scalar_type())));
  const ResizeGeometry geometry = make_resize_geometry(s.h, s.w, s.H, s.W);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(features.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(),
                                  "masked_global_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* f_ptr = f.const_data_ptr<scalar_t>();
    acc_t* area_ptr = area.mutable_data_ptr<acc_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    if (as_uint8) {
      launch_forward(f_ptr, static_cast<const uint8_t*>(m.const_data_ptr()), area_ptr, out_ptr, s,
                     geometry, features.device().index(), stream);
    } else {
      launch_forward(f_ptr, m.const_data_ptr<float>(), area_ptr, out_ptr, s, geometry,
                     features.device().index(), stream);
    }
  });
  return out;
}

at::Tensor masked_global_pool_backward_cuda(const at::Tensor& grad_pooled,
                                            const at::Tensor& masks, int64_t h, int64_t w) {
  const PoolShapes s = check_pool_backward_inputs(grad_pooled, masks, h, w);
  TORCH_CHECK(grad_pooled.is_cuda(), "mfnet_ext::masked_global_pool_backward (CUDA kernel): "
              "expected CUDA tensors, got ", grad_pooled.device());
  const c10::cuda::CUDAGuard guard(grad_pooled.device());
  at::Tensor grad_features = at::empty({s.B, s.C, s.h, s.w}, grad_pooled.options());
  if (grad_features.numel() == 0) {
    return grad_features;
  }
  const at::Tensor g = grad_pooled.contiguous();
  bool as_uint8 = false;
  const at::Tensor m = kernel_masks(masks, &as_uint8);
  at::Tensor area =
      at::empty({s.B}, grad_pooled.options().dtype(accumulation_type(grad_pooled.scalar_type())));
  const ResizeGeometry geometry = make_resize_geometry(s.h, s.w, s.H, s.W);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad_pooled.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                  "masked_global_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    acc_t* area_ptr = area.mutable_data_ptr<acc_t>();
    scalar_t* out_ptr = grad_features.mutable_data_ptr<scalar_t>();
    if (as_uint8) {
      launch_backward(g_ptr, static_cast<const uint8_t*>(m.const_data_ptr()), area_ptr, out_ptr,
                      s, geometry, stream);
    } else {
      launch_backward(g_ptr, m.const_data_ptr<float>(), area_ptr, out_ptr, s, geometry, stream);
    }
  });
  return grad_features;
}

}  // namespace
}  // namespace mfnet_ext

TORCH_LIBRARY_IMPL(mfnet_ext, CUDA, m) {
  m.impl("masked_global_pool", &mfnet_ext::masked_global_pool_cuda);
  m.impl("masked_global_pool_backward", &mfnet_ext::masked_global_pool_backward_cuda);
}
