// CPU kernels of addp::soft_target_cross_entropy (forward) and its backward
// (definition: addp.ops.soft_target_cross_entropy_reference).
//
// Per position with mask True, x = logits row (V), q = target row (K <= V), eps = smoothing:
//   lse  = log sum_v exp(x_v)
//   loss = -(1 - eps) * sum_k q_k (x_k - lse) - eps * mean_v (x_v - lse)
// computed from one max pass and one pass that sums exp(x - max), (x - max) and q (x - max);
// the log-probabilities are never stored. The loss is the mean over masked positions
// (summed in double, in row order: deterministic). The forward also returns lse and
// sum_k q_k per position (0 where mask is False) for the backward:
//   dlogits_v = (p_v ((1 - eps) sum q + eps) - (1 - eps) q_v - eps / V) * grad / max(#masked, 1)
// (which is softmax - smoothed target when sum q = 1), 0 where mask is False.
// float32/bfloat16/float16 inputs accumulate in float32 (vectorised); float64 in float64
// (scalar; for gradcheck).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace addp {
namespace {

using namespace simd;

template <class A> struct Sums { A mx, sexp, sx, sqx, sq; };  // sums of exp(x-mx), x-mx, q(x-mx), q

template <class A>
Sums<A> row_sums_scalar(const A* x, int64_t V, const A* q, int64_t K) {
  Sums<A> s{-std::numeric_limits<A>::infinity(), 0, 0, 0, 0};
  for (int64_t v = 0; v < V; ++v) s.mx = std::max(s.mx, x[v]);
  for (int64_t v = 0; v < V; ++v) {
    s.sexp += std::exp(x[v] - s.mx);
    s.sx += x[v] - s.mx;
  }
  for (int64_t k = 0; k < K; ++k) {
    s.sqx += q[k] * (x[k] - s.mx);
    s.sq += q[k];
  }
  return s;
}

template <class V, class VI>
ADDP_SIMD_INLINE Sums<float> row_sums_vec(const float* x, int64_t n, const float* q, int64_t K) {
  constexpr int W = lanes<V>();
  const int64_t nv = n / W * W, kv = K / W * W;
  V m = splat<V>(-kInf);
  for (int64_t v = 0; v < nv; v += W) {
    V xv = loadu<V>(x + v);
    m = xv > m ? xv : m;
  }
  float mx = hmax(m);
  for (int64_t v = nv; v < n; ++v) mx = std::max(mx, x[v]);
  V se = V{}, sx = V{}, sqx = V{}, sq = V{};
  for (int64_t v = 0; v < nv; v += W) {
    V d = loadu<V>(x + v) - mx;
    se += exp_nonpos<V, VI>(d);
    sx += d;
  }
  for (int64_t k = 0; k < kv; k += W) {
    V qv = loadu<V>(q + k);
    sqx += qv * (loadu<V>(x + k) - mx);
    sq += qv;
  }
  Sums<float> s{mx, hsum(se), hsum(sx), hsum(sqx), hsum(sq)};
  for (int64_t v = nv; v < n; ++v) {
    s.sexp += std::exp(x[v] - mx);
    s.sx += x[v] - mx;
  }
  for (int64_t k = kv; k < K; ++k) {
    s.sqx += q[k] * (x[k] - mx);
    s.sq += q[k];
  }
  return s;
}

// d[v] = (exp(x_v - lse) c - a q_v [v < K] - b) * scale
template <class A>
void row_grad_scalar(const A* x, int64_t V, const A* q, int64_t K, A lse, A c, A a, A b, A scale, A* d) {
  for (int64_t v = 0; v < V; ++v) d[v] = (std::exp(x[v] - lse) * c - (v < K ? a * q[v] : A(0)) - b) * scale;
}

template <class V, class VI>
ADDP_SIMD_INLINE void row_grad_vec(const float* x, int64_t n, const float* q, int64_t K, float lse, float c,
                                   float a, float b, float scale, float* d) {
  constexpr int W = lanes<V>();
  int64_t v = 0;
  for (; v + W <= K; v += W)
    storeu(d + v, (exp_nonpos<V, VI>(loadu<V>(x + v) - lse) * c - a * loadu<V>(q + v) - b) * scale);
  for (; v < K; ++v) d[v] = (std::exp(x[v] - lse) * c - a * q[v] - b) * scale;
  for (; v + W <= n; v += W) storeu(d + v, (exp_nonpos<V, VI>(loadu<V>(x + v) - lse) * c - b) * scale);
  for (; v < n; ++v) d[v] = (std::exp(x[v] - lse) * c - b) * scale;
}

using SumsFn = Sums<float> (*)(const float*, int64_t, const float*, int64_t);
using GradFn = void (*)(const float*, int64_t, const float*, int64_t, float, float, float, float, float, float*);

#ifdef ADDP_SIMD_X86
__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma")))
Sums<float> sums_avx512(const float* x, int64_t n, const float* q, int64_t K) { return row_sums_vec<vf16, vi16>(x, n, q, K); }
__attribute__((target("avx2,fma")))
Sums<float> sums_avx2(const float* x, int64_t n, const float* q, int64_t K) { return row_sums_vec<vf8, vi8>(x, n, q, K); }
__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma")))
void grad_avx512(const float* x, int64_t n, const float* q, int64_t K, float l, float c, float a, float b, float s, float* d) {
  row_grad_vec<vf16, vi16>(x, n, q, K, l, c, a, b, s, d);
}
__attribute__((target("avx2,fma")))
void grad_avx2(const float* x, int64_t n, const float* q, int64_t K, float l, float c, float a, float b, float s, float* d) {
  row_grad_vec<vf8, vi8>(x, n, q, K, l, c, a, b, s, d);
}
#endif
Sums<float> sums_generic(const float* x, int64_t n, const float* q, int64_t K) { return row_sums_vec<vf4, vi4>(x, n, q, K); }
void grad_generic(const float* x, int64_t n, const float* q, int64_t K, float l, float c, float a, float b, float s, float* d) {
  row_grad_vec<vf4, vi4>(x, n, q, K, l, c, a, b, s, d);
}

std::pair<SumsFn, GradFn> pick_fns() {
#ifdef ADDP_SIMD_X86
  switch (cpu_isa()) {
    case Isa::avx512: return {sums_avx512, grad_avx512};
    case Isa::avx2: return {sums_avx2, grad_avx2};
    default: break;
  }
#endif
  return {sums_generic, grad_generic};
}

// Element pointer of row r of a 3-D tensor t viewed as (B, L, n).
template <class T> const T* row_ptr(const at::Tensor& t, int64_t r) {
  const int64_t L = t.size(1);
  return t.const_data_ptr<T>() + (r / L) * t.stride(0) + (r % L) * t.stride(1);
}

// Memory safety only (shapes and dtypes the kernels index by); addp/ops/soft_ce.py checks the rest.
void check_inputs(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mask) {
  const char* op = "soft_target_cross_entropy: ";
  TORCH_CHECK(logits.dim() == 3 && target.dim() == 3, op, "logits (B, L, V) and target (B, L, K) must be 3-D, got ",
              logits.sizes(), " and ", target.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()) && at::isFloatingType(target.scalar_type()), op,
              "logits and target must be floating point, got ", logits.scalar_type(), " and ", target.scalar_type());
  TORCH_CHECK(target.size(0) == logits.size(0) && target.size(1) == logits.size(1) && target.size(2) <= logits.size(2),
              op, "target ", target.sizes(), " must be (B, L, K <= V) for logits ", logits.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.sizes() == logits.sizes().slice(0, 2), op,
              "mask must be bool (B, L), got ", mask.scalar_type(), " ", mask.sizes());
  TORCH_CHECK(logits.size(2) >= 1, op, "logits' last dim V must be >= 1");
}

