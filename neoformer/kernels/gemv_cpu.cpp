// Small-batch matrix-vector products for CPU decoding, on weights repacked into row tiles.
//
// Why hand-written (measured on the 2-core Zen 4 of BENCHMARKS.md, 1 thread, the 162M model's linears):
// MKL's fp32 GEMV reads weights at ~14 GB/s and its bf16 GEMV at ~6 GB/s; inductor's fused multiply-reduce
// ((W * x).sum(-1), the RowGemv mode) at ~22 GB/s (fp32) and ~17 GB/s (bf16); PyTorch's
// _weight_int8pack_mm at ~4 GB/s. Reading a weight laid out as row tiles -- tile[t][i][r] = W[t*R + r][i],
// so one column of R rows is one contiguous vector -- is one sequential stream with no horizontal sums,
// and runs at the machine's streaming bandwidth (~27 GB/s here) for every weight type below.
//
// Layouts (R = rows per tile; `out` is padded to a multiple of R with zero rows; ops.py packs them):
//   f32     R = 16  float  [out/16][in][16]
//   bf16    R = 32  bf16   [out/32][in/2][32][2]     two columns of a row per 32-bit lane; bf16 activations
//   int8    R = 32  int8   [out/32][in][32]          w = q * scale[row]; fp32 activations (weight-only)
//   int8x8  R = 16  uint8  [out/16][in/4][16][4]     q + 128, four inputs of a row per 32-bit lane (VNNI);
//                                                    int8 activations with one scale per row of x
//   nf4     R = 32  uint8  [out/32][in][16]          byte j: row j (low nibble), row j + 16 (high);
//                                                    w = NF4[q] * absmax per group (fp32, tiled [out/32][in/group][32])
//   int4x8  R = 16  uint8  [out/16][in/8][16][4]     a lane's low nibbles: inputs k..k+3, high: k+4..k+7;
//                                                    w = (q - 8) * scale + zero per group (bf16, tiled
//                                                    [out/16][in/group][16]); int8 activations per block of 32
// x is (M, in), y is (M, out_padded) fp32. Rows of x are processed kMaxRows at a time so each weight byte is
// read once for all of them (batched decode, speculative verification), and each row's sums run in the same
// order whatever M is: a row's result does not depend on the other rows (batch invariance).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int kMaxRows = 8;  // rows of x per weight pass (register budget: kMaxRows x 2 accumulators)

using neoformer_simd::bf16_to_f32;
using neoformer_simd::exp512;

inline __m512 i8_to_f32(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }

// ---- f32, R = 16 --------------------------------------------------------------------------------
template <int M>
void f32_tile(const float* tile, const float* x, int64_t in, float* y, int64_t ldy) {
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t i = 0; i < in; ++i) {
    __m512 w = _mm512_loadu_ps(tile + 16 * i);
    for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[m * in + i]), acc[m]);
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * ldy, acc[m]);
}

