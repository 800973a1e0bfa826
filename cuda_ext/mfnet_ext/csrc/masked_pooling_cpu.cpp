// Masked global pooling on the CPU: the C++ twin of the CUDA kernels (same per-element math from
// masked_pooling.h), registered for the CPU dispatch key. It makes the operator usable and
// testable (gradcheck, opcheck, torch.compile) on machines without a GPU, CI included.
//
// Parallel over images; within an image the resized mask weights are computed once into a
// per-thread scratch row of h * w floats, then every channel is reduced over the pixels in a
// fixed order (deterministic, independent of the thread count).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "masked_pooling.h"

namespace mfnet_ext {

namespace {

bool is_supported_feature_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
         dtype == at::kDouble;
}

void check_masks(const char* op, const at::Tensor& masks, int64_t batch) {
  TORCH_CHECK(masks.dim() == 3, op, ": masks must be [B, H, W] (image resolution), got shape ",
              masks.sizes());
  TORCH_CHECK(masks.size(0) == batch, op, ": masks must have the same B as the features (", batch,
              "), got shape ", masks.sizes());
  const at::ScalarType dtype = masks.scalar_type();
  TORCH_CHECK(!at::isComplexType(dtype) && !at::isFloat8Type(dtype), op,
              ": masks must be bool, uint8 or real numbers ({0, 1}), got ", dtype);
  TORCH_CHECK(masks.size(1) >= 1 && masks.size(2) >= 1, op,
              ": masks must have a non-empty H x W, got shape ", masks.sizes());
  TORCH_CHECK(masks.size(1) * masks.size(2) <= std::numeric_limits<int32_t>::max(), op,
              ": masks H * W must fit in 32 bits, got shape ", masks.sizes());
}

void check_feature_size(const char* op, int64_t h, int64_t w) {
  TORCH_CHECK(h >= 1 && w >= 1, op, ": the feature size h x w must be non-empty, got ", h, " x ",
              w);
  TORCH_CHECK(h * w <= std::numeric_limits<int32_t>::max(), op,
              ": the feature size h * w must fit in 32 bits, got ", h, " x ", w);
}

// Resized weights of one image into `weight` [h * w]; returns their sum in the order p = 0, 1, ...
template <typename acc_t, typename mask_t>
acc_t image_weights(const mask_t* mask, const ResizeGeometry& geometry, float* weight) {
  const int hw = geometry.h * geometry.w;
  acc_t area = 0;
  for (int p = 0; p < hw; ++p) {
    weight[p] = resized_mask_weight(mask, geometry, p);
    area += static_cast<acc_t>(weight[p]);
  }
  return area;
}

template <typename scalar_t, typename mask_t>
void pool_forward(const scalar_t* features, const mask_t* masks, scalar_t* out,
                  const PoolShapes& s, const ResizeGeometry& geometry) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t hw = s.h * s.w;
  const int64_t HW = s.H * s.W;
  at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weight(hw);
    for (int64_t b = begin; b < end; ++b) {
      const acc_t denominator =
          pool_denominator(image_weights<acc_t>(masks + b * HW, geometry, weight.data()));
      for (int64_t c = 0; c < s.C; ++c) {
        const scalar_t* f = features + (b * s.C + c) * hw;
        acc_t sum = 0;
        for (int64_t p = 0; p < hw; ++p) {
          sum += static_cast<acc_t>(f[p]) * static_cast<acc_t>(weight[p]);
        }
        out[b * s.C + c] = static_cast<scalar_t>(sum / denominator);
      }
    }
  });
}

template <typename scalar_t, typename mask_t>
void pool_backward(const scalar_t* grad_pooled, const mask_t* masks, scalar_t* grad_features,
                   const PoolShapes& s, const ResizeGeometry& geometry) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t hw = s.h * s.w;
  const int64_t HW = s.H * s.W;
  at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weight(hw);
    for (int64_t b = begin; b < end; ++b) {
      const acc_t denominator =
          pool_denominator(image_weights<acc_t>(masks + b * HW, geometry, weight.data()));
      for (int64_t c = 0; c < s.C; ++c) {
        // as the reference's autograd: (grad / area) * weight
        const acc_t scaled = static_cast<acc_t>(grad_pooled[b * s.C + c]) / denominator;
        scalar_t* g = grad_features + (b * s.C + c) * hw;
        for (int64_t p = 0; p < hw; ++p) {
          g[p] = static_cast<scalar_t>(scaled * static_cast<acc_t>(weight[p]));
        }
      }
    }
  });
}

}  // namespace

