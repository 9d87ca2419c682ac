// CPU kernel of addp::group_norm_silu (definition: addp.ops.group_norm_silu_reference):
//   y = silu((x - mean_g) * rstd_g * weight_c + bias_c), statistics of each (sample, group)
// in double, the rest in float32, y rounded to x's dtype (float32, bfloat16, float16).
//
// Two passes over x, one write of y. Channels-last inputs (the VQ networks' layout) are read
// row by row, a row being the C channels of one pixel: pass 1 sums each channel over a chunk
// of pixels in float32 vector lanes and adds the chunk's sums into double, pass 2 applies the
// per-channel scale and shift and the SiLU. Contiguous (N, C, *) inputs are read channel
// by channel with per-channel scalars. Sums are taken of x - x[first pixel of the channel],
// and y from x - x[first pixel] too, which keeps cancellation away (in the sum of squares and
// in x * scale + shift) when a channel's mean is far from its spread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace addp {
namespace {

using namespace simd;

constexpr int64_t kChunk = 256;  // pixels (or elements) summed in float32 before going to double

// V lanes of x[0:V) as float32 (T: float, c10::BFloat16).
template <class V, class VU, class T> ADDP_SIMD_INLINE V load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return loadu<V>(p);
  } else if constexpr (sizeof(V) == 64) {  // one widening load (the vector code takes two)
    VU u;
    asm("vpmovzxwd %1, %0" : "=v"(u) : "m"(*reinterpret_cast<const uint16_t(*)[16]>(p)));
    return (V)(u << 16);
  } else {
    typedef uint16_t U __attribute__((vector_size(sizeof(V) / 2)));
    U u;
    std::memcpy(&u, p, sizeof(U));
    return (V)(__builtin_convertvector(u, VU) << 16);
  }
}

// Store V lanes to p, rounded to T's precision (bfloat16: to nearest even, NaN kept a NaN).
// NB (native bfloat16): the AVX512-BF16 instruction rounds, one instruction for the integer
// steps below with the same rounding, except that results under float32's smallest normal
// (1.2e-38) become zeros. It is written as assembly: no compiler flag is needed for it.
template <class V, class VU, bool NB, class T> ADDP_SIMD_INLINE void store_f(T* p, V v) {
  if constexpr (std::is_same_v<T, float>) {
    storeu<V>(p, v);
  } else if constexpr (NB && sizeof(V) == 64) {
    typedef uint16_t U __attribute__((vector_size(32)));
    U u;
    asm("vcvtneps2bf16 %1, %0" : "=v"(u) : "v"(v));
    std::memcpy(p, &u, sizeof(U));
  } else {
    typedef uint16_t U __attribute__((vector_size(sizeof(V) / 2)));
    VU bits = (VU)v;
    VU rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    VU nan = (VU)(v != v);
    rounded = (nan & 0x7fc0u) | (~nan & rounded);
    U u = __builtin_convertvector(rounded, U);
    std::memcpy(p, &u, sizeof(U));
  }
}

template <class V, class VI> ADDP_SIMD_INLINE V silu(V y) {
  const VI sign = VI{} + static_cast<int32_t>(0x80000000u);
  V e = exp_nonpos<V, VI>((V)((VI)y | sign));  // exp(-|y|)
  V r = 1.0f / (1.0f + e);
  return y * select<V, VI>(y >= 0.0f, r, e * r);
}

inline float silu_scalar(float y) { return y / (1.0f + std::exp(-y)); }

// One call's tensors. Work is split into units: channels-last, for the sums a chunk of kChunk
// pixels of one sample (its float32 channel sums go to part1/part2[unit]) and for the output
// one pixel; contiguous, one (sample, channel) row for both passes.
template <class T> struct Job {
  const T* x;
  T* y;
  int64_t N, C, HW;
  bool channels_last;
  const float* k;      // (N, C) per-channel shift of the sums: x at the channel's first pixel
  float *part1, *part2;  // channels-last sums: (N * chunks, C)
  double *s1, *s2;       // contiguous sums: (N * C)
  const float *scale, *shift;  // (N, C): y = silu((x - k) * scale + shift)
};

enum class Pass { sums, apply };