// ---- bf16 and int8, R = 32: two fp32 vectors per column ------------------------------------------
template <int M, typename Load>
void pair_tile(Load load, const float* x, int64_t in, float* y, int64_t ldy, const float* row_scale) {
  __m512 lo[M], hi[M];
  for (int m = 0; m < M; ++m) lo[m] = hi[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < in; ++k) {
    __m512 w0, w1;
    load(k, w0, w1);
    for (int m = 0; m < M; ++m) {
      __m512 xv = _mm512_set1_ps(x[m * in + k]);
      lo[m] = _mm512_fmadd_ps(w0, xv, lo[m]);
      hi[m] = _mm512_fmadd_ps(w1, xv, hi[m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    __m512 a = lo[m], b = hi[m];
    if (row_scale) a = _mm512_mul_ps(a, _mm512_loadu_ps(row_scale)), b = _mm512_mul_ps(b, _mm512_loadu_ps(row_scale + 16));
    _mm512_storeu_ps(y + m * ldy, a);
    _mm512_storeu_ps(y + m * ldy + 16, b);
  }
}

// ---- bf16 x bf16 pairs (AVX512-BF16), R = 32 rows x 2 columns per 128 bytes ---------------------------
// vdpbf16ps adds two exact bf16 x bf16 products per fp32 lane: lane r holds (w[r][k], w[r][k + 1]) and
// the activations are bf16 pairs (a bf16 model's activations are bf16 already). Half the instructions of
// upcasting to fp32 FMAs, which matters once several rows share a pass (speculative verification).
template <int M>
void bf16_tile(const uint16_t* tile, const uint32_t* x_pairs, int64_t pairs, float* y, int64_t ldy) {
  __m512 lo[M], hi[M];
  for (int m = 0; m < M; ++m) lo[m] = hi[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < pairs; ++k) {
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(tile + 64 * k), w1 = (__m512bh)_mm512_loadu_si512(tile + 64 * k + 32);
    for (int m = 0; m < M; ++m) {
      __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x_pairs[m * pairs + k]));
      lo[m] = _mm512_dpbf16_ps(lo[m], w0, xv);
      hi[m] = _mm512_dpbf16_ps(hi[m], w1, xv);
    }
  }
  for (int m = 0; m < M; ++m) {
    _mm512_storeu_ps(y + m * ldy, lo[m]);
    _mm512_storeu_ps(y + m * ldy + 16, hi[m]);
  }
}

// ---- int8 x int8 (VNNI), R = 16 rows x 4 columns per 64-byte vector ---------------------------------
// vpdpbusd multiplies unsigned by signed bytes, so the weight is stored as q + 128 (uint8) and the
// activations stay signed: sum((q + 128) * xq) = sum(q * xq) + 128 * sum(xq), corrected per row of x.
template <int M>
void int8x8_tile(const uint8_t* tile, const int8_t* xq, int64_t in, const int32_t* xq_sum, const float* x_scale,
                 const float* w_scale, float* y, int64_t ldy) {
  // integer sums are exact in any order: a few rows get several accumulators (vpdpbusd latency) and stay
  // bit-identical to the one-accumulator sums of larger batches
  constexpr int U = M == 1 ? 4 : (M == 2 ? 2 : 1);
  __m512i acc[M][U];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 4 * U <= in; k += 4 * U)
    for (int u = 0; u < U; ++u) {
      __m512i w = _mm512_loadu_si512(tile + 16 * (k + 4 * u));
      for (int m = 0; m < M; ++m) {
        int32_t four;
        std::memcpy(&four, xq + m * in + k + 4 * u, 4);
        acc[m][u] = _mm512_dpbusd_epi32(acc[m][u], w, _mm512_set1_epi32(four));
      }
    }
  for (; k < in; k += 4) {
    __m512i w = _mm512_loadu_si512(tile + 16 * k);
    for (int m = 0; m < M; ++m) {
      int32_t four;
      std::memcpy(&four, xq + m * in + k, 4);
      acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], w, _mm512_set1_epi32(four));
    }
  }
  __m512 ws = _mm512_loadu_ps(w_scale);
  for (int m = 0; m < M; ++m) {
    __m512i sum = acc[m][0];
    for (int u = 1; u < U; ++u) sum = _mm512_add_epi32(sum, acc[m][u]);
    __m512i exact = _mm512_sub_epi32(sum, _mm512_set1_epi32(128 * xq_sum[m]));
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(exact), _mm512_set1_ps(x_scale[m]));
    _mm512_storeu_ps(y + m * ldy, _mm512_mul_ps(v, ws));
  }
}

