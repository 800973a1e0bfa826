// C++ CPU twin of the fused triplet sampler (triplet_sampling.cu): the same per-pixel math from
// triplet_sampling.h, the same Philox counters, max-reductions in a plain loop. It gives the
// CUDA kernel's bits for one (seed, offset), which is what the tests check on a GPU machine; on
// a CPU-only machine it is the testable stand-in for the kernel. Schemas: registration.cpp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "triplet_sampling.h"

namespace mfnet_ext {
namespace {

using triplet::SamplerArgs;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_triplets_cpu(
    const at::Tensor& pred_in, const at::Tensor& target_in, int64_t num_classes,
    int64_t num_triplets, double tau, bool spatial, int64_t seed, int64_t offset) {
  const SamplerArgs args = triplet::check_sampler_args(pred_in, target_in, num_classes,
                                                       num_triplets, tau, spatial, seed, offset);
  TORCH_CHECK(pred_in.device().is_cpu(), "mfnet_ext::sample_triplets (CPU): inputs on ",
              pred_in.device());
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const auto index_options = pred.options().dtype(at::kLong);
  at::Tensor anchor = at::empty({args.batch, args.triplets}, index_options);
  at::Tensor positive = at::empty({args.batch, args.triplets}, index_options);
  at::Tensor negative = at::empty({args.batch, args.triplets}, index_options);
  at::Tensor valid = at::empty({args.batch, args.triplets}, pred.options().dtype(at::kBool));

  const int64_t* pred_ptr = pred.const_data_ptr<int64_t>();
  const int64_t* target_ptr = target.const_data_ptr<int64_t>();
  int64_t* anchor_ptr = anchor.mutable_data_ptr<int64_t>();
  int64_t* positive_ptr = positive.mutable_data_ptr<int64_t>();
  int64_t* negative_ptr = negative.mutable_data_ptr<int64_t>();
  bool* valid_ptr = valid.mutable_data_ptr<bool>();

  const int64_t rows = args.batch * args.triplets;
  const int64_t grain = std::max<int64_t>(1, 32768 / args.pixels);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // one (image, triplet) = one CUDA block
      const uint32_t b = static_cast<uint32_t>(row / args.triplets);
      const uint32_t t = static_cast<uint32_t>(row % args.triplets);
      const int64_t* p_img = pred_ptr + static_cast<int64_t>(b) * args.pixels;
      const int64_t* g_img = target_ptr + static_cast<int64_t>(b) * args.pixels;

      uint64_t best_anchor = 0;
      for (int64_t q = 0; q < args.pixels; ++q) {
        best_anchor = triplet::max_candidate(
            best_anchor, triplet::anchor_candidate(args.key, b, t, static_cast<uint32_t>(q),
                                                   p_img[q], g_img[q], args.num_classes));
      }
      uint64_t best_positive = 0;
      uint64_t best_negative = 0;
      int64_t a = 0;
      if (best_anchor != 0) {
        a = triplet::candidate_index(best_anchor);
        const int64_t n = p_img[a];
        const uint32_t width = static_cast<uint32_t>(args.width);
        const uint32_t ay = static_cast<uint32_t>(a) / width;
        const uint32_t ax = static_cast<uint32_t>(a) - ay * width;
        for (int64_t q = 0; q < args.pixels; ++q) {
          uint64_t pos, neg;
          triplet::pool_candidates(args.key, b, t, static_cast<uint32_t>(q), p_img[q], g_img[q],
                                   n, ay, ax, width, args.spatial, args.neg_inv_tau, pos, neg);
          best_positive = triplet::max_candidate(best_positive, pos);
          best_negative = triplet::max_candidate(best_negative, neg);
        }
      }
      const bool ok = best_anchor != 0 && best_positive != 0 && best_negative != 0;
      anchor_ptr[row] = ok ? a : 0;
      positive_ptr[row] = ok ? triplet::candidate_index(best_positive) : 0;
      negative_ptr[row] = ok ? triplet::candidate_index(best_negative) : 0;
      valid_ptr[row] = ok;
    }
  });
  return {anchor, positive, negative, valid};
}

// Test hook: Philox4x32-10 words of each (counter, key) row and the Gumbel variate of each word.
std::tuple<at::Tensor, at::Tensor> philox_debug_cpu(const at::Tensor& counter_in,
                                                    const at::Tensor& key_in) {
  triplet::check_philox_debug_args(counter_in, key_in);
  const at::Tensor counter = counter_in.contiguous();
  const at::Tensor key = key_in.contiguous();
  const int64_t n = counter.size(0);
  at::Tensor words = at::empty({n, 4}, counter.options());
  at::Tensor gumbels = at::empty({n, 4}, counter.options().dtype(at::kFloat));
  const int64_t* c = counter.const_data_ptr<int64_t>();
  const int64_t* k = key.const_data_ptr<int64_t>();
  int64_t* out = words.mutable_data_ptr<int64_t>();
  float* g = gumbels.mutable_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const philox::Counter r = philox::philox4x32_10(
        philox::Counter{static_cast<uint32_t>(c[4 * i]), static_cast<uint32_t>(c[4 * i + 1]),
                        static_cast<uint32_t>(c[4 * i + 2]), static_cast<uint32_t>(c[4 * i + 3])},
        philox::Key{static_cast<uint32_t>(k[2 * i]), static_cast<uint32_t>(k[2 * i + 1])});
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
    for (int j = 0; j < 4; ++j) {
      out[4 * i + j] = static_cast<int64_t>(w[j]);
      g[4 * i + j] = triplet::gumbel(w[j]);
    }
  }
  return {words, gumbels};
}

}  // namespace
}  // namespace mfnet_ext

TORCH_LIBRARY_IMPL(mfnet_ext, CPU, m) {
  m.impl("sample_triplets", &mfnet_ext::sample_triplets_cpu);
  m.impl("philox_debug", &mfnet_ext::philox_debug_cpu);
}