template <class T, class A>
void load(const at::Tensor& t, int64_t r, A* dst) {
  to_float(row_ptr<T>(t, r), t.stride(2), t.size(2), dst);
}

// Row r of t as acc_t values: in place when t already holds contiguous acc_t rows, else
// converted into buf.
template <class acc_t>
const acc_t* row_as(const at::Tensor& t, int64_t r, std::vector<acc_t>& buf) {
  if (t.scalar_type() == c10::CppTypeToScalarType<acc_t>::value && t.stride(2) == 1) return row_ptr<acc_t>(t, r);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "soft_ce_row",
                                  [&] { load<scalar_t>(t, r, buf.data()); });
  return buf.data();
}

// Runs body(r, x, q) for every masked row r in parallel, with x (V) and q (K) as acc_t rows.
template <class acc_t, class Body>
void for_masked_rows(const at::Tensor& logits, const at::Tensor& target, const bool* mask, Body body) {
  const int64_t N = logits.size(0) * logits.size(1), V = logits.size(2), K = target.size(2);
  at::parallel_for(0, N, std::max<int64_t>(1, 8192 / V), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> xb(V), qb(K);
    for (int64_t r = r0; r < r1; ++r) {
      if (mask[r]) body(r, row_as<acc_t>(logits, r, xb), row_as<acc_t>(target, r, qb));
    }
  });
}