// ---- int4 x int8 (VNNI), R = 16 rows x 8 columns per 64-byte vector -------------------------------------
// Lane r (row r) of a vector holds columns k..k+3 in its low nibbles and k+4..k+7 in its high nibbles.
// Activations are int8 per block of 32 columns (scale xs, sum of codes xsum); w = q * a + b per group:
//   sum_k w_k x_k = sum_blocks xs * (a * sum_k q_k xq_k + b * xsum)
// (uint16_t: the bits of bf16 values)
template <int M>
void int4x8_tile(const uint8_t* tile, const uint16_t* scale, const uint16_t* zero, const int8_t* xq, const float* xs,
                 const float* xsum, int64_t in, int64_t group, float* y, int64_t ldy) {
  constexpr int64_t kBlock = 32;
  const int64_t blocks = in / kBlock, per_group = group / kBlock;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 out[M];
  for (int m = 0; m < M; ++m) out[m] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < blocks; ++blk) {
    // integer sums: exact in any order, so small batches split them over more dependency chains
    constexpr int U = M <= 2 ? 2 : 1;
    __m512i acc_lo[M][U], acc_hi[M][U];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) acc_lo[m][u] = acc_hi[m][u] = _mm512_setzero_si512();
    for (int64_t k = blk * kBlock; k < (blk + 1) * kBlock; k += 8 * U) {
      for (int u = 0; u < U; ++u) {
        const int64_t c = k + 8 * u;
        __m512i v = _mm512_loadu_si512(tile + 8 * c);  // 16 rows x 8 columns
        __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        for (int m = 0; m < M; ++m) {
          int32_t x0, x1;
          std::memcpy(&x0, xq + m * in + c, 4);
          std::memcpy(&x1, xq + m * in + c + 4, 4);
          acc_lo[m][u] = _mm512_dpbusd_epi32(acc_lo[m][u], lo, _mm512_set1_epi32(x0));
          acc_hi[m][u] = _mm512_dpbusd_epi32(acc_hi[m][u], hi, _mm512_set1_epi32(x1));
        }
      }
    }
    const int64_t g = blk / per_group;
    // w = (q - 8) * s + z = q * a + b with a = s, b = z - 8 s (the stored bf16 scale and zero, tiled)
    __m512 ag = bf16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale + 16 * g)));
    __m512 bg = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), ag,
                                 bf16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(zero + 16 * g))));
    for (int m = 0; m < M; ++m) {
      __m512 scale = _mm512_set1_ps(xs[m * blocks + blk]);
      __m512i sum = _mm512_add_epi32(acc_lo[m][0], acc_hi[m][0]);
      for (int u = 1; u < U; ++u) sum = _mm512_add_epi32(sum, _mm512_add_epi32(acc_lo[m][u], acc_hi[m][u]));
      __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), scale);
      out[m] = _mm512_fmadd_ps(ag, dot, out[m]);
      out[m] = _mm512_fmadd_ps(bg, _mm512_set1_ps(xs[m * blocks + blk] * xsum[m * blocks + blk]), out[m]);
    }
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * ldy, out[m]);
}

// ---- nf4 (weight-only), R = 32 rows, 16 bytes per column --------------------------------------------
// byte j of a column: row j (low nibble), row j + 16 (high nibble). The 16 NF4 levels sit in one register
// and vpermps looks 16 codes up at once; fp32 activations, sums per group, then times the group's absmax.
const float kNF4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                        -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                        0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
                        0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

