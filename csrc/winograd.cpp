// CPU kernel of addp::conv3x3_winograd (definition: addp.ops.conv3x3_reference):
// a 3x3 convolution, stride 1, padding 1, float32, on a channels-last input, computed with
// Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional
// Neural Networks", 2016): 36 multiplications per 4x4 output tile and channel pair instead
// of 144, for a few additions per element in the transforms.
//
//   y[tile] = A^T [ sum_c (B^T d_c B) * U_c ] A (+ bias + residual),   U = G g G^T (the
//   weight, transformed once by the caller: u has shape (36, C, K), point-major, K contiguous).
//
// The output tiles are taken in raster order in blocks of 24; one block at a time per thread:
// its 6x6 input patches are transformed into 36 (tiles x C) matrices, multiplied by the 36
// (C x K) weight matrices, and the 36 (tiles x K) products transformed back into 4x4 output
// tiles (the bias and a residual tensor added as they are written: the residual blocks of the
// VQ networks save a pass over their output), in per-thread buffers of 36 x 24 x (C + K)
// floats (216 KiB at 32 channels in and out). With `upsample` the convolution's input is x
// upsampled 2x by nearest neighbour, read from x in place (the VQ decoder's upsampling layers:
// the upsampled tensor is never built).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace addp {
namespace {

using namespace simd;

constexpr int kPoints = 36;  // the 6x6 transformed tile

struct Job {
  const float* x;     // (N, H >> up, W >> up, C)
  const float* u;     // (36, C, K)
  const float* bias;  // (K) or null
  const float* res;   // (N, H, W, K) or null
  float* y;           // (N, H, W, K)
  int64_t N, H, W, C, K, TH, TW;
  int up;  // 1: the convolution's input is x upsampled 2x (nearest), read in place; else 0
};

// B^T applied to six vectors d0..d5 (a column or a row of the 6x6 input patch).
template <class V> ADDP_SIMD_INLINE void input_1d(const V* d, V* r) {
  const V a = d[4] - 4.0f * d[2], b = d[3] - 4.0f * d[1];
  const V c = d[4] - d[2], e = 2.0f * (d[3] - d[1]);
  r[0] = 4.0f * (d[0] - d[2]) + (d[4] - d[2]);
  r[1] = a + b;
  r[2] = a - b;
  r[3] = c + e;
  r[4] = c - e;
  r[5] = 4.0f * (d[1] - d[3]) + (d[5] - d[3]);
}

// A^T applied to six vectors m0..m5: four outputs.
template <class V> ADDP_SIMD_INLINE void output_1d(const V* m, V* o) {
  const V s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
  o[0] = m[0] + s12 + s34;
  o[1] = d12 + 2.0f * d34;
  o[2] = s12 + 4.0f * s34;
  o[3] = d12 + 8.0f * d34 + m[5];
}

// Transform the input patches of tiles [t0, t0 + nt) into vb (36, nt, C).
template <class V> ADDP_SIMD_INLINE void transform_input(const Job& j, int64_t t0, int64_t nt, float* vb) {
  constexpr int L = lanes<V>();
  const int64_t C = j.C;
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t t = t0 + i, n = t / (j.TH * j.TW), ty = t / j.TW % j.TH, tx = t % j.TW;
    const int64_t r0 = ty * 4 - 1, c0 = tx * 4 - 1;
    const float* rows[6];
    bool col_in[6];
    for (int a = 0; a < 6; ++a) {
      const int64_t r = r0 + a;
      rows[a] = (r >= 0 && r < j.H) ? j.x + ((n * (j.H >> j.up) + (r >> j.up)) * (j.W >> j.up)) * C : nullptr;
      const int64_t c = c0 + a;
      col_in[a] = c >= 0 && c < j.W;
    }
    for (int64_t cv = 0; cv < C; cv += L) {
      V w[6][6];  // rows of the patch, each transformed along its columns
      for (int a = 0; a < 6; ++a) {
        V d[6];
        for (int b = 0; b < 6; ++b)
          d[b] = (rows[a] && col_in[b]) ? loadu<V>(rows[a] + ((c0 + b) >> j.up) * C + cv) : V{};
        input_1d(d, w[a]);
      }
      for (int b = 0; b < 6; ++b) {
        V col[6], r[6];
        for (int a = 0; a < 6; ++a) col[a] = w[a][b];
        input_1d(col, r);
        for (int a = 0; a < 6; ++a) storeu<V>(vb + ((a * 6 + b) * nt + i) * C + cv, r[a]);
      }
    }
  }
}