// Sums of channels [c, c + NV * W) over pixels [p0, p1): rows read front to back, NV vectors
// of sums held in registers.
template <class V, class VU, int NV, class T>
ADDP_SIMD_INLINE void nhwc_sums_block(const T* x, int64_t C, int64_t c, int64_t p0, int64_t p1, const float* k,
                                      float* a1, float* a2) {
  constexpr int W = lanes<V>();
  V kc[NV], v1[NV], v2[NV];
  for (int i = 0; i < NV; ++i) kc[i] = loadu<V>(k + c + i * W), v1[i] = V{}, v2[i] = V{};
  for (int64_t p = p0; p < p1; ++p) {
    const T* row = x + p * C + c;
    for (int i = 0; i < NV; ++i) {
      V d = load_f<V, VU>(row + i * W) - kc[i];
      v1[i] += d, v2[i] += d * d;
    }
  }
  for (int i = 0; i < NV; ++i) storeu<V>(a1 + c + i * W, v1[i]), storeu<V>(a2 + c + i * W, v2[i]);
}

template <class V, class VI, class VU, class T>
ADDP_SIMD_INLINE void nhwc_sums(const Job<T>& j, int64_t unit) {
  constexpr int W = lanes<V>();
  const int64_t chunks = (j.HW + kChunk - 1) / kChunk, C = j.C;
  const int64_t n = unit / chunks, p0 = (unit % chunks) * kChunk, p1 = std::min(j.HW, p0 + kChunk);
  float *a1 = j.part1 + unit * C, *a2 = j.part2 + unit * C;
  std::fill(a1, a1 + C, 0.f), std::fill(a2, a2 + C, 0.f);
  const float* k = j.k + n * C;
  const T* x = j.x + (n * j.HW) * C;
  int64_t c = 0;
  for (; c + W <= C; c += 4 * W) {  // up to 4 vectors of channels at a time, their sums in registers
    switch (std::min<int64_t>(4, (C - c) / W)) {
      case 4: nhwc_sums_block<V, VU, 4>(x, C, c, p0, p1, k, a1, a2); break;
      case 3: nhwc_sums_block<V, VU, 3>(x, C, c, p0, p1, k, a1, a2); break;
      case 2: nhwc_sums_block<V, VU, 2>(x, C, c, p0, p1, k, a1, a2); break;
      default: nhwc_sums_block<V, VU, 1>(x, C, c, p0, p1, k, a1, a2); break;
    }
  }
  for (c = C / W * W; c < C; ++c)
    for (int64_t p = p0; p < p1; ++p) {
      float d = static_cast<float>(x[p * C + c]) - k[c];
      a1[c] += d, a2[c] += d * d;
    }
}

// Channels [c, c + NV * W) of pixels r0 <= r < r1 (all of sample n): their scale, shift and
// k held in registers.
template <class V, class VI, class VU, bool NB, int NV, class T>
ADDP_SIMD_INLINE void nhwc_apply_block(const Job<T>& j, int64_t n, int64_t c, int64_t r0, int64_t r1) {
  constexpr int W = lanes<V>();
  const int64_t C = j.C;
  V a[NV], b[NV], k[NV];
  for (int i = 0; i < NV; ++i) {
    const int64_t at = n * C + c + i * W;
    a[i] = loadu<V>(j.scale + at), b[i] = loadu<V>(j.shift + at), k[i] = loadu<V>(j.k + at);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* in = j.x + r * C + c;
    T* out = j.y + r * C + c;
    for (int i = 0; i < NV; ++i)
      store_f<V, VU, NB>(out + i * W, silu<V, VI>((load_f<V, VU>(in + i * W) - k[i]) * a[i] + b[i]));
  }
}

// Pixels r0 <= r < r1 of sample n.
template <class V, class VI, class VU, bool NB, class T>
ADDP_SIMD_INLINE void nhwc_apply(const Job<T>& j, int64_t n, int64_t r0, int64_t r1) {
  constexpr int W = lanes<V>();
  const int64_t C = j.C;
  for (int64_t c = 0; c + W <= C; c += 4 * W) {
    switch (std::min<int64_t>(4, (C - c) / W)) {
      case 4: nhwc_apply_block<V, VI, VU, NB, 4>(j, n, c, r0, r1); break;
      case 3: nhwc_apply_block<V, VI, VU, NB, 3>(j, n, c, r0, r1); break;
      case 2: nhwc_apply_block<V, VI, VU, NB, 2>(j, n, c, r0, r1); break;
      default: nhwc_apply_block<V, VI, VU, NB, 1>(j, n, c, r0, r1); break;
    }
  }
  const float *a = j.scale + n * C, *b = j.shift + n * C, *k = j.k + n * C;
  for (int64_t c = C / W * W; c < C; ++c)
    for (int64_t r = r0; r < r1; ++r)
      j.y[r * C + c] = static_cast<T>(silu_scalar((static_cast<float>(j.x[r * C + c]) - k[c]) * a[c] + b[c]));
}

