// CPU kernels of addp::dropout and addp::dropout_backward (definition:
// addp.ops.dropout_reference).
//
// Element i (row-major) of a call is kept when word i % 4 of
//   Philox4x32-10(counter = (lo32(i / 4), hi32(i / 4), 0, 0), key = (lo32(seed), hi32(seed)))
// is >= floor(p * 2^32); kept elements are multiplied by 1 / (1 - p), the others are 0
// (p = 1 drops everything). The mask is returned (bool) for the backward,
//   dx = keep ? dy / (1 - p) : 0.
// Philox (Salmon et al., SC'11) is counter-based: every element's word is computed
// independently, so the blocks are split across threads and computed W at a time in 64-bit
// vector lanes (8 with AVX-512, 4 with AVX2, one at a time otherwise); the result does not depend on the
// thread count or the ISA. Products are scaled in float32 (float64 for float64 inputs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd.h"

#ifdef ADDP_SIMD_X86
#include <immintrin.h>
#endif

namespace addp {
namespace {

constexpr uint64_t kLow32 = 0xffffffffULL;
constexpr uint64_t kM0 = 0xD2511F53ULL, kM1 = 0xCD9E8D57ULL;  // Philox4x32 multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;      // its key increments

// words[4 * j + w], j < 8: word w of Philox4x32-10 at counter (lo32(b + j), hi32(b + j), 0, 0)
// under the key (lo32(seed), hi32(seed)). One version per ISA: the vector ones compute
// 4 or 8 counters in 64-bit lanes, each 32 x 32 -> 64-bit product one vpmuludq.
void philox8_generic(uint64_t b, uint64_t seed, uint32_t* words) {
  for (int j = 0; j < 8; ++j) {
    uint64_t c0 = (b + j) & kLow32, c1 = (b + j) >> 32, c2 = 0, c3 = 0;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      if (round) k0 += kW0, k1 += kW1;
      const uint64_t p0 = c0 * kM0, p1 = c2 * kM1;
      c0 = (p1 >> 32) ^ c1 ^ k0, c1 = p1 & kLow32, c2 = (p0 >> 32) ^ c3 ^ k1, c3 = p0 & kLow32;
    }
    words[4 * j] = static_cast<uint32_t>(c0), words[4 * j + 1] = static_cast<uint32_t>(c1);
    words[4 * j + 2] = static_cast<uint32_t>(c2), words[4 * j + 3] = static_cast<uint32_t>(c3);
  }
}

#ifdef ADDP_SIMD_X86
__attribute__((target("avx2,fma"))) void philox8_avx2(uint64_t b, uint64_t seed, uint32_t* words) {
  const __m256i low = _mm256_set1_epi64x(kLow32), m0 = _mm256_set1_epi64x(kM0), m1 = _mm256_set1_epi64x(kM1);
  for (int half = 0; half < 2; ++half) {
    const __m256i block = _mm256_add_epi64(_mm256_set1_epi64x((long long)(b + 4 * half)), _mm256_setr_epi64x(0, 1, 2, 3));
    __m256i c0 = _mm256_and_si256(block, low), c1 = _mm256_srli_epi64(block, 32);
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      if (round) k0 += kW0, k1 += kW1;
      const __m256i p0 = _mm256_mul_epu32(c0, m0), p1 = _mm256_mul_epu32(c2, m1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1), _mm256_set1_epi64x(k0));
      c2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3), _mm256_set1_epi64x(k1));
      c1 = _mm256_and_si256(p1, low);
      c3 = _mm256_and_si256(p0, low);
    }
    // Transpose in registers: lane j of (c0 | c1 << 32) and of (c2 | c3 << 32) holds words
    // 0-1 and 2-3 of counter j; the unpacks pair them up (counters 0, 2 and 1, 3) and the
    // permutes put the four counters in order (a scalar scatter cost as much as the rounds).
    const __m256i w01 = _mm256_or_si256(c0, _mm256_slli_epi64(c1, 32));
    const __m256i w23 = _mm256_or_si256(c2, _mm256_slli_epi64(c3, 32));
    const __m256i even = _mm256_unpacklo_epi64(w01, w23), odd = _mm256_unpackhi_epi64(w01, w23);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + 16 * half), _mm256_permute2x128_si256(even, odd, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + 16 * half + 8), _mm256_permute2x128_si256(even, odd, 0x31));
  }
}

