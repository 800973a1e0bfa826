// Masked global pooling: the per-element math shared by the CUDA kernels (masked_pooling.cu) and
// the CPU kernels (masked_pooling_cpu.cpp), plus the host-side input checks both use.
//
// The specification is mfnet/ops/masked_pooling.py::masked_global_pool_reference:
//   weights = F.interpolate(masks[:, None].float(), (h, w), mode="bilinear", align_corners=True)
//   pooled[b, c] = sum_p features[b, c, p] * weights[b, p] / max(sum_p weights[b, p], 1e-5)
// The resized mask is never stored: every kernel recomputes the weight of a feature pixel from
// the four mask samples around its source position (resized_mask_weight below), in the float32
// arithmetic of ATen's upsample_bilinear2d (area_pixel_compute_scale and
// area_pixel_compute_source_index with align_corners=True; lambdas clamped to [0, 1] as in
// ATen's CPU kernel). The functions are __host__ __device__ under nvcc and plain inline under the
// host compiler, so the CPU build (which CI runs) exercises the same formulas as the GPU kernels.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MFNET_HD __host__ __device__ __forceinline__
#else
#define MFNET_HD inline
#endif

// float32 multiply / add without contraction into fused multiply-adds, so that the weights are the
// same bits on the GPU (where nvcc would otherwise contract a * b + c) and on the CPU.
#ifdef __CUDA_ARCH__
#define MFNET_FMUL(a, b) __fmul_rn((a), (b))
#define MFNET_FADD(a, b) __fadd_rn((a), (b))
#else
#define MFNET_FMUL(a, b) ((a) * (b))
#define MFNET_FADD(a, b) ((a) + (b))
#endif

namespace mfnet_ext {

// Denominator floor (mfnet.ops.masked_pooling.EMPTY_MASK_EPS): an empty mask pools to zeros.
constexpr float kEmptyMaskEps = 1e-5f;

// align_corners=True scale from an output index to an input coordinate: (in - 1) / (out - 1),
// 0 for a single output pixel. As ATen: static_cast<float>(in - 1) / (out - 1) in float32.
MFNET_HD float align_corners_scale(int64_t in_size, int64_t out_size) {
  return out_size > 1 ? static_cast<float>(in_size - 1) / static_cast<float>(out_size - 1) : 0.f;
}

// The two input taps of one output index along one axis and their weights (l0 + l1 = 1).
struct LinearTap {
  int i0;    // lower input index
  int i1;    // upper input index (== i0 on the last input pixel)
  float l0;  // weight of i0
  float l1;  // weight of i1
};

// ATen: src = scale * dst (float32); i0 = min(floor(src), in - 1); lambda = clamp(src - i0, 0, 1).
MFNET_HD LinearTap linear_tap(int dst, float scale, int in_size) {
  const float src = MFNET_FMUL(scale, static_cast<float>(dst));
  int i0 = static_cast<int>(floorf(src));  // src >= 0
  i0 = i0 < in_size - 1 ? i0 : in_size - 1;
  float lambda = src - static_cast<float>(i0);
  lambda = lambda < 0.f ? 0.f : (lambda > 1.f ? 1.f : lambda);
  LinearTap tap;
  tap.i0 = i0;
  tap.i1 = i0 < in_size - 1 ? i0 + 1 : i0;
  tap.l1 = lambda;
  tap.l0 = 1.f - lambda;
  return tap;
}

// Everything a kernel needs to evaluate the resized mask of one image.
struct ResizeGeometry {
  int h, w;       // feature (output) size
  int H, W;       // mask (input) size
  float scale_y;  // align_corners_scale(H, h)
  float scale_x;  // align_corners_scale(W, w)
};

inline ResizeGeometry make_resize_geometry(int64_t h, int64_t w, int64_t H, int64_t W) {
  ResizeGeometry g;
  g.h = static_cast<int>(h);
  g.w = static_cast<int>(w);
  g.H = static_cast<int>(H);
  g.W = static_cast<int>(W);
  g.scale_y = align_corners_scale(H, h);
  g.scale_x = align_corners_scale(W, w);
  return g;
}

// Weight of feature pixel p = i * w + j: the bilinear (align_corners=True) resize of one image's
// mask [H * W] evaluated at (i, j). mask_t is uint8_t (bool / uint8 masks read as they are) or
// float. Same order of operations as ATen: wy0 * (wx0 * m00 + wx1 * m01) + wy1 * (...).
template <typename mask_t>
MFNET_HD float resized_mask_weight(const mask_t* mask, const ResizeGeometry& g, int p) {
  const int i = p / g.w;
  const int j = p - i * g.w;
  const LinearTap ty = linear_tap(i, g.scale_y, g.H);
  const LinearTap tx = linear_tap(j, g.scale_x, g.W);
  const mask_t* row0 = mask + static_cast<int64_t>(ty.i0) * g.W;
  const mask_t* row1 = mask + static_cast<int64_t>(ty.i1) * g.W;
  const float m00 = static_cast<float>(row0[tx.i0]);
  const float m01 = static_cast<float>(row0[tx.i1]);
  const float m10 = static_cast<float>(row1[tx.i0]);
  const float m11 = static_cast<float>(row1[tx.i1]);
  const float top = MFNET_FADD(MFNET_FMUL(tx.l0, m00), MFNET_FMUL(tx.l1, m01));
  const float bottom = MFNET_FADD(MFNET_FMUL(tx.l0, m10), MFNET_FMUL(tx.l1, m11));
  return MFNET_FADD(MFNET_FMUL(ty.l0, top), MFNET_FMUL(ty.l1, bottom));
}

// Pooling denominator from the area (sum of weights) in the accumulation type.
template <typename acc_t>
MFNET_HD acc_t pool_denominator(acc_t area) {
  const acc_t eps = static_cast<acc_t>(kEmptyMaskEps);
  return area > eps ? area : eps;
}

}  // namespace mfnet_ext

// ------------------------------------------------------------------------------ host-side API
// (declared in both nvcc passes: the device pass parses the host functions of a .cu file too)
#include <ATen/core/Tensor.h>

namespace mfnet_ext {

// Validated shapes of a pooling call. Defined in masked_pooling_cpu.cpp, used by both backends.
struct PoolShapes {
  int64_t B, C, h, w, H, W;
};

// TORCH_CHECKs of masked_global_pool(features [B, C, h, w], masks [B, H, W]): ranks, equal B,
// floating features, real masks, one device, non-empty spatial sizes, 32-bit pixel indices.
PoolShapes check_pool_inputs(const at::Tensor& features, const at::Tensor& masks);

// TORCH_CHECKs of masked_global_pool_backward(grad_pooled [B, C], masks [B, H, W], h, w).
PoolShapes check_pool_backward_inputs(const at::Tensor& grad_pooled, const at::Tensor& masks,
                                      int64_t h, int64_t w);

// Masks as the kernels read them: bool / uint8 unchanged (read as uint8), any other real dtype
// converted to float32; contiguous. Returns the tensor and whether it is read as uint8.
at::Tensor kernel_masks(const at::Tensor& masks, bool* as_uint8);

}  // namespace mfnet_ext