template <class V, class VI, class VU, class T>
ADDP_SIMD_INLINE void nchw_sums(const Job<T>& j, int64_t r) {
  constexpr int W = lanes<V>();
  const T* row = j.x + r * j.HW;
  const float kr = j.k[r];
  const V k = splat<V>(kr);
  double t1 = 0, t2 = 0;
  for (int64_t p0 = 0; p0 < j.HW; p0 += kChunk) {
    const int64_t p1 = std::min(j.HW, p0 + kChunk);
    V v1{}, v2{};
    float f1 = 0.f, f2 = 0.f;
    int64_t p = p0;
    for (; p + W <= p1; p += W) {
      V d = load_f<V, VU>(row + p) - k;
      v1 += d, v2 += d * d;
    }
    for (; p < p1; ++p) {
      float d = static_cast<float>(row[p]) - kr;
      f1 += d, f2 += d * d;
    }
    t1 += static_cast<double>(hsum(v1)) + f1, t2 += static_cast<double>(hsum(v2)) + f2;
  }
  j.s1[r] = t1, j.s2[r] = t2;
}

template <class V, class VI, class VU, bool NB, class T>
ADDP_SIMD_INLINE void nchw_apply(const Job<T>& j, int64_t r) {
  constexpr int W = lanes<V>();
  const float sa = j.scale[r], sb = j.shift[r], sk = j.k[r];
  const V a = splat<V>(sa), b = splat<V>(sb), k = splat<V>(sk);
  const T* in = j.x + r * j.HW;
  T* out = j.y + r * j.HW;
  int64_t p = 0;
  for (; p + W <= j.HW; p += W) store_f<V, VU, NB>(out + p, silu<V, VI>((load_f<V, VU>(in + p) - k) * a + b));
  for (; p < j.HW; ++p) out[p] = static_cast<T>(silu_scalar((static_cast<float>(in[p]) - sk) * sa + sb));
}

template <class V, class VI, class VU, bool NB, class T>
ADDP_SIMD_INLINE void work(const Job<T>& j, Pass pass, int64_t begin, int64_t end) {
  if (j.channels_last && pass == Pass::apply) {  // pixel rows, split where a sample ends
    for (int64_t r = begin; r < end;) {
      const int64_t n = r / j.HW, stop = std::min(end, (n + 1) * j.HW);
      nhwc_apply<V, VI, VU, NB>(j, n, r, stop);
      r = stop;
    }
    return;
  }
  for (int64_t u = begin; u < end; ++u) {
    if (j.channels_last) {
      nhwc_sums<V, VI, VU>(j, u);
    } else {
      pass == Pass::sums ? nchw_sums<V, VI, VU>(j, u) : nchw_apply<V, VI, VU, NB>(j, u);
    }
  }
}

typedef uint32_t vu4 __attribute__((vector_size(16)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef uint32_t vu16 __attribute__((vector_size(64)));

// The same loops per ISA: the templates above inline into each (their vectors then compile
// to that ISA's registers); parallel_for runs outside them.
template <class T> void work_generic(const Job<T>& j, Pass pass, int64_t b, int64_t e) {
  work<vf4, vi4, vu4, false>(j, pass, b, e);
}
#ifdef ADDP_SIMD_X86
template <class T> __attribute__((target("avx2,fma"))) void work_avx2(const Job<T>& j, Pass pass, int64_t b, int64_t e) {
  work<vf8, vi8, vu8, false>(j, pass, b, e);
}
template <class T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) void work_avx512(const Job<T>& j, Pass pass, int64_t b,
                                                                               int64_t e) {
  work<vf16, vi16, vu16, false>(j, pass, b, e);
}
template <class T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) void work_avx512_bf16(const Job<T>& j, Pass pass,
                                                                                    int64_t b, int64_t e) {
  work<vf16, vi16, vu16, true>(j, pass, b, e);
}
#endif

template <class T> auto pick_work() -> void (*)(const Job<T>&, Pass, int64_t, int64_t) {
  switch (cpu_isa()) {
#ifdef ADDP_SIMD_X86
    case Isa::avx512:
      return std::is_same_v<T, c10::BFloat16> && cpu_has_avx512_bf16() ? work_avx512_bf16<T> : work_avx512<T>;
    case Isa::avx2: return work_avx2<T>;
#endif
    default: return work_generic<T>;
  }
}