// *p in every lane. On AVX2/AVX-512 one broadcast load, written as assembly: GCC compiles
// splat's `V{} + x` to a scalar add of zero then a broadcast, and a lane-by-lane fill to inserts.
template <class V> ADDP_SIMD_INLINE V broadcast(const float* p) {
#ifdef ADDP_SIMD_X86
  if constexpr (sizeof(V) >= 32) {
    V v;
    asm("vbroadcastss %1, %0" : "=v"(v) : "m"(*p));
    return v;
  }
#endif
  return splat<V>(*p);
}

// mb (nt, K) = vb (nt, C) @ u (C, K) for one point, RT rows and NV vectors of K at a time.
template <class V, int RT, int NV>
ADDP_SIMD_INLINE void micro(const float* a, const float* u, float* m, int64_t C, int64_t K, int64_t k0) {
  constexpr int L = lanes<V>();
  V acc[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t c = 0; c < C; ++c) {
    V w[NV];
    for (int v = 0; v < NV; ++v) w[v] = loadu<V>(u + c * K + k0 + v * L);
    for (int r = 0; r < RT; ++r) {
      const V s = broadcast<V>(a + r * C + c);
      for (int v = 0; v < NV; ++v) acc[r][v] += s * w[v];
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int v = 0; v < NV; ++v) storeu<V>(m + r * K + k0 + v * L, acc[r][v]);
}

// Register blocking for 16 vector registers (AVX2): RT * NV accumulators, NV weight vectors
// and one broadcast.
template <class V, int NV> ADDP_SIMD_INLINE void rows_of(const float* a, const float* u, float* m, int64_t nt,
                                                         int64_t C, int64_t K, int64_t k0) {
  constexpr int RT = NV == 1 ? 8 : NV == 2 ? 6 : 4;
  int64_t r = 0;
  for (; r + RT <= nt; r += RT) micro<V, RT, NV>(a + r * C, u, m + r * K, C, K, k0);
  for (; r < nt; ++r) micro<V, 1, NV>(a + r * C, u, m + r * K, C, K, k0);
}

template <class V> ADDP_SIMD_INLINE void multiply(const Job& j, int64_t nt, const float* vb, float* mb) {
  constexpr int L = lanes<V>();
  const int64_t C = j.C, K = j.K;
  for (int p = 0; p < kPoints; ++p) {
    const float* a = vb + p * nt * C;
    const float* u = j.u + p * C * K;
    float* m = mb + p * nt * K;
    int64_t k0 = 0;
    for (; k0 + 3 * L <= K; k0 += 3 * L) rows_of<V, 3>(a, u, m, nt, C, K, k0);
    for (; k0 + 2 * L <= K; k0 += 2 * L) rows_of<V, 2>(a, u, m, nt, C, K, k0);
    for (; k0 + L <= K; k0 += L) rows_of<V, 1>(a, u, m, nt, C, K, k0);
  }
}

// 4x4 output tiles of tiles [t0, t0 + nt) from mb (36, nt, K), plus the bias and the
// residual, into y.
template <class V> ADDP_SIMD_INLINE void transform_output(const Job& j, int64_t t0, int64_t nt, const float* mb) {
  constexpr int L = lanes<V>();
  const int64_t K = j.K;
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t t = t0 + i, n = t / (j.TH * j.TW), ty = t / j.TW % j.TH, tx = t % j.TW;
    const int rows = static_cast<int>(std::min<int64_t>(4, j.H - ty * 4));
    const int cols = static_cast<int>(std::min<int64_t>(4, j.W - tx * 4));
    for (int64_t kv = 0; kv < K; kv += L) {
      V h[4][6];  // A^T applied along the first axis
      for (int b = 0; b < 6; ++b) {
        V m[6], o[4];
        for (int a = 0; a < 6; ++a) m[a] = loadu<V>(mb + ((a * 6 + b) * nt + i) * K + kv);
        output_1d(m, o);
        for (int a = 0; a < 4; ++a) h[a][b] = o[a];
      }
      const V bias = j.bias ? loadu<V>(j.bias + kv) : V{};
      for (int a = 0; a < rows; ++a) {
        V o[4];
        output_1d(h[a], o);
        const int64_t at = ((n * j.H + ty * 4 + a) * j.W + tx * 4) * K + kv;
        if (j.res)
          for (int b = 0; b < cols; ++b) storeu<V>(j.y + at + b * K, o[b] + bias + loadu<V>(j.res + at + b * K));
        else
          for (int b = 0; b < cols; ++b) storeu<V>(j.y + at + b * K, o[b] + bias);
      }
    }
  }
}

