// CUDA kernel of addp::gumbel_topk_unmask_cuda (definition: addp.ops.gumbel_topk_unmask_reference;
// the CPU kernel csrc/gumbel_topk.cpp follows the same two phases).
//
// Phase 1, one block per position (b, l) with mask True (reliable positions copy their id and
// get conf = +inf): the block streams the row of K logits once for the Gumbel-max
//   sampled = argmax_k(score_k + G(u1_k)),  score = logits, or -inf where keep is False
// (ties to the lower index, like torch.argmax) and the row maximum, then once more for the
// softmax denominator:
//   conf = log(exp(x_sampled - max x) / sum_k exp(x_k - max x)) + float(tau * G64(u2)),
// G(u) = -log(-log(max(u, tiny))).
// Phase 2, one block per batch row: position i is kept unreliable when fewer than mask_len of
// the row's positions precede it in the order (conf, index) -- ties to the lower index, NaN
// after +inf. mask_len is read on the device (no host sync; CUDA-graph safe). The rank count
// is O(L^2) per row, from shared memory: at L = 256 that is 64K comparisons per block, far
// cheaper than a sort, and the same order as the CPU's nth_element.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../gumbel_topk.h"

#include <cfloat>
#include <cstdint>
#include <optional>
#include <tuple>

namespace addp {
namespace {

constexpr int kSampleThreads = 128;
constexpr int kSelectThreads = 256;

struct Best {
  float score;
  int32_t index;
};

// a is better than b: larger score, or the same score at a lower index.
__device__ __forceinline__ bool better(const Best& a, const Best& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

__device__ __forceinline__ Best warp_best(Best v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    Best o{__shfl_down_sync(0xffffffffu, v.score, offset), __shfl_down_sync(0xffffffffu, v.index, offset)};
    if (better(o, v)) v = o;
  }
  return v;
}

template <class Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  return v;
}

// Block-wide reduction of one float; every thread gets the result.
template <class Op>
__device__ float block_reduce(float v, Op op, float* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_reduce(v, op);
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float r = shared[0];
  for (int w = 1; w < warps; ++w) r = op(r, shared[w]);
  return r;
}

__device__ __forceinline__ float gumbel(float u) { return -logf(-logf(fmaxf(u, FLT_MIN))); }

template <class T>
__global__ void sample_kernel(const T* __restrict__ logits, int64_t s0, int64_t s1, int64_t s2,
                              const float* __restrict__ u1, const double* __restrict__ u2,
                              const int64_t* __restrict__ ids, const bool* __restrict__ mask,
                              const bool* __restrict__ keep, int64_t L, int64_t K, double tau,
                              int64_t* __restrict__ new_ids, float* __restrict__ conf) {
  __shared__ float shared[32];
  __shared__ int32_t shared_index[32];
  const int64_t r = blockIdx.x;  // position b * L + l
  if (!mask[r]) {
    if (threadIdx.x == 0) {
      new_ids[r] = ids[r];
      conf[r] = INFINITY;
    }
    return;
  }
  const T* x = logits + (r / L) * s0 + (r % L) * s1;
  const float* u = u1 + r * K;
  const bool* kp = keep ? keep + r * K : nullptr;

  Best best{-INFINITY, INT32_MAX};
  float xmax = -INFINITY;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const float xk = static_cast<float>(x[k * s2]);
    const float s = (kp && !kp[k]) ? -INFINITY : xk + gumbel(u[k]);
    const Best cand{s, static_cast<int32_t>(k)};
    if (better(cand, best)) best = cand;
    xmax = fmaxf(xmax, xk);
  }
  // block argmax: per-warp winners, then warp 0 reduces them
  best = warp_best(best);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (lane == 0) {
    shared[warp] = best.score;
    shared_index[warp] = best.index;
  }
  __syncthreads();
  if (warp == 0) {
    Best w = lane < warps ? Best{shared[lane], shared_index[lane]} : Best{-INFINITY, INT32_MAX};
    w = warp_best(w);
    if (lane == 0) {
      // nothing finite (all excluded or -inf + noise): torch.argmax of an all -inf row gives 0
      shared_index[0] = w.score > -INFINITY ? w.index : 0;
    }
  }
  __syncthreads();
  const int64_t id = shared_index[0];
  const float mx = block_reduce(xmax, [](float a, float b) { return fmaxf(a, b); }, shared);
  float sum = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) sum += expf(static_cast<float>(x[k * s2]) - mx);
  sum = block_reduce(sum, [](float a, float b) { return a + b; }, shared);
  if (threadIdx.x == 0) {
    const float p = (isinf(mx) && mx < 0) ? NAN : expf(static_cast<float>(x[id * s2]) - mx) / sum;
    const double g = -log(-log(fmax(u2[r], DBL_MIN)));
    new_ids[r] = id;
    conf[r] = logf(p) + static_cast<float>(tau * g);
  }
}

