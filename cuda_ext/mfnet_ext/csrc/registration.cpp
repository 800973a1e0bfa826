// The operator schemas of the mfnet_ext library: THE one TORCH_LIBRARY(mfnet_ext, m) block.
//
// Every operator of the extension is declared here; each backend registers its kernels with
// TORCH_LIBRARY_IMPL(mfnet_ext, CPU | CUDA, m) in its own file, and the Python side
// (mfnet_ext/masked_pooling.py) adds the fake (meta) kernels and the autograd formulas with torch.library.
// To add an operator: declare its schema below, implement it in csrc/<op>.cu (+ <op>_cpu.cpp),
// register fake/autograd in Python. Every csrc/*.cpp and csrc/*.cu is compiled (the loader and
// setup.py glob them), so a new file needs no build change.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import mfnet_ext._C` (the ahead-of-time build) only needs to load this library: its static
// initialisers register the operators. The Python module itself is empty. (The just-in-time
// build is loaded with torch.ops.load_library and never calls this.)
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mfnet_ext, m) {
  // Masked global pooling (mfnet/ops/masked_pooling.py::masked_global_pool_reference):
  // features [B, C, h, w] (float32/float16/bfloat16/float64), masks [B, H, W] (bool, uint8 or real
  // {0, 1}) -> pooled [B, C] in the features' dtype. The mask is bilinearly resized
  // (align_corners=True) to h x w inside the kernel.
  m.def("masked_global_pool(Tensor features, Tensor masks) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Its gradient with respect to the features: grad_pooled [B, C] -> [B, C, h, w] in
  // grad_pooled's dtype, grad * weight / max(area, 1e-5). Linear in grad_pooled; its own
  // gradient is masked_global_pool (registered in masked_pooling.py), so double backward works too.
  m.def("masked_global_pool_backward(Tensor grad_pooled, Tensor masks, SymInt h, SymInt w) -> Tensor",
        {at::Tag::pt2_compliant_tag});

  // PML triplet sampler (mfnet/ops/triplet_sampling.py::sample_triplets_reference; kernels in
  // triplet_sampling.cu / triplet_sampling_cpu.cpp): pred, target int64 [B, h, w] ->
  // (anchor, positive, negative) int64 [B, T] and valid bool [B, T]. The random bits are
  // Philox4x32-10 of (seed, offset); spatial = the paper's spatial positive kernel, else uniform.
  m.def("sample_triplets(Tensor pred, Tensor target, int num_classes, int num_triplets, "
        "float tau, bool spatial, int seed, int offset) -> (Tensor, Tensor, Tensor, Tensor)");
  // Test hook of the sampler: Philox4x32-10 words of counter [n, 4] / key [n, 2] (int64) rows
  // -> (words int64 [n, 4], Gumbel variates float32 [n, 4]).
  m.def("philox_debug(Tensor counter, Tensor key) -> (Tensor, Tensor)");
}
