// CPU kernel of addp::codebook_weighted_sum:
//   out = softmax(logits[..., :K] / T) @ codebook, rows with mask False = codebook[ids].
//
// Rows are processed in tiles: the logits of up to RT unreliable rows are turned into
// unnormalised exp-weights (RT x K, fp32 scratch), multiplied by the codebook with a
// register-blocked micro-kernel (each codebook row is reused across the tile) and
// normalised once at the end. The B x L x K probabilities never exist.
//
// The hot loops use GCC/Clang vector extensions and are compiled three times (AVX-512,
// AVX2+FMA, baseline) via target attributes; the widest one the CPU supports is picked at
// run time (env ADDP_CPU_ISA=generic|avx2|avx512 caps the choice, for tests).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "simd.h"

namespace addp {
namespace {

#define ADDP_INLINE ADDP_SIMD_INLINE
using simd::exp_nonpos;
using simd::loadu;
using simd::storeu;
using simd::vf16;
using simd::vf4;
using simd::vf8;
using simd::vi16;
using simd::vi4;
using simd::vi8;

constexpr int64_t kPad = 16;  // K and D are padded to multiples of this (widest vector)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

ADDP_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }


// w[k] <- exp((x[k] - max(x)) / T) for k < K; x may alias w. w[K:round_up(K, W)] is set to 0.
// Returns the sum of the weights.
template <class V, class VI>
ADDP_INLINE float exp_weights(const float* x, float* w, int64_t K, float inv_t) {
  constexpr int W = sizeof(V) / sizeof(float);
  const int64_t Kv = K / W * W;
  V tail = V{} + kNegInf;  // the last K % W values, padded with -inf
  std::memcpy(&tail, x + Kv, (K - Kv) * sizeof(float));
  V m = tail;
  for (int64_t k = 0; k < Kv; k += W) {
    V v = loadu<V>(x + k);
    m = v > m ? v : m;
  }
  float mx = kNegInf;
  for (int i = 0; i < W; ++i) mx = std::max(mx, static_cast<float>(m[i]));
  // x * inv_t - mx * inv_t as one FMA: the rounding of the shift is common to the row and
  // cancels in the normalisation.
  const float shift = -mx * inv_t;
  V s = V{};
  for (int64_t k = 0; k < Kv; k += W) {
    V e = exp_nonpos<V, VI>(loadu<V>(x + k) * inv_t + shift);
    storeu(w + k, e);
    s += e;
  }
  if (Kv < K) {
    V e = exp_nonpos<V, VI>(tail * inv_t + shift);
    storeu(w + Kv, e);
    s += e;
  }
  float sum = 0.f;
  for (int i = 0; i < W; ++i) sum += s[i];
  return sum;
}

// c (MR x NV*W, row stride ldc) = w (MR x K, row stride ldw) @ b (K x NV*W, row stride ldb)
template <class V, int MR, int NV>
ADDP_INLINE void micro_kernel(const float* w, int64_t ldw, const float* b, int64_t ldb,
                              int64_t K, float* c, int64_t ldc) {
  constexpr int W = sizeof(V) / sizeof(float);
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[r][j] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) bv[j] = loadu<V>(b + k * ldb + j * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float a = w[r * ldw + k];  // scalar * vector broadcasts
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[r][j] += a * bv[j];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) storeu(c + r * ldc + j * W, acc[r][j]);
}

// Column-panel remainder: run the micro-kernel with nv (< NV) vectors.
template <class V, int MR, int NV>
ADDP_INLINE void micro_kernel_n(int nv, const float* w, int64_t ldw, const float* b,
                                int64_t ldb, int64_t K, float* c, int64_t ldc) {
  if constexpr (NV > 0) {
    if (nv == NV) micro_kernel<V, MR, NV>(w, ldw, b, ldb, K, c, ldc);
    else micro_kernel_n<V, MR, NV - 1>(nv, w, ldw, b, ldb, K, c, ldc);
  }
}

struct Tile {
  float* w;          // rows x Kp exp-weights (rows up to round_up(n, 12)); row r holds its
                     // fp32 logits on entry where src[r] is null
  const float* const* src;  // n pointers to contiguous fp32 logits rows, or null
  int64_t n;         // valid rows
  int64_t K, Kp;
  float inv_t;
  float* sums;       // n
  const float* cb;   // K x Dp, zero-padded fp32 codebook
  int64_t Dp;
  float* c;          // rows x Dp result (unnormalised)
};

template <class V, class VI, int MR, int NV>
ADDP_INLINE void process_tile(const Tile& t) {
  constexpr int W = sizeof(V) / sizeof(float);
  for (int64_t r = 0; r < t.n; ++r) {
    float* w = t.w + r * t.Kp;
    t.sums[r] = exp_weights<V, VI>(t.src[r] ? t.src[r] : w, w, t.K, t.inv_t);
  }
  const int64_t rows = round_up(t.n, MR);
  std::fill(t.w + t.n * t.Kp, t.w + rows * t.Kp, 0.f);
  for (int64_t r0 = 0; r0 < rows; r0 += MR) {
    const float* w = t.w + r0 * t.Kp;
    float* c = t.c + r0 * t.Dp;
    for (int64_t j = 0; j < t.Dp;) {
      const int64_t nv = std::min<int64_t>(NV, (t.Dp - j) / W);
      micro_kernel_n<V, MR, NV>(static_cast<int>(nv), w, t.Kp, t.cb + j, t.Dp, t.K, c + j, t.Dp);
      j += nv * W;
    }
  }
}