// Per (n, c): the scale and shift of y = silu((x - k) * scale + shift), from the channel sums.
void affine_from_sums(int64_t N, int64_t C, int64_t G, int64_t HW, const double* s1, const double* s2,
                      const float* k, const float* weight, const float* bias, double eps, float* scale,
                      float* shift) {
  const int64_t Cg = C / G;
  const double count = static_cast<double>(Cg) * static_cast<double>(HW);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      double sum = 0, sq = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const int64_t i = n * C + c;
        const double kc = k[i];
        sum += s1[i] + kc * HW;
        sq += s2[i] + 2.0 * kc * s1[i] + kc * kc * HW;
      }
      const double mean = sum / count, var = std::max(sq / count - mean * mean, 0.0);
      const double rstd = 1.0 / std::sqrt(var + eps);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const double a = rstd * (weight ? weight[c] : 1.0f);
        scale[n * C + c] = static_cast<float>(a);
        shift[n * C + c] = static_cast<float>((bias ? bias[c] : 0.0f) - (mean - k[n * C + c]) * a);
      }
    }
}

template <class T>
void run(const T* x, T* y, int64_t N, int64_t C, int64_t HW, int64_t G, bool channels_last, const float* weight,
         const float* bias, double eps) {
  const auto fn = pick_work<T>();
  const int64_t chunks = (HW + kChunk - 1) / kChunk;
  std::vector<float> k(N * C), scale(N * C), shift(N * C);
  std::vector<float> part1(channels_last ? N * chunks * C : 0), part2(part1.size());
  std::vector<double> s1(N * C), s2(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      k[n * C + c] = static_cast<float>(channels_last ? x[n * HW * C + c] : x[(n * C + c) * HW]);
  Job<T> j{x, y, N, C, HW, channels_last, k.data(), part1.data(), part2.data(), s1.data(), s2.data(),
           scale.data(), shift.data()};
  const int64_t sum_units = channels_last ? N * chunks : N * C;
  at::parallel_for(0, sum_units, 1, [&](int64_t b, int64_t e) { fn(j, Pass::sums, b, e); });
  if (channels_last) {  // chunks' float32 sums -> per-channel double sums
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        double t1 = 0, t2 = 0;
        for (int64_t u = n * chunks; u < (n + 1) * chunks; ++u) t1 += part1[u * C + c], t2 += part2[u * C + c];
        s1[n * C + c] = t1, s2[n * C + c] = t2;
      }
  }
  affine_from_sums(N, C, G, HW, s1.data(), s2.data(), k.data(), weight, bias, eps, scale.data(), shift.data());
  const int64_t apply_units = channels_last ? N * HW : N * C;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(channels_last ? C : HW, 1));
  at::parallel_for(0, apply_units, grain, [&](int64_t b, int64_t e) { fn(j, Pass::apply, b, e); });
}

std::optional<at::Tensor> as_float_params(const std::optional<at::Tensor>& t, int64_t C, const char* name) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "group_norm_silu: ", name, " must have shape (", C, ",), got ",
              t->sizes());
  return t->to(at::kFloat).contiguous();
}

}  // namespace

at::Tensor group_norm_silu_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, int64_t groups, double eps) {
  TORCH_CHECK(x.dim() >= 2, "group_norm_silu: x must be (N, C, *), got ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(groups > 0 && C % groups == 0, "group_norm_silu: ", C, " channels are not divisible into ", groups,
              " groups");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "group_norm_silu: x must be float32, bfloat16 or float16, got ", dtype);
  const bool channels_last = x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor xc = channels_last || x.is_contiguous() ? x : x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t HW = N * C == 0 ? 0 : xc.numel() / (N * C);
  if (xc.numel() == 0) return y;
  const auto w = as_float_params(weight, C, "weight"), b = as_float_params(bias, C, "bias");
  const float* wp = w ? w->data_ptr<float>() : nullptr;
  const float* bp = b ? b->data_ptr<float>() : nullptr;
  if (dtype == at::kFloat) {
    run(xc.data_ptr<float>(), y.data_ptr<float>(), N, C, HW, groups, channels_last, wp, bp, eps);
  } else if (dtype == at::kBFloat16) {
    run(xc.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), N, C, HW, groups, channels_last, wp, bp, eps);
  } else {  // float16: through a float32 copy (no vector conversion written for it)
    at::Tensor yf = at::empty_like(xc, at::kFloat);
    const at::Tensor xf = xc.to(at::kFloat);
    run(xf.data_ptr<float>(), yf.data_ptr<float>(), N, C, HW, groups, channels_last, wp, bp, eps);
    y.copy_(yf);
  }
  return y;
}

}  // namespace addp
