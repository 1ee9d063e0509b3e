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
//   int4x8  R = 16  uint8  [out/16][in/8][16][4]     a lane's low nibbles: inputs k..k+3, high: k+4..k+7;
//                                                    w = (q - 8) * scale + zero per group (bf16, tiled
//                                                    [out/16][in/group][16]); int8 activations per block of 32
//   nf4x8   R = 16  as int4x8                        w = NF4[q] * absmax per group (fp32, tiled as int4's scales),
//                                                    NF4 levels rounded to 1/127 of absmax; int8 activations
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
#include <vector>

namespace {

constexpr int kMaxRows = 8;  // rows of x per weight pass (register budget: kMaxRows x 2 accumulators)
// Software prefetch of the weight stream, two distances: into L1 1 KiB ahead and into L2 8 KiB ahead. Measured
// (Xeon, 1 thread, the 162M model's 85 int4 linears, 77.5 MB per pass, best of 20; this shared host's L3 swings):
// none 9.1 GB/s; one T0 prefetch 1 KiB 11-14.5, 2 KiB 14-15.4, 4 KiB 11-21; T0 1 KiB + T2 8 KiB 16-24.8 (median
// of 5 interleaved runs 24.1 vs 20.7 for T0 4 KiB alone): the hardware prefetcher stalls at every 4 KiB page.
constexpr int kPrefetchL1Bytes = 1024, kPrefetchL2Bytes = 8192;

inline void prefetch_ahead(const void* p) {  // a hint: reading past the end of a buffer is harmless
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchL1Bytes, _MM_HINT_T0);
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchL2Bytes, _MM_HINT_T2);
}

using neoformer_simd::bf16_to_f32;

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
    prefetch_ahead(tile + 64 * k);  // 128 bytes per step: both lines
    prefetch_ahead(tile + 64 * k + 32);
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
      prefetch_ahead(tile + 16 * (k + 4 * u));
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

// ---- 4-bit codes x int8 (VNNI), R = 16 rows x 8 columns per 64-byte vector: int4 and nf4 ----------------
// Lane r (row r) of a vector holds columns k..k+3 in its low nibbles and k+4..k+7 in its high nibbles.
// Activations are int8 per block of 32 columns (scale xs, sum of codes xsum); w = c * a + b per group, where c
// is the nibble itself (int4) or its entry in a 16-byte table, looked up 64 at a time by vpshufb (nf4):
//   sum_k w_k x_k = sum_blocks xs * (a * sum_k c_k xq_k + b * xsum)
// Measured (162M nf4 decode, 1 thread, the Xeon of BENCHMARKS.md): the fp32 lookup kernel this replaced ran
// 2 vpermps + 2 conversions per 32 weights on one shuffle port, ~100 tok/s against int4's ~190.
struct Int4Groups {  // bf16 scale s and zero z per group (their bits): w = (q - 8) s + z, so a = s, b = z - 8 s
  const uint16_t *scale, *zero;
  static constexpr bool kLookup = false;
  void load(int64_t g, __m512& a, __m512& b) const {
    a = bf16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale + 16 * g)));
    b = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), a,
                         bf16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(zero + 16 * g))));
  }
};

struct Nf4Groups {  // fp32 absmax per group; table[q] = round(127 NF4[q]) + 128, so a = absmax / 127, b = -128 a
  const float* absmax;
  static constexpr bool kLookup = true;
  void load(int64_t g, __m512& a, __m512& b) const {
    a = _mm512_div_ps(_mm512_loadu_ps(absmax + 16 * g), _mm512_set1_ps(127.0f));
    b = _mm512_mul_ps(_mm512_set1_ps(-128.0f), a);
  }
};