// Tiles per block: a multiple of every row blocking of the products (4, 6, 8). Measured at
// 32 and 128 channels, 256 px: 24 beats 12 and 48, and the blocks of 5 that a 192 KiB budget
// gives 128 channels (benchmarks/test_bench_ops.py -k conv3x3 times the op).
constexpr int64_t kBlockTiles = 24;

template <class V> ADDP_SIMD_INLINE void run_blocks(const Job& j, int64_t begin, int64_t end) {
  const int64_t TB = kBlockTiles, total = j.N * j.TH * j.TW;
  std::vector<float> vb(kPoints * TB * j.C), mb(kPoints * TB * j.K);
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t t0 = blk * TB, nt = std::min(TB, total - t0);
    transform_input<V>(j, t0, nt, vb.data());
    multiply<V>(j, nt, vb.data(), mb.data());
    transform_output<V>(j, t0, nt, mb.data());
  }
}

#ifdef ADDP_SIMD_X86
__attribute__((target("avx2,fma"))) void run_avx2(const Job& j, int64_t b, int64_t e) { run_blocks<vf8>(j, b, e); }
__attribute__((target("avx512f,avx2,fma"))) void run_avx512(const Job& j, int64_t b, int64_t e) {
  run_blocks<vf16>(j, b, e);
}
#endif
void run_generic(const Job& j, int64_t b, int64_t e) { run_blocks<vf4>(j, b, e); }

}  // namespace

at::Tensor conv3x3_winograd_cpu(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual, bool upsample) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "conv3x3_winograd: x must be a float32 (N, C, H, W) "
              "tensor, got ", x.scalar_type(), " ", x.sizes());
  const int up = upsample ? 1 : 0;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2) << up, W = x.size(3) << up;
  TORCH_CHECK(u.dim() == 3 && u.size(0) == kPoints && u.size(1) == C && u.scalar_type() == at::kFloat,
              "conv3x3_winograd: the transformed weight must be float32 (36, ", C, ", K), got ", u.scalar_type(), " ",
              u.sizes());
  const int64_t K = u.size(2);
  TORCH_CHECK(C % 4 == 0 && K % 4 == 0, "conv3x3_winograd: channels must be multiples of 4, got ", C, " -> ", K);
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast), uc = u.contiguous();
  at::Tensor y = at::empty({N, K, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  std::optional<at::Tensor> bc;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == K, "conv3x3_winograd: bias must have shape (", K, ",), got ",
                bias->sizes());
    bc = bias->to(at::kFloat).contiguous();
  }
  std::optional<at::Tensor> rc;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == y.sizes() && residual->scalar_type() == at::kFloat,
                "conv3x3_winograd: residual must be a float32 tensor of the output's shape ", y.sizes(), ", got ",
                residual->scalar_type(), " ", residual->sizes());
    rc = residual->contiguous(at::MemoryFormat::ChannelsLast);
  }
  if (y.numel() == 0) return y;
  Job j{xc.data_ptr<float>(), uc.data_ptr<float>(), bc ? bc->data_ptr<float>() : nullptr,
        rc ? rc->data_ptr<float>() : nullptr, y.data_ptr<float>(), N, H, W, C, K, (H + 3) / 4, (W + 3) / 4, up};
  void (*fn)(const Job&, int64_t, int64_t) = run_generic;
#ifdef ADDP_SIMD_X86
  const int L = cpu_isa() == Isa::avx512 ? 16 : cpu_isa() == Isa::avx2 ? 8 : 4;
  if (L == 16 && C % 16 == 0 && K % 16 == 0) fn = run_avx512;
  else if (L >= 8 && C % 8 == 0 && K % 8 == 0) fn = run_avx2;
#endif
  const int64_t blocks = (N * j.TH * j.TW + kBlockTiles - 1) / kBlockTiles;
  at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) { fn(j, b, e); });
  return y;
}

}  // namespace addp
