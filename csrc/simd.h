// Small SIMD helpers shared by the CPU kernels (weighted_sum.cpp, gumbel_topk.cpp, soft_ce.cpp).
//
// Vectors are GCC/Clang vector extensions (V = float lanes, VI = int32 lanes of the same
// width). A kernel is written once as a template on (V, VI) and instantiated per ISA inside
// functions carrying a target attribute; `cpu_isa()` picks the widest one the CPU runs
// (env ADDP_CPU_ISA=generic|avx2|avx512 caps it, for tests).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

namespace addp {
namespace simd {

#define ADDP_SIMD_INLINE inline __attribute__((always_inline))
#define ADDP_SIMD_INLINE_LAMBDA __attribute__((always_inline))
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ADDP_SIMD_X86 1
#endif

typedef float vf4 __attribute__((vector_size(16)));
typedef int32_t vi4 __attribute__((vector_size(16)));
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

constexpr float kInf = std::numeric_limits<float>::infinity();

enum class Isa { generic, avx2, avx512 };

inline Isa cpu_isa() {
  const char* env = std::getenv("ADDP_CPU_ISA");
  const std::string cap = env ? env : "";
#ifdef ADDP_SIMD_X86
  if (cap != "generic" && cap != "avx2" && __builtin_cpu_supports("avx512f")) return Isa::avx512;
  if (cap != "generic" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::generic;
}

// Whether the AVX512-BF16 instructions may run: on AVX-512 CPUs that have them, unless
// ADDP_CPU_ISA is set (ADDP_CPU_ISA=avx512 runs AVX-512 without them).
inline bool cpu_has_avx512_bf16() {
  const char* env = std::getenv("ADDP_CPU_ISA");
#ifdef ADDP_SIMD_X86
  return cpu_isa() == Isa::avx512 && !env && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

template <class V> constexpr int lanes() { return sizeof(V) / sizeof(float); }
template <class V> ADDP_SIMD_INLINE V loadu(const float* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <class V> ADDP_SIMD_INLINE void storeu(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
template <class V> ADDP_SIMD_INLINE V splat(float x) { return V{} + x; }
// Lanes of a where the mask m (VI, all ones = true) is set, else lanes of b.
template <class V, class VI> ADDP_SIMD_INLINE V select(VI m, V a, V b) { return (V)((m & (VI)a) | (~m & (VI)b)); }

template <class V> ADDP_SIMD_INLINE float hsum(V v) {
  float s = 0.f;
  for (int i = 0; i < lanes<V>(); ++i) s += v[i];
  return s;
}
template <class V> ADDP_SIMD_INLINE float hmax(V v) {
  float m = -kInf;
  for (int i = 0; i < lanes<V>(); ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x) for x <= 0 (Cephes expf, ~1 ulp); -inf -> 0.
template <class V, class VI> ADDP_SIMD_INLINE V exp_nonpos(V x) {
  const V lo = splat<V>(-87.33654f);
  const V magic = splat<V>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  V xc = x < lo ? lo : x;
  V t = xc * 1.44269504f + magic;
  V n = t - magic;
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  V y = p * (r * r) + r + 1.0f;
  VI scale = (((VI)t - 0x4B400000) + 127) << 23;  // 2^n from the exponent bits
  y = y * (V)scale;
  return x < lo ? V{} : y;
}

// log(x) for positive normal x (Cephes logf, ~1 ulp).
template <class V, class VI> ADDP_SIMD_INLINE V log_pos(V x) {
  VI xi = (VI)x;
  VI e = ((xi >> 23) & 0xff) - 126;
  V m = (V)((xi & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  VI small = m < 0.707106781186547524f;       // then use 2m - 1 and e - 1
  e = e + small;
  m = m - 1.0f + select<V, VI>(small, m, V{});
  V ef = __builtin_convertvector(e, V);
  V z = m * m;
  V y = m * 7.0376836292e-2f - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + ef * 0.693359375f;
}

// dst[0:n] = float(src[i * stride]) (T: float, double, c10::BFloat16, c10::Half).
template <class T, class F> inline void to_float(const T* src, int64_t stride, int64_t n, F* dst) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<F>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<F>(src[i * stride]);
  }
}

// Standard Gumbel noise -log(-log(max(u, FLT_MIN))) of uniforms u in [0, 1).
template <class V, class VI> ADDP_SIMD_INLINE V gumbel(V u) {
  const V tiny = splat<V>(std::numeric_limits<float>::min());
  u = u < tiny ? tiny : u;
  return -log_pos<V, VI>(-log_pos<V, VI>(u));
}

}  // namespace simd
}  // namespace addp