template <int M>
void nf4_tile(const uint8_t* tile, const float* absmax, const float* x, int64_t in, int64_t group, float* y,
              int64_t ldy) {
  const __m512 levels = _mm512_loadu_ps(kNF4);
  const __m128i nibble = _mm_set1_epi8(0x0F);
  __m512 out_lo[M], out_hi[M];
  for (int m = 0; m < M; ++m) out_lo[m] = out_hi[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < in / group; ++g) {
    __m512 lo[M], hi[M];
    for (int m = 0; m < M; ++m) lo[m] = hi[m] = _mm512_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {
      __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + 16 * k));
      __m512 w0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, nibble)), levels);
      __m512 w1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), nibble)), levels);
      for (int m = 0; m < M; ++m) {
        __m512 xv = _mm512_set1_ps(x[m * in + k]);
        lo[m] = _mm512_fmadd_ps(w0, xv, lo[m]);
        hi[m] = _mm512_fmadd_ps(w1, xv, hi[m]);
      }
    }
    __m512 a0 = _mm512_loadu_ps(absmax + 32 * g), a1 = _mm512_loadu_ps(absmax + 32 * g + 16);
    for (int m = 0; m < M; ++m) {
      out_lo[m] = _mm512_fmadd_ps(a0, lo[m], out_lo[m]);
      out_hi[m] = _mm512_fmadd_ps(a1, hi[m], out_hi[m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    _mm512_storeu_ps(y + m * ldy, out_lo[m]);
    _mm512_storeu_ps(y + m * ldy + 16, out_hi[m]);
  }
}

// ---- activation quantization inside the int8-activation ops --------------------------------------------
// Measured (162M int8-dynamic decode, 1 thread): quantizing x in Python took ~8 ATen ops per linear, ~85
// linears per token. Here it is one pass over x. Same arithmetic as quantize/kernels.py quantize_rows_int8 and
// ops.py quantize_blocks: scale = max(amax |x|, 1e-12) / 127, q = round-half-even(x / scale) clamped to
// +-127, with IEEE division as torch's, so the codes and scales are bit-identical to the Python path.
inline float abs_max(const float* x, int64_t n) {  // n % 16 == 0
  __m512 m = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  return _mm512_reduce_max_ps(m);
}

inline float code_scale(float amax) { return std::max(amax, 1e-12f) / 127.0f; }

inline int32_t quantize_span(const float* x, int64_t n, float scale, int8_t* q) {  // returns the sum of codes
  const __m512 s = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  __m512i total = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 16) {
    __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512i c = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
    total = _mm512_add_epi32(total, c);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtsepi32_epi8(c));
  }
  return _mm512_reduce_add_epi32(total);
}

// ---- dispatch over tiles (threads) and row blocks -------------------------------------------------
template <typename TileFn>
void for_tiles(int64_t tiles, int64_t rows, TileFn fn) {
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
      const int m = static_cast<int>(std::min<int64_t>(kMaxRows, rows - r0));
      for (int64_t t = begin; t < end; ++t) fn(t, r0, m);
    }
  });
}

#define NEOFORMER_DISPATCH_ROWS(m, CALL) \
  switch (m) {                           \
    case 1: CALL(1); break;              \
    case 2: CALL(2); break;              \
    case 3: CALL(3); break;              \
    case 4: CALL(4); break;              \
    case 5: CALL(5); break;              \
    case 6: CALL(6); break;              \
    case 7: CALL(7); break;              \
    default: CALL(8); break;             \
  }

void check_x(const at::Tensor& x, int64_t in) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 (rows, ", in, ") tensor");
}

at::Tensor gemv_f32(const at::Tensor& packed, const at::Tensor& x) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 16 && packed.scalar_type() == at::kFloat && packed.is_contiguous());
  const int64_t tiles = packed.size(0), in = packed.size(1), rows = x.size(0), out = tiles * 16;
  check_x(x, in);
  auto y = at::empty({rows, out}, x.options());
  const float* P = packed.data_ptr<float>();
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  for_tiles(tiles, rows, [&](int64_t t, int64_t r0, int m) {
#define CALL(M) f32_tile<M>(P + t * in * 16, X + r0 * in, in, Y + r0 * out + t * 16, out)
    NEOFORMER_DISPATCH_ROWS(m, CALL)
#undef CALL
  });
  return y;
}

at::Tensor gemv_bf16(const at::Tensor& packed, const at::Tensor& x) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 64 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous());
  const int64_t tiles = packed.size(0), pairs = packed.size(1), in = pairs * 2, rows = x.size(0), out = tiles * 32;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be a contiguous bfloat16 (rows, ", in, ") tensor");
  auto y = at::empty({rows, out}, x.options().dtype(at::kFloat));
  const uint16_t* P = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  const uint32_t* X = reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>());
  float* Y = y.data_ptr<float>();
  for_tiles(tiles, rows, [&](int64_t t, int64_t r0, int m) {
#define CALL(M) bf16_tile<M>(P + t * pairs * 64, X + r0 * pairs, pairs, Y + r0 * out + t * 32, out)
    NEOFORMER_DISPATCH_ROWS(m, CALL)
#undef CALL
  });
  return y;
}

