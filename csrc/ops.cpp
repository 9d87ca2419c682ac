// Schemas of the addp custom ops (defined once, here) and their CPU registrations.
// Python: `import addp._C` loads this library, which runs the registrations below;
// addp/ops.py adds the fake (meta) implementations and the backend dispatch.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

namespace addp {

at::Tensor codebook_weighted_sum_cpu(const at::Tensor& logits, const at::Tensor& codebook,
                                     const std::optional<at::Tensor>& ids,
                                     const std::optional<at::Tensor>& mask, double temperature);

TORCH_LIBRARY(addp, m) {
  m.def(
      "codebook_weighted_sum(Tensor logits, Tensor codebook, Tensor? ids, Tensor? mask, "
      "float temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(addp, CPU, m) {
  m.impl("codebook_weighted_sum", &codebook_weighted_sum_cpu);
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
