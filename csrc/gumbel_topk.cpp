// CPU kernel of addp::gumbel_topk_unmask (definition: addp.ops.gumbel_topk_unmask_reference).
//
// Phase 1, per position (b, l) with mask True (reliable positions are copied through):
//   sampled = argmax_k(score_k + G(u1_k)), score = logits, or -inf where keep is False
//   conf    = log(exp(x_sampled - max x) / sum_k exp(x_k - max x)) + float(tau * G64(u2))
// with G(u) = -log(-log(max(u, tiny))). The row is streamed once for the Gumbel-max (an
// online per-lane argmax that keeps the first index of the maximum, like torch.argmax) and
// once for the softmax denominator. Reliable positions get conf = +inf.
// Phase 2, per batch row: the mask_len (clamped to [0, L]) smallest confidences by the key
// (conf, index) -- ties go to the lower index, NaN sorts after +inf -- via std::nth_element.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "gumbel_topk.h"
#include "simd.h"

namespace addp {
namespace {

using namespace simd;

struct RowResult {
  int64_t id;
  float conf_logp;  // log p(id) under softmax(x)
};

// x, u: K floats; keep: K bools or null.
template <class V, class VI>
ADDP_SIMD_INLINE RowResult sample_row(const float* x, const float* u, const bool* keep, int64_t K) {
  constexpr int W = lanes<V>();
  VI iota;
  for (int i = 0; i < W; ++i) iota[i] = i;
  V best = splat<V>(-kInf), xmax = splat<V>(-kInf);
  VI arg = VI{};
  // Lambdas do not inherit the caller's target ISA: always_inline puts their vector code
  // into the caller, which is compiled for it.
  auto step = [&](V xv, V uv, VI kidx, VI kv) ADDP_SIMD_INLINE_LAMBDA {
    V s = select<V, VI>(kv, xv + gumbel<V, VI>(uv), splat<V>(-kInf));
    VI upd = s > best;  // strict: each lane keeps its first maximum
    best = select<V, VI>(upd, s, best);
    arg = (upd & kidx) | (~upd & arg);
    xmax = xv > xmax ? xv : xmax;
  };
  const int64_t Kv = K / W * W;
  VI all = VI{} - 1;
  for (int64_t k = 0; k < Kv; k += W) {
    VI kv = all;
    if (keep)
      for (int i = 0; i < W; ++i) kv[i] = keep[k + i] ? -1 : 0;
    step(loadu<V>(x + k), loadu<V>(u + k), iota + (int32_t)k, kv);
  }
  if (Kv < K) {  // tail padded with x = -inf (never chosen, adds 0 to the sum)
    alignas(64) float xt[16], ut[16];
    VI kv = VI{};
    for (int i = 0; i < W; ++i) {
      const bool in = Kv + i < K;
      xt[i] = in ? x[Kv + i] : -kInf;
      ut[i] = in ? u[Kv + i] : 0.5f;
      kv[i] = in && (!keep || keep[Kv + i]) ? -1 : 0;
    }
    step(loadu<V>(xt), loadu<V>(ut), iota + (int32_t)Kv, kv);
  }
  float bmax = hmax(best);
  int64_t id = -1;
  for (int i = 0; i < W; ++i)
    if (best[i] == bmax && (id < 0 || arg[i] < id)) id = arg[i];
  if (!(bmax > -kInf)) id = 0;  // nothing finite (torch.argmax gives 0 for an all -inf row)

  const float mx = hmax(xmax);
  V sum = V{};
  for (int64_t k = 0; k < Kv; k += W) sum += exp_nonpos<V, VI>(loadu<V>(x + k) - mx);
  float s = hsum(sum);
  for (int64_t k = Kv; k < K; ++k) s += std::exp(x[k] - mx);
  const float p = std::isinf(mx) && mx < 0 ? std::nanf("") : std::exp(x[id] - mx) / s;
  return {id, std::log(p)};
}

struct Args {
  const char* logits;  // element pointer of logits[0, 0, 0]
  at::ScalarType dtype;
  int64_t s0, s1, s2;  // logits strides (elements)
  const float* u1;
  const double* u2;
  const int64_t* ids;
  const bool* mask;
  const bool* keep;  // (B, L, K) contiguous or null
  int64_t B, L, K;
  double tau;
  int64_t* new_ids;
  float* conf;
};

template <class V, class VI>
ADDP_SIMD_INLINE void sample_rows(const Args& a, int64_t begin, int64_t end) {
  std::vector<float> buf(a.K);
  for (int64_t r = begin; r < end; ++r) {
    if (!a.mask[r]) {
      a.new_ids[r] = a.ids[r];
      a.conf[r] = kInf;
      continue;
    }
    const int64_t b = r / a.L, l = r % a.L;
    const int64_t off = b * a.s0 + l * a.s1;
    const float* x;
    if (a.dtype == at::kFloat && a.s2 == 1) {
      x = reinterpret_cast<const float*>(a.logits) + off;
    } else {
      switch (a.dtype) {
        case at::kFloat: to_float(reinterpret_cast<const float*>(a.logits) + off, a.s2, a.K, buf.data()); break;
        case at::kBFloat16: to_float(reinterpret_cast<const c10::BFloat16*>(a.logits) + off, a.s2, a.K, buf.data()); break;
        default: to_float(reinterpret_cast<const c10::Half*>(a.logits) + off, a.s2, a.K, buf.data()); break;
      }
      x = buf.data();
    }
    RowResult res = sample_row<V, VI>(x, a.u1 + r * a.K, a.keep ? a.keep + r * a.K : nullptr, a.K);
    const double u2 = std::max(a.u2[r], std::numeric_limits<double>::min());
    const float choice = static_cast<float>(a.tau * -std::log(-std::log(u2)));
    a.new_ids[r] = res.id;
    a.conf[r] = res.conf_logp + choice;
  }
}

#ifdef ADDP_SIMD_X86
__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma")))
void sample_avx512(const Args& a, int64_t b, int64_t e) { sample_rows<vf16, vi16>(a, b, e); }
__attribute__((target("avx2,fma")))
void sample_avx2(const Args& a, int64_t b, int64_t e) { sample_rows<vf8, vi8>(a, b, e); }
#endif
void sample_generic(const Args& a, int64_t b, int64_t e) { sample_rows<vf4, vi4>(a, b, e); }

// out[0:L] = True at the n smallest conf[0:L] by (conf, index); NaN after +inf.
void lowest_n(const float* conf, int64_t L, int64_t n, bool* out, std::vector<int64_t>& idx) {
  std::fill(out, out + L, false);
  n = std::clamp<int64_t>(n, 0, L);
  if (n == 0) return;
  if (n == L) {
    std::fill(out, out + L, true);
    return;
  }
  idx.resize(L);
  std::iota(idx.begin(), idx.end(), 0);
  auto less = [conf](int64_t i, int64_t j) {
    const float a = conf[i], b = conf[j];
    const bool na = std::isnan(a), nb = std::isnan(b);
    if (na != nb) return nb;
    if (!na && a != b) return a < b;
    return i < j;
  };
  std::nth_element(idx.begin(), idx.begin() + (n - 1), idx.end(), less);
  for (int64_t i = 0; i < n; ++i) out[idx[i]] = true;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gumbel_topk_unmask_cpu(
    const at::Tensor& logits, const at::Tensor& u1, const at::Tensor& u2, const at::Tensor& ids,
    const at::Tensor& mask, const at::Tensor& mask_len, double tau, const std::optional<at::Tensor>& keep) {
  const char* op = "gumbel_topk_unmask: ";
  check_gumbel_topk_inputs(op, logits, u1, u2, ids, mask, mask_len, keep);
  const auto st = logits.scalar_type();
  const int64_t B = logits.size(0), L = logits.size(1), K = logits.size(2);
  at::Tensor keep_c = keep.has_value() ? keep->contiguous() : at::Tensor();
  at::Tensor u1_c = u1.contiguous(), u2_c = u2.contiguous(), ids_c = ids.contiguous(), mask_c = mask.contiguous();
  at::Tensor new_ids = at::empty({B, L}, ids.options());
  at::Tensor new_mask = at::empty({B, L}, mask.options());
  at::Tensor conf = at::empty({B, L}, logits.options().dtype(at::kFloat));
  if (B * L == 0) return {new_ids, new_mask};

  Args a;
  a.logits = static_cast<const char*>(logits.const_data_ptr()) + 0;
  a.dtype = st;
  a.s0 = logits.stride(0); a.s1 = logits.stride(1); a.s2 = logits.stride(2);
  a.u1 = u1_c.const_data_ptr<float>();
  a.u2 = u2_c.const_data_ptr<double>();
  a.ids = ids_c.const_data_ptr<int64_t>();
  a.mask = mask_c.const_data_ptr<bool>();
  a.keep = keep_c.defined() ? keep_c.const_data_ptr<bool>() : nullptr;
  a.B = B; a.L = L; a.K = K; a.tau = tau;
  a.new_ids = new_ids.mutable_data_ptr<int64_t>();
  a.conf = conf.mutable_data_ptr<float>();

  void (*fn)(const Args&, int64_t, int64_t) = sample_generic;
#ifdef ADDP_SIMD_X86
  switch (cpu_isa()) {
    case Isa::avx512: fn = sample_avx512; break;
    case Isa::avx2: fn = sample_avx2; break;
    default: break;
  }
#endif
  at::parallel_for(0, B * L, std::max<int64_t>(1, 8192 / K), [&](int64_t b, int64_t e) { fn(a, b, e); });

  const int64_t n = mask_len.item<int64_t>();  // a CPU tensor: no device sync
  const float* cf = a.conf;
  bool* out = new_mask.mutable_data_ptr<bool>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> idx;
    for (int64_t b = b0; b < b1; ++b) lowest_n(cf + b * L, L, n, out + b * L, idx);
  });
  return {new_ids, new_mask};
}

}  // namespace addp