#ifdef ADDP_SIMD_X86
__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma")))
void tile_avx512(const Tile& t) { process_tile<vf16, vi16, 6, 4>(t); }
__attribute__((target("avx2,fma")))
void tile_avx2(const Tile& t) { process_tile<vf8, vi8, 6, 2>(t); }
#endif
void tile_generic(const Tile& t) { process_tile<vf4, vi4, 4, 4>(t); }

using TileFn = void (*)(const Tile&);

TileFn pick_tile_fn() {
  switch (simd::cpu_isa()) {
#ifdef ADDP_SIMD_X86
    case simd::Isa::avx512: return tile_avx512;
    case simd::Isa::avx2: return tile_avx2;
#endif
    default: return tile_generic;
  }
}

// dst[0:K] = float(src[k * stride])
template <class T>
void load_row(const T* src, int64_t stride, int64_t K, float* dst) {
  if (stride == 1) {
    for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<float>(src[k]);
  } else {
    for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<float>(src[k * stride]);
  }
}

struct Args {
  const char* logits;              // base pointer (bytes)
  std::vector<int64_t> lead_sizes, lead_strides;  // leading dims of logits (elements)
  int64_t stride_k;
  const char* cb_raw;              // codebook, contiguous, original dtype
  const float* cb;                 // K x Dp fp32 padded
  const int64_t* ids;
  const bool* mask;
  int64_t N, K, Kp, D, Dp;
  float inv_t;
  char* out;
  TileFn tile_fn;
};

template <class LT, class OT>
void run(const Args& a) {
  const int64_t RT = std::clamp<int64_t>((16384 / a.Kp) / 12 * 12, 12, 96);  // tile rows
  // Threads grab chunks of rows from a shared counter rather than one fixed slice each, so a
  // thread that shares its core with another process does not hold everyone up.
  const int64_t chunk = 2 * RT;
  const int64_t min_rows = std::max<int64_t>(1, (int64_t{1} << 18) / (a.K * a.Dp));  // per thread
  const int64_t workers = std::clamp<int64_t>(a.N / std::max(chunk, min_rows), 1, at::get_num_threads());
  std::atomic<int64_t> next{0};
  const LT* logits = reinterpret_cast<const LT*>(a.logits);
  OT* out = reinterpret_cast<OT*>(a.out);
  const OT* cb_raw = reinterpret_cast<const OT*>(a.cb_raw);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> wbuf(RT * a.Kp), cbuf(RT * a.Dp), sums(RT);
    std::vector<int64_t> rows(RT);
    std::vector<const float*> src(RT);
    int64_t n = 0;
    auto flush = [&]() {
      a.tile_fn(Tile{wbuf.data(), src.data(), n, a.K, a.Kp, a.inv_t, sums.data(), a.cb, a.Dp, cbuf.data()});
      for (int64_t r = 0; r < n; ++r) {
        const float scale = 1.f / sums[r];
        const float* acc = cbuf.data() + r * a.Dp;
        OT* dst = out + rows[r] * a.D;
        for (int64_t d = 0; d < a.D; ++d) dst[d] = static_cast<OT>(acc[d] * scale);
      }
      n = 0;
      std::fill(src.begin(), src.end(), nullptr);
    };
    for (int64_t begin; (begin = next.fetch_add(chunk)) < a.N;) {
      for (int64_t i = begin, end = std::min(a.N, begin + chunk); i < end; ++i) {
        if (a.mask && !a.mask[i]) {  // reliable: hard embedding
          std::memcpy(out + i * a.D, cb_raw + a.ids[i] * a.D, a.D * sizeof(OT));
          continue;
        }
        int64_t offset = 0;
        if (a.lead_sizes.size() == 1) {
          offset = i * a.lead_strides[0];
        } else {
          for (int64_t d = static_cast<int64_t>(a.lead_sizes.size()) - 1, rem = i; d >= 0; --d) {
            offset += (rem % a.lead_sizes[d]) * a.lead_strides[d];
            rem /= a.lead_sizes[d];
          }
        }
        if constexpr (std::is_same_v<LT, float>) {
          if (a.stride_k == 1) src[n] = logits + offset;  // read in place, no copy
        }
        if (!src[n]) load_row(logits + offset, a.stride_k, a.K, wbuf.data() + n * a.Kp);
        rows[n] = i;
        if (++n == RT) flush();
      }
    }
    if (n > 0) flush();
  });
}