template <int M, class Groups>
void nibble_x8_tile(const uint8_t* tile, const Groups& groups, __m512i table, const int8_t* xq, const float* xs,
                    const float* x_bias, int64_t in, int64_t group, float* y, int64_t ldy) {
  // x_bias[g] = sum over the group's blocks of xs * xsum: the zero term b * x_bias is added once per group
  constexpr int64_t kBlock = 32;
  const int64_t blocks = in / kBlock, per_group = group / kBlock, groups_n = in / group;
  const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8(static_cast<char>(0xF0));
  __m512 out[M];
  for (int m = 0; m < M; ++m) out[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups_n; ++g) {
    __m512 dots[M];  // sum over the group's blocks of xs * (integer dot of the block)
    for (int m = 0; m < M; ++m) dots[m] = _mm512_setzero_ps();
    for (int64_t blk = g * per_group; blk < (g + 1) * per_group; ++blk) {
      // integer sums: exact in any order, so small batches split them over more dependency chains
      constexpr int U = M <= 2 ? 2 : 1;
      __m512i acc_lo[M][U], acc_hi[M][U];
      for (int m = 0; m < M; ++m)
        for (int u = 0; u < U; ++u) acc_lo[m][u] = acc_hi[m][u] = _mm512_setzero_si512();
      for (int64_t k = blk * kBlock; k < (blk + 1) * kBlock; k += 8 * U) {
        for (int u = 0; u < U; ++u) {
          const int64_t c = k + 8 * u;
          prefetch_ahead(tile + 8 * c);
          __m512i v = _mm512_loadu_si512(tile + 8 * c);  // 16 rows x 8 columns
          __m512i lo, hi;
          if constexpr (Groups::kLookup) {
            lo = _mm512_shuffle_epi8(table, _mm512_and_si512(v, low));
            hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
          } else {  // the high nibble left in place: 16 x its code, divided out of the block's exact sum
            lo = _mm512_and_si512(v, low);
            hi = _mm512_and_si512(v, high);
          }
          for (int m = 0; m < M; ++m) {
            int32_t x0, x1;
            std::memcpy(&x0, xq + m * in + c, 4);
            std::memcpy(&x1, xq + m * in + c + 4, 4);
            acc_lo[m][u] = _mm512_dpbusd_epi32(acc_lo[m][u], lo, _mm512_set1_epi32(x0));
            acc_hi[m][u] = _mm512_dpbusd_epi32(acc_hi[m][u], hi, _mm512_set1_epi32(x1));
          }
        }
      }
      for (int m = 0; m < M; ++m) {
        __m512i lo = acc_lo[m][0], hi = acc_hi[m][0];
        for (int u = 1; u < U; ++u) lo = _mm512_add_epi32(lo, acc_lo[m][u]), hi = _mm512_add_epi32(hi, acc_hi[m][u]);
        if constexpr (!Groups::kLookup) hi = _mm512_srai_epi32(hi, 4);
        dots[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), _mm512_set1_ps(xs[m * blocks + blk]),
                                  dots[m]);
      }
    }
    __m512 ag, bg;
    groups.load(g, ag, bg);
    for (int m = 0; m < M; ++m) {
      out[m] = _mm512_fmadd_ps(ag, dots[m], out[m]);
      out[m] = _mm512_fmadd_ps(bg, _mm512_set1_ps(x_bias[m * groups_n + g]), out[m]);
    }
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * ldy, out[m]);
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

void check_nibbles(const at::Tensor& packed, int64_t group) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 64 && packed.scalar_type() == at::kByte && packed.is_contiguous());
  const int64_t in = packed.size(1) * 8;
  TORCH_CHECK(group % 32 == 0 && in % group == 0, "group must be a multiple of 32 that divides the input width");
}

void check_groups(const at::Tensor& t, const at::Tensor& packed, int64_t group, at::ScalarType type) {
  const int64_t in = packed.size(1) * 8, out = packed.size(0) * 16;
  TORCH_CHECK(t.numel() == out * (in / group) && t.is_contiguous() && t.scalar_type() == type,
              "per-group tensors must be contiguous (out/16, in/group, 16) of the kernel's dtype");
}

// X: int8 codes (rows, in); XSC / XS: per block of 32, the scale and the sum of codes
template <class GroupsAt>
at::Tensor nibble_x8_run(const at::Tensor& packed, GroupsAt groups_at, __m512i table, const int8_t* X,
                         const float* XSC, const float* XS, int64_t rows, int64_t group) {
  const int64_t tiles = packed.size(0), in = packed.size(1) * 8, out = tiles * 16, blocks = in / 32;
  const int64_t groups_n = in / group, per_group = group / 32;
  std::vector<float> bias(rows * groups_n, 0.0f);  // per row and group: sum of the blocks' scale x code sum
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < blocks; ++b) bias[r * groups_n + b / per_group] += XSC[r * blocks + b] * XS[r * blocks + b];
  auto y = at::empty({rows, out}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* P = packed.data_ptr<uint8_t>();
  const float* B = bias.data();
  float* Y = y.data_ptr<float>();
  for_tiles(tiles, rows, [&](int64_t t, int64_t r0, int m) {
    const auto groups = groups_at(t);
#define CALL(M) nibble_x8_tile<M>(P + t * in * 8, groups, table, X + r0 * in, XSC + r0 * blocks, B + r0 * groups_n, \
                                  in, group, Y + r0 * out + t * 16, out)
    NEOFORMER_DISPATCH_ROWS(m, CALL)
#undef CALL
  });
  return y;
}

// fp32 x quantized per block of 32 inputs (see activation quantization above)
struct BlockCodes {
  std::vector<int8_t> q;
  std::vector<float> scale, sum;
};