PoolShapes check_pool_inputs(const at::Tensor& features, const at::Tensor& masks) {
  constexpr const char* op = "mfnet_ext::masked_global_pool";
  TORCH_CHECK(features.dim() == 4, op, ": features must be [B, C, h, w], got shape ",
              features.sizes());
  TORCH_CHECK(is_supported_feature_dtype(features.scalar_type()), op,
              ": features must be float32, float16, bfloat16 or float64, got ",
              features.scalar_type());
  check_masks(op, masks, features.size(0));
  TORCH_CHECK(features.device() == masks.device(), op,
              ": features and masks must be on the same device, got ", features.device(), " and ",
              masks.device());
  check_feature_size(op, features.size(2), features.size(3));
  return PoolShapes{features.size(0), features.size(1), features.size(2),
                    features.size(3), masks.size(1),    masks.size(2)};
}

PoolShapes check_pool_backward_inputs(const at::Tensor& grad_pooled, const at::Tensor& masks,
                                      int64_t h, int64_t w) {
  constexpr const char* op = "mfnet_ext::masked_global_pool_backward";
  TORCH_CHECK(grad_pooled.dim() == 2, op, ": grad_pooled must be [B, C], got shape ",
              grad_pooled.sizes());
  TORCH_CHECK(is_supported_feature_dtype(grad_pooled.scalar_type()), op,
              ": grad_pooled must be float32, float16, bfloat16 or float64, got ",
              grad_pooled.scalar_type());
  check_masks(op, masks, grad_pooled.size(0));
  TORCH_CHECK(grad_pooled.device() == masks.device(), op,
              ": grad_pooled and masks must be on the same device, got ", grad_pooled.device(),
              " and ", masks.device());
  check_feature_size(op, h, w);
  return PoolShapes{grad_pooled.size(0), grad_pooled.size(1), h, w, masks.size(1), masks.size(2)};
}

at::Tensor kernel_masks(const at::Tensor& masks, bool* as_uint8) {
  const at::ScalarType dtype = masks.scalar_type();
  *as_uint8 = dtype == at::kBool || dtype == at::kByte;
  return (*as_uint8 ? masks : masks.to(at::kFloat)).contiguous();
}

namespace {

at::Tensor masked_global_pool_cpu(const at::Tensor& features, const at::Tensor& masks) {
  const PoolShapes s = check_pool_inputs(features, masks);
  TORCH_CHECK(features.device().is_cpu(), "mfnet_ext::masked_global_pool (CPU kernel): "
              "expected CPU tensors, got ", features.device());
  at::Tensor out = at::empty({s.B, s.C}, features.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor f = features.contiguous();
  bool as_uint8 = false;
  const at::Tensor m = kernel_masks(masks, &as_uint8);
  const ResizeGeometry geometry = make_resize_geometry(s.h, s.w, s.H, s.W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(),
                                  "masked_global_pool_cpu", [&] {
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    if (as_uint8) {
      pool_forward(fp, static_cast<const uint8_t*>(m.const_data_ptr()), out_ptr, s, geometry);
    } else {
      pool_forward(fp, m.const_data_ptr<float>(), out_ptr, s, geometry);
    }
  });
  return out;
}

at::Tensor masked_global_pool_backward_cpu(const at::Tensor& grad_pooled, const at::Tensor& masks,
                                           int64_t h, int64_t w) {
  const PoolShapes s = check_pool_backward_inputs(grad_pooled, masks, h, w);
  TORCH_CHECK(grad_pooled.device().is_cpu(), "mfnet_ext::masked_global_pool_backward (CPU "
              "kernel): expected CPU tensors, got ", grad_pooled.device());
  at::Tensor grad_features = at::empty({s.B, s.C, s.h, s.w}, grad_pooled.options());
  if (grad_features.numel() == 0) {
    return grad_features;
  }
  const at::Tensor g = grad_pooled.contiguous();
  bool as_uint8 = false;
  const at::Tensor m = kernel_masks(masks, &as_uint8);
  const ResizeGeometry geometry = make_resize_geometry(s.h, s.w, s.H, s.W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                  "masked_global_pool_backward_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = grad_features.mutable_data_ptr<scalar_t>();
    if (as_uint8) {
      pool_backward(gp, static_cast<const uint8_t*>(m.const_data_ptr()), out_ptr, s, geometry);
    } else {
      pool_backward(gp, m.const_data_ptr<float>(), out_ptr, s, geometry);
    }
  });
  return grad_features;
}

}  // namespace
}  // namespace mfnet_ext

TORCH_LIBRARY_IMPL(mfnet_ext, CPU, m) {
  m.impl("masked_global_pool", &mfnet_ext::masked_global_pool_cpu);
  m.impl("masked_global_pool_backward", &mfnet_ext::masked_global_pool_backward_cpu);
}
