// Input checks of addp::gumbel_topk_unmask shared by its CPU (gumbel_topk.cpp) and CUDA
// (cuda/gumbel_topk.cu) kernels. They guard memory safety only (shapes, dtypes and devices
// the kernels index by); the Python wrapper addp/ops/gumbel_topk.py checks the rest.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace addp {

inline void check_gumbel_topk_inputs(const char* op, const at::Tensor& logits, const at::Tensor& u1,
                                     const at::Tensor& u2, const at::Tensor& ids, const at::Tensor& mask,
                                     const at::Tensor& mask_len, const std::optional<at::Tensor>& keep) {
  TORCH_CHECK(logits.dim() == 3, op, "logits must be 3-D (B, L, K), got shape ", logits.sizes());
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op,
              "logits must be float32/bfloat16/float16, got ", st);
  const int64_t B = logits.size(0), L = logits.size(1), K = logits.size(2);
  TORCH_CHECK(K >= 1 && K < (int64_t{1} << 31), op, "need 1 <= K < 2^31, got K = ", K);
  TORCH_CHECK(u1.sizes() == logits.sizes() && u1.scalar_type() == at::kFloat, op,
              "u1 must be float32 of the logits' shape ", logits.sizes(), ", got ", u1.scalar_type(), " ", u1.sizes());
  TORCH_CHECK(u2.sizes() == at::IntArrayRef({B, L}) && u2.scalar_type() == at::kDouble, op,
              "u2 must be float64 of shape (B, L) = (", B, ", ", L, "), got ", u2.scalar_type(), " ", u2.sizes());
  TORCH_CHECK(ids.sizes() == u2.sizes() && ids.scalar_type() == at::kLong, op, "ids must be int64 (B, L), got ",
              ids.scalar_type(), " ", ids.sizes());
  TORCH_CHECK(mask.sizes() == u2.sizes() && mask.scalar_type() == at::kBool, op, "mask must be bool (B, L), got ",
              mask.scalar_type(), " ", mask.sizes());
  TORCH_CHECK(mask_len.numel() == 1 && mask_len.scalar_type() == at::kLong, op,
              "mask_len must be a one-element int64 tensor, got ", mask_len.scalar_type(), " ", mask_len.sizes());
  if (keep.has_value())
    TORCH_CHECK(keep->sizes() == logits.sizes() && keep->scalar_type() == at::kBool, op,
                "keep must be bool of the logits' shape");
  for (const at::Tensor* t : {&u1, &u2, &ids, &mask, &mask_len})
    TORCH_CHECK(t->device() == logits.device(), op, "every input must be on ", logits.device(), ", got ",
                t->device());
  if (keep.has_value()) TORCH_CHECK(keep->device() == logits.device(), op, "keep must be on ", logits.device());
}

}  // namespace addp