BlockCodes quantize_x_blocks(const at::Tensor& x, int64_t in) {
  check_x(x, in);
  const int64_t n = x.size(0) * (in / 32);
  BlockCodes c{std::vector<int8_t>(x.size(0) * in), std::vector<float>(n), std::vector<float>(n)};
  const float* X = x.data_ptr<float>();
  for (int64_t b = 0; b < n; ++b) {
    c.scale[b] = code_scale(abs_max(X + 32 * b, 32));
    c.sum[b] = static_cast<float>(quantize_span(X + 32 * b, 32, c.scale[b], c.q.data() + 32 * b));
  }
  return c;
}

auto int4_groups(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros, int64_t group) {
  check_nibbles(packed, group);
  check_groups(scales, packed, group, at::kBFloat16);
  check_groups(zeros, packed, group, at::kBFloat16);
  const int64_t stride = (packed.size(1) * 8 / group) * 16;
  const uint16_t* S = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  const uint16_t* Z = reinterpret_cast<const uint16_t*>(zeros.data_ptr<at::BFloat16>());
  return [=](int64_t t) { return Int4Groups{S + t * stride, Z + t * stride}; };
}

at::Tensor gemv_int4x8(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& xq,
                       const at::Tensor& xs, const at::Tensor& xsum, int64_t group) {
  auto groups_at = int4_groups(packed, scales, zeros, group);
  const int64_t in = packed.size(1) * 8, rows = xq.size(0), blocks = in / 32;
  TORCH_CHECK(xq.dim() == 2 && xq.size(1) == in && xq.scalar_type() == at::kChar && xq.is_contiguous(),
              "xq must be a contiguous int8 (rows, ", in, ") tensor");
  TORCH_CHECK(xs.numel() == rows * blocks && xsum.numel() == rows * blocks && xs.is_contiguous() && xsum.is_contiguous() &&
              xs.scalar_type() == at::kFloat && xsum.scalar_type() == at::kFloat);
  return nibble_x8_run(packed, groups_at, _mm512_setzero_si512(), xq.data_ptr<int8_t>(), xs.data_ptr<float>(),
                       xsum.data_ptr<float>(), rows, group);
}

at::Tensor gemv_int4x8_f32(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                           const at::Tensor& x, int64_t group) {
  auto groups_at = int4_groups(packed, scales, zeros, group);
  BlockCodes c = quantize_x_blocks(x, packed.size(1) * 8);
  return nibble_x8_run(packed, groups_at, _mm512_setzero_si512(), c.q.data(), c.scale.data(), c.sum.data(), x.size(0),
                       group);
}

// table: the 16 uint8 levels a code stands for (round(127 NF4) + 128, ops.py)
at::Tensor gemv_nf4x8_f32(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& table,
                          const at::Tensor& x, int64_t group) {
  check_nibbles(packed, group);
  check_groups(absmax, packed, group, at::kFloat);
  TORCH_CHECK(table.numel() == 16 && table.scalar_type() == at::kByte && table.is_contiguous(), "table must be 16 uint8");
  const int64_t stride = (packed.size(1) * 8 / group) * 16;
  const float* A = absmax.data_ptr<float>();
  const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table.data_ptr<uint8_t>())));
  BlockCodes c = quantize_x_blocks(x, packed.size(1) * 8);
  return nibble_x8_run(packed, [=](int64_t t) { return Nf4Groups{A + t * stride}; }, lut, c.q.data(), c.scale.data(),
                       c.sum.data(), x.size(0), group);
}

}  // namespace

TORCH_LIBRARY(neoformer_cpu, m) {
  m.def("gemv_f32(Tensor packed, Tensor x) -> Tensor");
  m.def("gemv_bf16(Tensor packed, Tensor x) -> Tensor");
  m.def("gemv_int8(Tensor packed, Tensor scales, Tensor x) -> Tensor");
  m.def("gemv_int8x8(Tensor packed, Tensor w_scale, Tensor xq, Tensor x_scale) -> Tensor");
  m.def("gemv_int4x8(Tensor packed, Tensor scales, Tensor zeros, Tensor xq, Tensor xs, Tensor xsum, int group) -> Tensor");
  m.def("gemv_int8x8_f32(Tensor packed, Tensor w_scale, Tensor x) -> Tensor");
  m.def("gemv_int4x8_f32(Tensor packed, Tensor scales, Tensor zeros, Tensor x, int group) -> Tensor");
  m.def("gemv_nf4x8_f32(Tensor packed, Tensor absmax, Tensor table, Tensor x, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(neoformer_cpu, CPU, m) {
  m.impl("gemv_f32", &gemv_f32);
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int8x8", &gemv_int8x8);
  m.impl("gemv_int4x8", &gemv_int4x8);
  m.impl("gemv_int8x8_f32", &gemv_int8x8_f32);
  m.impl("gemv_int4x8_f32", &gemv_int4x8_f32);
  m.impl("gemv_nf4x8_f32", &gemv_nf4x8_f32);
}