at::Tensor gemv_int8(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& x) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 32 && packed.scalar_type() == at::kChar && packed.is_contiguous());
  const int64_t tiles = packed.size(0), in = packed.size(1), rows = x.size(0), out = tiles * 32;
  TORCH_CHECK(scales.numel() == out && scales.scalar_type() == at::kFloat && scales.is_contiguous());
  check_x(x, in);
  auto y = at::empty({rows, out}, x.options());
  const int8_t* P = packed.data_ptr<int8_t>();
  const float* S = scales.data_ptr<float>();
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  for_tiles(tiles, rows, [&](int64_t t, int64_t r0, int m) {
    const int8_t* tile = P + t * in * 32;
    auto load = [tile](int64_t k, __m512& w0, __m512& w1) {
      const __m128i* p = reinterpret_cast<const __m128i*>(tile + 32 * k);
      w0 = i8_to_f32(_mm_loadu_si128(p));
      w1 = i8_to_f32(_mm_loadu_si128(p + 1));
    };
#define CALL(M) pair_tile<M>(load, X + r0 * in, in, Y + r0 * out + t * 32, out, S + t * 32)
    NEOFORMER_DISPATCH_ROWS(m, CALL)
#undef CALL
  });
  return y;
}

at::Tensor int8x8_run(const at::Tensor& packed, const at::Tensor& w_scale, const int8_t* X, const int32_t* XS,
                      const float* SX, int64_t rows) {
  const int64_t tiles = packed.size(0), in = packed.size(1) * 4, out = tiles * 16;
  TORCH_CHECK(w_scale.numel() == out && w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous());
  auto y = at::empty({rows, out}, w_scale.options());
  const uint8_t* P = packed.data_ptr<uint8_t>();
  const float* SW = w_scale.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  for_tiles(tiles, rows, [&](int64_t t, int64_t r0, int m) {
#define CALL(M) int8x8_tile<M>(P + t * in * 16, X + r0 * in, in, XS + r0, SX + r0, SW + t * 16, Y + r0 * out + t * 16, out)
    NEOFORMER_DISPATCH_ROWS(m, CALL)
#undef CALL
  });
  return y;
}

void check_int8x8(const at::Tensor& packed) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 64 && packed.scalar_type() == at::kByte && packed.is_contiguous());
}

at::Tensor gemv_int8x8(const at::Tensor& packed, const at::Tensor& w_scale, const at::Tensor& xq,
                       const at::Tensor& x_scale) {
  check_int8x8(packed);
  const int64_t in = packed.size(1) * 4, rows = xq.size(0);
  TORCH_CHECK(xq.dim() == 2 && xq.size(1) == in && xq.scalar_type() == at::kChar && xq.is_contiguous(),
              "xq must be a contiguous int8 (rows, ", in, ") tensor");
  TORCH_CHECK(x_scale.numel() == rows && x_scale.scalar_type() == at::kFloat && x_scale.is_contiguous());
  auto xq_sum = xq.sum(-1, false, at::kInt).contiguous();
  return int8x8_run(packed, w_scale, xq.data_ptr<int8_t>(), xq_sum.data_ptr<int32_t>(), x_scale.data_ptr<float>(), rows);
}

// fp32 x: quantized per row here (see activation quantization above)
at::Tensor gemv_int8x8_f32(const at::Tensor& packed, const at::Tensor& w_scale, const at::Tensor& x) {
  check_int8x8(packed);
  const int64_t in = packed.size(1) * 4, rows = x.size(0);
  check_x(x, in);
  std::vector<int8_t> xq(rows * in);
  std::vector<int32_t> sums(rows);
  std::vector<float> scales(rows);
  const float* X = x.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    scales[r] = code_scale(abs_max(X + r * in, in));
    sums[r] = quantize_span(X + r * in, in, scales[r], xq.data() + r * in);
  }
  return int8x8_run(packed, w_scale, xq.data(), sums.data(), scales.data(), rows);
}

