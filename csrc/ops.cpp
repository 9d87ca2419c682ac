// CPU registrations of the addp ops. Their schemas, fakes and autograd are defined in Python
// (addp/ops/<op>.py, one module per op); `import addp.ops` defines them, then loads this
// library (addp._C), whose registrations below attach the CPU kernels to them.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace addp {

at::Tensor codebook_weighted_sum_cpu(const at::Tensor& logits, const at::Tensor& codebook,
                                     const std::optional<at::Tensor>& ids,
                                     const std::optional<at::Tensor>& mask, double temperature);
std::tuple<at::Tensor, at::Tensor> gumbel_topk_unmask_cpu(
    const at::Tensor& logits, const at::Tensor& u1, const at::Tensor& u2, const at::Tensor& ids,
    const at::Tensor& mask, const at::Tensor& mask_len, double tau, const std::optional<at::Tensor>& keep);
std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_target_cross_entropy_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mask, double smoothing);
at::Tensor soft_target_cross_entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                                 const at::Tensor& target, const at::Tensor& mask,
                                                 const at::Tensor& lse, const at::Tensor& qsum, double smoothing);
std::tuple<at::Tensor, at::Tensor> dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed);
at::Tensor dropout_backward_cpu(const at::Tensor& grad, const at::Tensor& keep, double p);
at::Tensor group_norm_silu_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, int64_t groups, double eps);
at::Tensor conv3x3_winograd_cpu(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual, bool upsample);

TORCH_LIBRARY_IMPL(addp, CPU, m) {
  m.impl("codebook_weighted_sum", &codebook_weighted_sum_cpu);
  m.impl("gumbel_topk_unmask", &gumbel_topk_unmask_cpu);
  m.impl("soft_target_cross_entropy", &soft_target_cross_entropy_cpu);
  m.impl("soft_target_cross_entropy_backward", &soft_target_cross_entropy_backward_cpu);
  m.impl("dropout", &dropout_cpu);
  m.impl("dropout_backward", &dropout_backward_cpu);
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("conv3x3_winograd", &conv3x3_winograd_cpu);
}

}  // namespace addp

// A Python extension module with no functions: importing it is what loads the ops.
// Only built as part of the Python package (CMake builds a plain library for torch.ops.load_library).
#ifdef TORCH_EXTENSION_NAME
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "addp compiled ops (registered in torch.ops.addp)", -1, nullptr};
  return PyModule_Create(&module);
}
#endif