template <class acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& logits, const at::Tensor& target,
                                                            const at::Tensor& mask, double eps) {
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2), K = target.size(2);
  const auto acc_dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  at::Tensor lse = at::zeros({B, L}, logits.options().dtype(acc_dtype));
  at::Tensor qsum = at::zeros({B, L}, logits.options().dtype(acc_dtype));
  std::vector<double> row_loss(B * L, 0.0);
  at::Tensor mask_c = mask.contiguous();
  const bool* m = mask_c.const_data_ptr<bool>();
  acc_t* lse_p = lse.mutable_data_ptr<acc_t>();
  acc_t* qs_p = qsum.mutable_data_ptr<acc_t>();
  const SumsFn sums_fn = pick_fns().first;
  for_masked_rows<acc_t>(logits, target, m, [&](int64_t r, const acc_t* x, const acc_t* q) {
    Sums<acc_t> s;
    if constexpr (std::is_same_v<acc_t, float>) s = sums_fn(x, V, q, K);
    else s = row_sums_scalar<acc_t>(x, V, q, K);
    const acc_t logs = std::log(s.sexp);
    lse_p[r] = s.mx + logs;
    qs_p[r] = s.sq;
    row_loss[r] = -(1 - eps) * (s.sqx - logs * s.sq) - eps * (s.sx / V - logs);
  });
  double total = 0;
  int64_t count = 0;
  for (int64_t r = 0; r < B * L; ++r) {
    total += row_loss[r];
    count += m[r];
  }
  at::Tensor loss = at::full({}, total / std::max<int64_t>(count, 1), logits.options().dtype(acc_dtype));
  return {loss, lse, qsum};
}

template <class acc_t, class out_t>
at::Tensor backward_impl(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                         const at::Tensor& mask, const at::Tensor& lse, const at::Tensor& qsum, double eps) {
  const int64_t V = logits.size(2), K = target.size(2);
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  at::Tensor mask_c = mask.contiguous();
  at::Tensor lse_c = lse.contiguous().to(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat);
  at::Tensor qs_c = qsum.contiguous().to(lse_c.scalar_type());
  const bool* m = mask_c.const_data_ptr<bool>();
  int64_t count = 0;
  for (int64_t r = 0; r < mask_c.numel(); ++r) count += m[r];
  const acc_t scale = static_cast<acc_t>(grad.item<double>() / std::max<int64_t>(count, 1));
  const acc_t a = static_cast<acc_t>(1 - eps), b = static_cast<acc_t>(eps / V);
  const acc_t* lse_p = lse_c.const_data_ptr<acc_t>();
  const acc_t* qs_p = qs_c.const_data_ptr<acc_t>();
  out_t* o = out.mutable_data_ptr<out_t>();
  const GradFn grad_fn = pick_fns().second;
  at::parallel_for(0, mask_c.numel(), 256, [&](int64_t r0, int64_t r1) {  // rows without loss: 0
    for (int64_t r = r0; r < r1; ++r)
      if (!m[r]) std::fill(o + r * V, o + (r + 1) * V, out_t(0));
  });
  for_masked_rows<acc_t>(logits, target, m, [&](int64_t r, const acc_t* x, const acc_t* q) {
    const acc_t c = a * qs_p[r] + static_cast<acc_t>(eps);
    thread_local std::vector<acc_t> d;
    acc_t* dst = reinterpret_cast<acc_t*>(o + r * V);
    if constexpr (!std::is_same_v<acc_t, out_t>) {
      d.resize(V);
      dst = d.data();
    }
    if constexpr (std::is_same_v<acc_t, float>) grad_fn(x, V, q, K, lse_p[r], c, a, b, scale, dst);
    else row_grad_scalar<acc_t>(x, V, q, K, lse_p[r], c, a, b, scale, dst);
    if constexpr (!std::is_same_v<acc_t, out_t>)
      for (int64_t v = 0; v < V; ++v) o[r * V + v] = static_cast<out_t>(dst[v]);
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_target_cross_entropy_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& mask, double smoothing) {
  check_inputs(logits, target, mask);
  if (logits.scalar_type() == at::kDouble) return forward_impl<double>(logits, target, mask, smoothing);
  return forward_impl<float>(logits, target, mask, smoothing);
}

at::Tensor soft_target_cross_entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                                 const at::Tensor& target, const at::Tensor& mask,
                                                 const at::Tensor& lse, const at::Tensor& qsum, double smoothing) {
  check_inputs(logits, target, mask);
  TORCH_CHECK(grad.numel() == 1, "soft_target_cross_entropy_backward: grad must have one element");
  TORCH_CHECK(lse.sizes() == mask.sizes() && qsum.sizes() == mask.sizes(),
              "soft_target_cross_entropy_backward: lse and qsum must be (B, L)");
  switch (logits.scalar_type()) {
    case at::kDouble: return backward_impl<double, double>(grad, logits, target, mask, lse, qsum, smoothing);
    case at::kFloat: return backward_impl<float, float>(grad, logits, target, mask, lse, qsum, smoothing);
    case at::kBFloat16: return backward_impl<float, c10::BFloat16>(grad, logits, target, mask, lse, qsum, smoothing);
    case at::kHalf: return backward_impl<float, c10::Half>(grad, logits, target, mask, lse, qsum, smoothing);
    default: TORCH_CHECK(false, "soft_target_cross_entropy_backward: unsupported logits dtype ", logits.scalar_type());
  }
}

}  // namespace addp