void check_int4x8(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros, int64_t group) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 64 && packed.scalar_type() == at::kByte && packed.is_contiguous());
  const int64_t in = packed.size(1) * 8, out = packed.size(0) * 16;
  TORCH_CHECK(group % 32 == 0 && in % group == 0, "group must be a multiple of 32 that divides the input width");
  TORCH_CHECK(scales.numel() == out * (in / group) && zeros.numel() == out * (in / group) && scales.is_contiguous() &&
              zeros.is_contiguous() && scales.scalar_type() == at::kBFloat16 && zeros.scalar_type() == at::kBFloat16);
}

at::Tensor int4x8_run(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros, const int8_t* X,
                      const float* XSC, const float* XS, int64_t rows, int64_t group) {
  const int64_t tiles = packed.size(0), in = packed.size(1) * 8, out = tiles * 16;
  const int64_t groups = in / group, blocks = in / 32;
  auto y = at::empty({rows, out}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* P = packed.data_ptr<uint8_t>();
  const uint16_t* S = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  const uint16_t* Z = reinterpret_cast<const uint16_t*>(zeros.data_ptr<at::BFloat16>());
  float* Y = y.data_ptr<float>();
  for_tiles(tiles, rows, [&](int64_t t, int64_t r0, int m) {
#define CALL(M) int4x8_tile<M>(P + t * in * 8, S + t * groups * 16, Z + t * groups * 16, X + r0 * in, \
                               XSC + r0 * blocks, XS + r0 * blocks, in, group, Y + r0 * out + t * 16, out)
    NEOFORMER_DISPATCH_ROWS(m, CALL)
#undef CALL
  });
  return y;
}

at::Tensor gemv_int4x8(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& xq,
                       const at::Tensor& xs, const at::Tensor& xsum, int64_t group) {
  check_int4x8(packed, scales, zeros, group);
  const int64_t in = packed.size(1) * 8, rows = xq.size(0), blocks = in / 32;
  TORCH_CHECK(xq.dim() == 2 && xq.size(1) == in && xq.scalar_type() == at::kChar && xq.is_contiguous(),
              "xq must be a contiguous int8 (rows, ", in, ") tensor");
  TORCH_CHECK(xs.numel() == rows * blocks && xsum.numel() == rows * blocks && xs.is_contiguous() && xsum.is_contiguous() &&
              xs.scalar_type() == at::kFloat && xsum.scalar_type() == at::kFloat);
  return int4x8_run(packed, scales, zeros, xq.data_ptr<int8_t>(), xs.data_ptr<float>(), xsum.data_ptr<float>(), rows, group);
}

// fp32 x: quantized per block of 32 inputs here (see activation quantization above)
at::Tensor gemv_int4x8_f32(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                           const at::Tensor& x, int64_t group) {
  check_int4x8(packed, scales, zeros, group);
  const int64_t in = packed.size(1) * 8, rows = x.size(0), blocks = in / 32;
  check_x(x, in);
  std::vector<int8_t> xq(rows * in);
  std::vector<float> xs(rows * blocks), xsum(rows * blocks);
  const float* X = x.data_ptr<float>();
  for (int64_t b = 0; b < rows * blocks; ++b) {
    xs[b] = code_scale(abs_max(X + 32 * b, 32));
    xsum[b] = static_cast<float>(quantize_span(X + 32 * b, 32, xs[b], xq.data() + 32 * b));
  }
  return int4x8_run(packed, scales, zeros, xq.data(), xs.data(), xsum.data(), rows, group);
}