__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))) void philox8_avx512(uint64_t b, uint64_t seed,
                                                                                 uint32_t* words) {
  const __m512i low = _mm512_set1_epi64(kLow32), m0 = _mm512_set1_epi64(kM0), m1 = _mm512_set1_epi64(kM1);
  const __m512i block = _mm512_add_epi64(_mm512_set1_epi64((long long)b), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  __m512i c0 = _mm512_and_si512(block, low), c1 = _mm512_srli_epi64(block, 32);
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    if (round) k0 += kW0, k1 += kW1;
    const __m512i p0 = _mm512_mul_epu32(c0, m0), p1 = _mm512_mul_epu32(c2, m1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p1, 32), c1), _mm512_set1_epi64(k0));
    c2 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p0, 32), c3), _mm512_set1_epi64(k1));
    c1 = _mm512_and_si512(p1, low);
    c3 = _mm512_and_si512(p0, low);
  }
  alignas(64) uint64_t w[4][8];
  _mm512_store_si512(w[0], c0), _mm512_store_si512(w[1], c1), _mm512_store_si512(w[2], c2);
  _mm512_store_si512(w[3], c3);
  for (int j = 0; j < 8; ++j)
    for (int k = 0; k < 4; ++k) words[4 * j + k] = static_cast<uint32_t>(w[k][j]);
}
#endif

using Philox8 = void (*)(uint64_t, uint64_t, uint32_t*);

// bfloat16 data is handled as its uint16_t bits: converted by bit operations (round to nearest
// even, NaN kept quiet, as c10::BFloat16), which the compiler vectorises.
template <class T> using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class T> ADDP_SIMD_INLINE Acc<T> widen(T v) { return static_cast<Acc<T>>(v); }
template <> ADDP_SIMD_INLINE float widen(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <class T> ADDP_SIMD_INLINE T narrow(Acc<T> v) { return static_cast<T>(v); }
template <> ADDP_SIMD_INLINE uint16_t narrow(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t nan = 0u - static_cast<uint32_t>((bits & 0x7fffffffu) > 0x7f800000u);
  return static_cast<uint16_t>((rounded & ~nan) | (0x7fc0u & nan));
}

// k ? v : +0, by masking v's bits (selects of this form keep the loops vectorisable).
template <class A> ADDP_SIMD_INLINE A kept_or_zero(A v, bool k) {
  using Bits = std::conditional_t<sizeof(A) == 8, uint64_t, uint32_t>;
  Bits b;
  std::memcpy(&b, &v, sizeof b);
  b &= Bits(0) - static_cast<Bits>(k);
  std::memcpy(&v, &b, sizeof b);
  return v;
}

struct Args {
  int64_t n;
  uint64_t seed;
  uint32_t threshold;
  bool drop_all;
  double scale;
};

constexpr int64_t kGroup = 64;  // counters per pass: words for 256 elements, then one masking loop

// Elements [4 * b0, min(4 * b1, n)) of the call.
template <class T>
ADDP_SIMD_INLINE void dropout_blocks(const T* x, T* out, bool* keep, const Args& a, Philox8 philox8, int64_t b0,
                                     int64_t b1) {
  const Acc<T> scale = static_cast<Acc<T>>(a.scale);
  const uint32_t threshold = a.threshold;
  uint32_t words[4 * kGroup];
  for (int64_t b = b0; b < b1; b += kGroup) {
    for (int64_t j = 0; j < kGroup; j += 8) philox8(static_cast<uint64_t>(b + j), a.seed, words + 4 * j);
    const int64_t first = 4 * b, count = std::min<int64_t>(4 * std::min<int64_t>(kGroup, b1 - b), a.n - first);
    const T* __restrict xs = x + first;
    T* __restrict os = out + first;
    bool* __restrict ks = keep + first;
    for (int64_t r = 0; r < count; ++r) {
      const bool k = words[r] >= threshold;
      ks[r] = k;
      os[r] = narrow<T>(kept_or_zero(widen(xs[r]) * scale, k));
    }
  }
}

template <class T>
void dropout_blocks_generic(const T* x, T* out, bool* keep, const Args& a, Philox8 philox8, int64_t b0, int64_t b1) {
  dropout_blocks(x, out, keep, a, philox8, b0, b1);
}
#ifdef ADDP_SIMD_X86
template <class T>
__attribute__((target("avx2,fma"))) void dropout_blocks_avx2(const T* x, T* out, bool* keep, const Args& a,
                                                             Philox8 philox8, int64_t b0, int64_t b1) {
  dropout_blocks(x, out, keep, a, philox8, b0, b1);
}
template <class T>
__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))) void dropout_blocks_avx512(
    const T* x, T* out, bool* keep, const Args& a, Philox8 philox8, int64_t b0, int64_t b1) {
  dropout_blocks(x, out, keep, a, philox8, b0, b1);
}
#endif

template <class T>
void dropout_run(const T* x, T* out, bool* keep, const Args& a) {
  Philox8 philox8 = philox8_generic;
  auto blocks_fn = dropout_blocks_generic<T>;
#ifdef ADDP_SIMD_X86
  switch (simd::cpu_isa()) {
    case simd::Isa::avx512: philox8 = philox8_avx512, blocks_fn = dropout_blocks_avx512<T>; break;
    case simd::Isa::avx2: philox8 = philox8_avx2, blocks_fn = dropout_blocks_avx2<T>; break;
    default: break;
  }
#endif
  if (a.drop_all) {
    std::fill(out, out + a.n, T(0));
    std::fill(keep, keep + a.n, false);
    return;
  }
  at::parallel_for(0, (a.n + 3) / 4, 4096, [&](int64_t b0, int64_t b1) { blocks_fn(x, out, keep, a, philox8, b0, b1); });
}