// a precedes b in the order (conf, index), NaN after +inf
__device__ __forceinline__ bool precedes(float a, int64_t i, float b, int64_t j) {
  const bool na = isnan(a), nb = isnan(b);
  if (na != nb) return nb;
  if (!na && a != b) return a < b;
  return i < j;
}

__global__ void select_kernel(const float* __restrict__ conf, int64_t L, const int64_t* __restrict__ mask_len,
                              bool use_shared, bool* __restrict__ new_mask) {
  extern __shared__ float row_shared[];
  const float* row = conf + blockIdx.x * L;
  if (use_shared) {
    for (int64_t i = threadIdx.x; i < L; i += blockDim.x) row_shared[i] = row[i];
    __syncthreads();
    row = row_shared;
  }
  const int64_t want = *mask_len;
  const int64_t n = want < 0 ? 0 : (want > L ? L : want);
  for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
    const float ci = row[i];
    int64_t rank = 0;
    for (int64_t j = 0; j < L && rank < n; ++j) rank += precedes(row[j], j, ci, i);
    new_mask[blockIdx.x * L + i] = rank < n;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gumbel_topk_unmask_cuda(
    const at::Tensor& logits, const at::Tensor& u1, const at::Tensor& u2, const at::Tensor& ids,
    const at::Tensor& mask, const at::Tensor& mask_len, double tau, const std::optional<at::Tensor>& keep) {
  const char* op = "gumbel_topk_unmask (cuda): ";
  TORCH_CHECK(logits.is_cuda(), op, "logits must be a CUDA tensor");
  check_gumbel_topk_inputs(op, logits, u1, u2, ids, mask, mask_len, keep);
  const auto st = logits.scalar_type();
  const int64_t B = logits.size(0), L = logits.size(1), K = logits.size(2);
  at::Tensor keep_c = keep.has_value() ? keep->contiguous() : at::Tensor();
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor u1_c = u1.contiguous(), u2_c = u2.contiguous(), ids_c = ids.contiguous(), mask_c = mask.contiguous();
  at::Tensor new_ids = at::empty({B, L}, ids.options());
  at::Tensor new_mask = at::empty({B, L}, mask.options());
  at::Tensor conf = at::empty({B, L}, logits.options().dtype(at::kFloat));
  if (B * L == 0) return {new_ids, new_mask};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "gumbel_topk_unmask_cuda", [&] {
    sample_kernel<scalar_t><<<B * L, kSampleThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1), logits.stride(2),
        u1_c.const_data_ptr<float>(), u2_c.const_data_ptr<double>(), ids_c.const_data_ptr<int64_t>(),
        mask_c.const_data_ptr<bool>(), keep_c.defined() ? keep_c.const_data_ptr<bool>() : nullptr, L, K, tau,
        new_ids.mutable_data_ptr<int64_t>(), conf.mutable_data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const bool use_shared = L * sizeof(float) <= 32 * 1024;
  select_kernel<<<B, kSelectThreads, use_shared ? L * sizeof(float) : 0, stream>>>(
      conf.const_data_ptr<float>(), L, mask_len.const_data_ptr<int64_t>(), use_shared,
      new_mask.mutable_data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {new_ids, new_mask};
}

// Its own op, addp::gumbel_topk_unmask_cuda (same schema): the CUDA key of addp::gumbel_topk_unmask
// holds the Triton kernel, which CI checks; this kernel runs only when asked for (backend="cuda").
TORCH_LIBRARY_IMPL(addp, CUDA, m) { m.impl("gumbel_topk_unmask_cuda", &gumbel_topk_unmask_cuda); }

}  // namespace addp