at::Tensor gemv_nf4(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& x, int64_t group) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 16 && packed.scalar_type() == at::kByte && packed.is_contiguous());
  const int64_t tiles = packed.size(0), in = packed.size(1), rows = x.size(0), out = tiles * 32;
  TORCH_CHECK(group > 0 && in % group == 0, "group must divide the input width");
  TORCH_CHECK(absmax.numel() == out * (in / group) && absmax.scalar_type() == at::kFloat && absmax.is_contiguous());
  check_x(x, in);
  auto y = at::empty({rows, out}, x.options());
  const uint8_t* P = packed.data_ptr<uint8_t>();
  const float *A = absmax.data_ptr<float>(), *X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t groups = in / group;
  for_tiles(tiles, rows, [&](int64_t t, int64_t r0, int m) {
#define CALL(M) nf4_tile<M>(P + t * in * 16, A + t * groups * 32, X + r0 * in, in, group, Y + r0 * out + t * 32, out)
    NEOFORMER_DISPATCH_ROWS(m, CALL)
#undef CALL
  });
  return y;
}

// ---- attention for a few queries (decode steps) --------------------------------------------------
// PyTorch's CPU flash kernel spends ~50 us on one 12-head query against 256 cached keys (and a bf16
// cache is upcast whole first); the products themselves are ~0.4 MFLOP. Per (batch row, KV head): the
// scores of every query row of its query heads, a softmax, and the weighted sum of V, all in fp32.

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) { return bf16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {  // round to nearest even, as at::BFloat16 does
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}

// one query row: out = softmax(scale * q K^T over the allowed keys) V
template <typename T, typename Q>
void attend_row(const Q* q, const T* K, int64_t k_row, const T* V, int64_t v_row, int64_t keys, const bool* allowed,
                int64_t limit, float scale, int64_t D, float* scores, Q* out) {
  constexpr float kMasked = -std::numeric_limits<float>::infinity();
  __m512 qv[16];  // D <= 256
  for (int64_t d = 0; d < D; d += 16) qv[d / 16] = _mm512_mul_ps(load16(q + d), _mm512_set1_ps(scale));
  float best = kMasked;
  for (int64_t j = 0; j < keys; ++j) {
    if (j >= limit || (allowed && !allowed[j])) {
      scores[j] = kMasked;
      continue;
    }
    const T* kj = K + j * k_row;
    __m512 acc = _mm512_mul_ps(qv[0], load16(kj));
    for (int64_t d = 16; d < D; d += 16) acc = _mm512_fmadd_ps(qv[d / 16], load16(kj + d), acc);
    scores[j] = _mm512_reduce_add_ps(acc);
    best = std::max(best, scores[j]);
  }
  __m512 total = _mm512_setzero_ps(), shift = _mm512_set1_ps(best), masked = _mm512_set1_ps(kMasked);
  // Every key goes through the same vector exp and the same lane of the sum, the last block read under a
  // mask: a row's result then does not depend on how many keys the cache holds past it (a decode step
  // and a speculative verification see different counts), which keeps greedy speculative output exact.
  for (int64_t j = 0; j < keys; j += 16) {
    const int64_t n = std::min<int64_t>(16, keys - j);
    const __mmask16 live = n == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
    __m512 sv = _mm512_mask_loadu_ps(masked, live, scores + j);
    __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(sv, masked, _CMP_NEQ_OQ), exp512(_mm512_sub_ps(sv, shift)));
    _mm512_mask_storeu_ps(scores + j, live, e);
    total = _mm512_add_ps(total, e);
  }
  const float sum = _mm512_reduce_add_ps(total);
  __m512 acc[16];
  for (int64_t d = 0; d < D; d += 16) acc[d / 16] = _mm512_setzero_ps();
  for (int64_t i = 0; i < keys; ++i) {
    if (scores[i] == 0.0f) continue;
    __m512 p = _mm512_set1_ps(scores[i]);
    const T* vi = V + i * v_row;
    for (int64_t d = 0; d < D; d += 16) acc[d / 16] = _mm512_fmadd_ps(p, load16(vi + d), acc[d / 16]);
  }
  __m512 inv = _mm512_set1_ps(sum > 0.0f ? 1.0f / sum : 0.0f);
  for (int64_t d = 0; d < D; d += 16) store16(out + d, _mm512_mul_ps(acc[d / 16], inv));
}