template <class OT>
void run_for_logits(at::ScalarType lt, const Args& a) {
  switch (lt) {
    case at::kFloat: return run<float, OT>(a);
    case at::kBFloat16: return run<c10::BFloat16, OT>(a);
    case at::kHalf: return run<c10::Half, OT>(a);
    default: TORCH_CHECK(false, "codebook_weighted_sum: unsupported logits dtype ", lt);
  }
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace

at::Tensor codebook_weighted_sum_cpu(const at::Tensor& logits, const at::Tensor& codebook,
                                     const std::optional<at::Tensor>& ids,
                                     const std::optional<at::Tensor>& mask, double temperature) {
  const char* op = "codebook_weighted_sum: ";
  TORCH_CHECK(codebook.dim() == 2, op, "codebook must be 2-D (K, D), got shape ", codebook.sizes());
  TORCH_CHECK(logits.dim() >= 1, op, "logits must have at least 1 dim (..., V)");
  TORCH_CHECK(logits.device().is_cpu() && codebook.device().is_cpu(), op,
              "CPU kernel needs CPU tensors, got logits on ", logits.device(), " and codebook on ",
              codebook.device());
  TORCH_CHECK(is_supported_float(logits.scalar_type()), op,
              "logits must be float32/bfloat16/float16, got ", logits.scalar_type());
  TORCH_CHECK(is_supported_float(codebook.scalar_type()), op,
              "codebook must be float32/bfloat16/float16, got ", codebook.scalar_type());
  const int64_t K = codebook.size(0), D = codebook.size(1), V = logits.size(-1);
  TORCH_CHECK(K >= 1, op, "codebook is empty (K = 0)");
  TORCH_CHECK(K <= V, op, "codebook size K = ", K, " exceeds the logits' last dim V = ", V);
  TORCH_CHECK(ids.has_value() == mask.has_value(), op,
              "ids and mask must be given together (got ", ids.has_value() ? "ids" : "mask",
              " only)");

  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  std::vector<int64_t> out_shape(lead.begin(), lead.end());
  out_shape.push_back(D);
  at::Tensor out = at::empty(out_shape, codebook.options());
  const int64_t N = c10::multiply_integers(lead);

  at::Tensor ids_c, mask_c;
  if (ids.has_value()) {
    TORCH_CHECK(ids->device().is_cpu() && mask->device().is_cpu(), op, "ids and mask must be on CPU");
    TORCH_CHECK(ids->sizes() == lead, op, "ids shape ", ids->sizes(), " must equal logits.shape[:-1] ",
                lead);
    TORCH_CHECK(mask->sizes() == lead, op, "mask shape ", mask->sizes(),
                " must equal logits.shape[:-1] ", lead);
    TORCH_CHECK(ids->scalar_type() == at::kLong, op, "ids must be int64, got ", ids->scalar_type());
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, "mask must be bool, got ", mask->scalar_type());
    ids_c = ids->contiguous();
    mask_c = mask->contiguous();
    const int64_t* p = ids_c.data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i)
      TORCH_CHECK(p[i] >= 0 && p[i] < K, op, "ids[", i, "] (flat) = ", p[i],
                  " is out of range [0, ", K, ")");
  }
  if (N == 0 || D == 0) return out;

  const int64_t Kp = round_up(K, kPad), Dp = round_up(D, kPad);
  at::Tensor cb_c = codebook.contiguous();
  at::Tensor cb_pad = at::zeros({K, Dp}, codebook.options().dtype(at::kFloat));
  cb_pad.narrow(1, 0, D).copy_(codebook);

  Args a;
  a.logits = static_cast<const char*>(logits.const_data_ptr());
  for (int64_t d = 0; d + 1 < logits.dim(); ++d) {  // leading dims, merged where contiguous
    if (!a.lead_sizes.empty() && a.lead_strides.back() == logits.stride(d) * logits.size(d)) {
      a.lead_sizes.back() *= logits.size(d);
      a.lead_strides.back() = logits.stride(d);
    } else {
      a.lead_sizes.push_back(logits.size(d));
      a.lead_strides.push_back(logits.stride(d));
    }
  }
  a.stride_k = logits.stride(-1);
  a.cb_raw = static_cast<const char*>(cb_c.const_data_ptr());
  a.cb = cb_pad.const_data_ptr<float>();
  a.ids = ids_c.defined() ? ids_c.const_data_ptr<int64_t>() : nullptr;
  a.mask = mask_c.defined() ? mask_c.const_data_ptr<bool>() : nullptr;
  a.N = N; a.K = K; a.Kp = Kp; a.D = D; a.Dp = Dp;
  a.inv_t = static_cast<float>(1.0 / temperature);
  a.out = static_cast<char*>(out.data_ptr());
  a.tile_fn = pick_tile_fn();

  switch (codebook.scalar_type()) {
    case at::kFloat: run_for_logits<float>(logits.scalar_type(), a); break;
    case at::kBFloat16: run_for_logits<c10::BFloat16>(logits.scalar_type(), a); break;
    default: run_for_logits<c10::Half>(logits.scalar_type(), a); break;
  }
  return out;
}

}  // namespace addp