// dx[i0, i1) = keep ? grad * scale : 0; compiled once per ISA like the forward's masking loop.
// The mask is read as bytes: GCC vectorises no loads of bool.
template <class T>
ADDP_SIMD_INLINE void backward_range(const T* __restrict grad, const bool* keep_bool, T* __restrict dx, Acc<T> scale,
                                     int64_t i0, int64_t i1) {
  const uint8_t* __restrict keep = reinterpret_cast<const uint8_t*>(keep_bool);
  for (int64_t i = i0; i < i1; ++i) dx[i] = narrow<T>(kept_or_zero(widen(grad[i]) * scale, keep[i] != 0));
}

template <class T>
void backward_range_generic(const T* g, const bool* k, T* dx, Acc<T> s, int64_t i0, int64_t i1) {
  backward_range(g, k, dx, s, i0, i1);
}
#ifdef ADDP_SIMD_X86
template <class T>
__attribute__((target("avx2,fma"))) void backward_range_avx2(const T* g, const bool* k, T* dx, Acc<T> s, int64_t i0,
                                                             int64_t i1) {
  backward_range(g, k, dx, s, i0, i1);
}
template <class T>
__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))) void backward_range_avx512(
    const T* g, const bool* k, T* dx, Acc<T> s, int64_t i0, int64_t i1) {
  backward_range(g, k, dx, s, i0, i1);
}
#endif

template <class T>
void backward_run(const T* grad, const bool* keep, T* dx, int64_t n, double scale_d) {
  const Acc<T> scale = static_cast<Acc<T>>(scale_d);
  auto range_fn = backward_range_generic<T>;
#ifdef ADDP_SIMD_X86
  switch (simd::cpu_isa()) {
    case simd::Isa::avx512: range_fn = backward_range_avx512<T>; break;
    case simd::Isa::avx2: range_fn = backward_range_avx2<T>; break;
    default: break;
  }
#endif
  at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) { range_fn(grad, keep, dx, scale, i0, i1); });
}

uint16_t* bits(const at::Tensor& bf16) { return reinterpret_cast<uint16_t*>(bf16.data_ptr<c10::BFloat16>()); }

double keep_scale(double p) { return p >= 1.0 ? 0.0 : 1.0 / (1.0 - p); }

void check_p(double p) { TORCH_CHECK(p >= 0.0 && p <= 1.0, "addp::dropout: p must be in [0, 1], got ", p); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  check_p(p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "addp::dropout: seed must be one int64");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  at::Tensor keep = at::empty(xc.sizes(), xc.options().dtype(at::kBool));
  Args a;
  a.n = xc.numel();
  a.seed = static_cast<uint64_t>(seed.item<int64_t>());
  a.threshold = static_cast<uint32_t>(std::min(std::floor(p * 4294967296.0), 4294967295.0));
  a.drop_all = p >= 1.0;
  a.scale = keep_scale(p);
  bool* k = keep.data_ptr<bool>();
  switch (xc.scalar_type()) {
    case at::kFloat: dropout_run(xc.data_ptr<float>(), out.data_ptr<float>(), k, a); break;
    case at::kDouble: dropout_run(xc.data_ptr<double>(), out.data_ptr<double>(), k, a); break;
    case at::kBFloat16: dropout_run(bits(xc), bits(out), k, a); break;
    case at::kHalf: dropout_run(xc.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), k, a); break;
    default: TORCH_CHECK(false, "addp::dropout: x must be float32/float64/bfloat16/float16, got ", xc.scalar_type());
  }
  return {out, keep};
}

at::Tensor dropout_backward_cpu(const at::Tensor& grad, const at::Tensor& keep, double p) {
  check_p(p);
  TORCH_CHECK(grad.sizes() == keep.sizes() && keep.scalar_type() == at::kBool,
              "addp::dropout_backward: keep must be a bool tensor of the gradient's shape");
  const at::Tensor g = grad.contiguous(), kc = keep.contiguous();
  at::Tensor dx = at::empty_like(g);
  const bool* k = kc.data_ptr<bool>();
  const double scale = keep_scale(p);
  switch (g.scalar_type()) {
    case at::kFloat: backward_run(g.data_ptr<float>(), k, dx.data_ptr<float>(), g.numel(), scale); break;
    case at::kDouble: backward_run(g.data_ptr<double>(), k, dx.data_ptr<double>(), g.numel(), scale); break;
    case at::kBFloat16:
      backward_run(bits(g), k, bits(dx), g.numel(), scale);
      break;
    case at::kHalf: backward_run(g.data_ptr<c10::Half>(), k, dx.data_ptr<c10::Half>(), g.numel(), scale); break;
    default: TORCH_CHECK(false, "addp::dropout_backward: unsupported dtype ", g.scalar_type());
  }
  return dx;
}

}  // namespace addp