template <typename T, typename Q>
void attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, bool causal,
                    double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1), keys = k.size(2);
  const int64_t group = H / Hkv;
  const Q* Qp = reinterpret_cast<const Q*>(q.data_ptr());
  const T* Kp = reinterpret_cast<const T*>(k.data_ptr());
  const T* Vp = reinterpret_cast<const T*>(v.data_ptr());
  Q* Op = reinterpret_cast<Q*>(out.data_ptr());
  const bool* Mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const int64_t mask_batch = mask.defined() && mask.size(0) > 1 ? L * keys : 0;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(keys);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, hk = task % Hkv;
      const T* K = Kp + b * k.stride(0) + hk * k.stride(1);
      const T* V = Vp + b * v.stride(0) + hk * v.stride(1);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
        for (int64_t i = 0; i < L; ++i) {
          const bool* allowed = Mp ? Mp + b * mask_batch + i * keys : nullptr;
          const int64_t limit = causal ? keys - L + i + 1 : keys;
          attend_row<T, Q>(Qp + b * q.stride(0) + h * q.stride(1) + i * q.stride(2), K, k.stride(2), V, v.stride(2), keys,
                           allowed, limit, static_cast<float>(scale), D, scores.data(),
                           Op + ((b * H + h) * L + i) * D);
        }
    }
  });
}

// q (B, H, L, D), k / v (B, Hkv, keys, D) with unit stride in D; mask: undefined or bool (B|1, L, keys)
at::Tensor small_query_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& mask, bool causal, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(3) % 16 == 0 && q.size(3) <= 256);
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "the head dimension must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3) && q.size(1) % k.size(1) == 0);
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16));
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16);
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    m = mask->contiguous();
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 3 && m.size(1) == q.size(2) && m.size(2) == k.size(2) &&
                (m.size(0) == 1 || m.size(0) == q.size(0)), "mask must be bool (B|1, L, keys)");
  }
  auto out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  const bool q32 = q.scalar_type() == at::kFloat, kv32 = k.scalar_type() == at::kFloat;
  if (q32 && kv32) attention_impl<float, float>(q, k, v, m, causal, scale, out);
  else if (q32) attention_impl<at::BFloat16, float>(q, k, v, m, causal, scale, out);
  else if (kv32) attention_impl<float, at::BFloat16>(q, k, v, m, causal, scale, out);
  else attention_impl<at::BFloat16, at::BFloat16>(q, k, v, m, causal, scale, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(neoformer_cpu, m) {
  m.def("small_query_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float scale) -> Tensor");
  m.def("gemv_f32(Tensor packed, Tensor x) -> Tensor");
  m.def("gemv_bf16(Tensor packed, Tensor x) -> Tensor");
  m.def("gemv_int8(Tensor packed, Tensor scales, Tensor x) -> Tensor");
  m.def("gemv_nf4(Tensor packed, Tensor absmax, Tensor x, int group) -> Tensor");
  m.def("gemv_int8x8(Tensor packed, Tensor w_scale, Tensor xq, Tensor x_scale) -> Tensor");
  m.def("gemv_int4x8(Tensor packed, Tensor scales, Tensor zeros, Tensor xq, Tensor xs, Tensor xsum, int group) -> Tensor");
  m.def("gemv_int8x8_f32(Tensor packed, Tensor w_scale, Tensor x) -> Tensor");
  m.def("gemv_int4x8_f32(Tensor packed, Tensor scales, Tensor zeros, Tensor x, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(neoformer_cpu, CPU, m) {
  m.impl("small_query_attention", &small_query_attention);
  m.impl("gemv_f32", &gemv_f32);
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_nf4", &gemv_nf4);
  m.impl("gemv_int8x8", &gemv_int8x8);
  m.impl("gemv_int4x8", &gemv_int4x8);
  m.impl("gemv_int8x8_f32", &gemv_int8x8_f32);
  m.impl("gemv_int4x8_f32", &gemv_int4x8_f32);
}
