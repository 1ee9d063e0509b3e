// CPU training kernels: the token cross-entropy of one chunk of LM-head logits (loss and gradient in one pass per
// row), and dropout applied in place from a counter-based hash (model/dropout.py).
//
// Why hand-written (measured on lumi-tiny, 16 x 1024 tokens, vocab 32,768, bf16 autocast, 2 threads, the 2-core
// Xeon with AMX of BENCHMARKS.md): the PyTorch chunk -- upcast to fp32, log_softmax, nll, their backward, the
// cast of the gradient back to bf16 -- is ~10 passes over the (rows, V) chunk and took 4.3 s of an 11.1 s step,
// three times the head's three matmuls. Here each row (64 KiB of bf16 at vocab 32k: it stays in L2) is read for
// its max and its sum of exponentials, then overwritten with its gradient softmax - onehot, rounded to the
// logits' dtype as autograd's cast would. Sums run in fp32 as PyTorch's CPU log_softmax does (other order:
// equal to ~1e-6 relative, tests compare with float64).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace {

using neoformer_simd::bf16_to_f32;
using neoformer_simd::exp512;
using neoformer_simd::lanes;
using neoformer_simd::load_bf16;
using neoformer_simd::store_bf16;

// 16 values (fewer under `mask`) as fp32; lanes outside the mask read as `fill`
inline __m512 load16(const float* p, __mmask16 mask, __m512 fill) { return _mm512_mask_loadu_ps(fill, mask, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 mask, __m512 fill) {
  return _mm512_mask_mov_ps(fill, mask, load_bf16(p, mask));
}
inline void store16(float* p, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(p, mask, v); }
inline void store16(at::BFloat16* p, __mmask16 mask, __m512 v) { store_bf16(p, mask, v); }

// loss of one row; the row becomes its gradient (softmax - onehot) when `write_grad`
template <typename T>
float row_cross_entropy(T* row, int64_t vocab, int64_t target, bool write_grad) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax = neg_inf;
  __mmask16 bad = 0;  // NaN or +-inf anywhere: the loss is NaN, as log_softmax's would be
  for (int64_t j = 0; j < vocab; j += 16) {
    const __mmask16 m = lanes(j, vocab);
    const __m512 x = load16(row + j, m, neg_inf);
    bad |= _mm512_mask_fpclass_ps_mask(m, x, 0x99);
    vmax = _mm512_max_ps(vmax, x);
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (bad) {
    if (write_grad)
      for (int64_t j = 0; j < vocab; j += 16) store16(row + j, lanes(j, vocab), _mm512_set1_ps(nan));
    return nan;
  }
  const float mx = _mm512_reduce_max_ps(vmax);
  const __m512 vmx = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < vocab; j += 16) {
    const __mmask16 m = lanes(j, vocab);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(load16(row + j, m, vmx), vmx))));
  }
  const float lse = mx + std::log(_mm512_reduce_add_ps(sum));
  const float loss = lse - static_cast<float>(row[target]);
  if (write_grad) {
    const __m512 vlse = _mm512_set1_ps(lse);
    for (int64_t j = 0; j < vocab; j += 16) {
      const __mmask16 m = lanes(j, vocab);
      __m512 g = exp512(_mm512_sub_ps(load16(row + j, m, vlse), vlse));
      if (target >= j && target < j + 16)  // the onehot's -1 in its lane
        g = _mm512_mask_sub_ps(g, __mmask16(1u << (target - j)), g, _mm512_set1_ps(1.0f));
      store16(row + j, m, g);
    }
  }
  return loss;
}

template <typename T>
void cross_entropy_loop(T* X, int64_t rows, int64_t vocab, const int64_t* targets, int64_t ignore_index,
                        bool write_grad, float* losses) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = X + r * vocab;
      if (targets[r] == ignore_index) {
        losses[r] = 0.0f;
        if (write_grad) std::fill(row, row + vocab, T(0.0f));
      } else {
        losses[r] = row_cross_entropy(row, vocab, targets[r], write_grad);
      }
    }
  });
}

// logits (rows, V) fp32 or bf16, contiguous, overwritten with d(sum of losses)/d(logits) when write_grad;
// targets (rows,) int64, rows whose target is ignore_index count 0 and get a zero gradient.
// Returns the (rows,) fp32 losses.
at::Tensor cross_entropy_rows_(at::Tensor logits, const at::Tensor& targets, int64_t ignore_index, bool write_grad) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() &&
                  (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16),
              "logits must be a contiguous (rows, vocab) float32 or bfloat16 tensor");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == rows && targets.scalar_type() == at::kLong,
              "targets must be (rows,) int64");
  const auto t = targets.contiguous();
  const int64_t* T = t.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(T[r] == ignore_index || (T[r] >= 0 && T[r] < vocab), "target ", T[r], " is out of bounds for vocab ",
                vocab);
  auto losses = at::empty({rows}, logits.options().dtype(at::kFloat));
  float* L = losses.data_ptr<float>();
  if (logits.scalar_type() == at::kFloat)
    cross_entropy_loop(logits.data_ptr<float>(), rows, vocab, T, ignore_index, write_grad, L);
  else
    cross_entropy_loop(logits.data_ptr<at::BFloat16>(), rows, vocab, T, ignore_index, write_grad, L);
  return losses;
}

// ---- dropout from a hash of the position (model/dropout.py: dropped() is the same hash in PyTorch) -------------
// Element i of a chunk is dropped when 16-bit lane i % 4 of splitmix64(key + (i / 4 + 1) * golden) is below the
// threshold (p * 65536). Why hand-written: PyTorch's version draws int64 randoms, compares them into a bool mask
// and masked_fills (measured 15 % of lumi-tiny's bf16 step); here the mask is never stored: eight hashes give 32
// decisions and a masked store of zeros, so backward regenerates it for free.
inline __m512i splitmix64(__m512i x) {
  x = _mm512_mullo_epi64(_mm512_xor_si512(x, _mm512_srli_epi64(x, 30)), _mm512_set1_epi64(0xBF58476D1CE4E5B9LL));
  x = _mm512_mullo_epi64(_mm512_xor_si512(x, _mm512_srli_epi64(x, 27)), _mm512_set1_epi64(0x94D049BB133111EBLL));
  return _mm512_xor_si512(x, _mm512_srli_epi64(x, 31));
}

inline __m512 scale_kept(const float* p, __mmask16 kept, __mmask16 valid, __m512 scale) {
  return _mm512_maskz_mul_ps(kept, _mm512_maskz_loadu_ps(valid, p), scale);
}

// element j of x: 0 where dropped; times `scale` elsewhere (scale 1: only the zeros are written)
template <typename T>
void zero_dropped(T* x, int64_t count, uint64_t key, uint16_t threshold, float scale) {
  constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
  const __m512i lane_words = _mm512_set_epi64(8, 7, 6, 5, 4, 3, 2, 1);  // (word + 1) for the 8 words of a block
  const __m512i limit = _mm512_set1_epi16(static_cast<short>(threshold));
  const __m512 vscale = _mm512_set1_ps(scale);
  const int64_t blocks = (count + 31) / 32;  // 32 elements = 8 words per block
  at::parallel_for(0, blocks, 256, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const __m512i words = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(b * 8)), lane_words);
      const __m512i state = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(key)),
                                             _mm512_mullo_epi64(words, _mm512_set1_epi64(static_cast<int64_t>(kGolden))));
      const __mmask32 drop_all = _mm512_cmplt_epu16_mask(splitmix64(state), limit);  // bit j: element 32 b + j
      const int64_t start = b * 32, left = count - start;
      const __mmask32 valid = left < 32 ? static_cast<__mmask32>((1ULL << left) - 1) : ~__mmask32(0);
      const __mmask32 drop = drop_all & valid, kept = ~drop_all & valid;
      T* p = x + start;
      if (scale == 1.0f) {
        if constexpr (std::is_same_v<T, float>) {
          _mm512_mask_storeu_ps(p, static_cast<__mmask16>(drop), _mm512_setzero_ps());
          _mm512_mask_storeu_ps(p + 16, static_cast<__mmask16>(drop >> 16), _mm512_setzero_ps());
        } else {
          _mm512_mask_storeu_epi16(p, drop, _mm512_setzero_si512());
        }
      } else if constexpr (std::is_same_v<T, float>) {
        _mm512_mask_storeu_ps(p, static_cast<__mmask16>(valid),
                              scale_kept(p, static_cast<__mmask16>(kept), static_cast<__mmask16>(valid), vscale));
        _mm512_mask_storeu_ps(p + 16, static_cast<__mmask16>(valid >> 16),
                              scale_kept(p + 16, static_cast<__mmask16>(kept >> 16), static_cast<__mmask16>(valid >> 16),
                                         vscale));
      } else {  // bf16: widen, scale in fp32, round to nearest even (as Tensor.mul_ does)
        const __m512i raw = _mm512_maskz_loadu_epi16(valid, p);
        const __m512 lo = bf16_to_f32(_mm512_castsi512_si256(raw)), hi = bf16_to_f32(_mm512_extracti64x4_epi64(raw, 1));
        const __m512bh packed = _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, vscale), _mm512_mul_ps(lo, vscale));
        _mm512_mask_storeu_epi16(p, valid, _mm512_maskz_mov_epi16(kept, (__m512i)packed));
      }
    }
  });
}

void zero_dropped_(at::Tensor x, int64_t key, int64_t threshold, double scale) {
  TORCH_CHECK(x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a contiguous float32 or bfloat16 tensor");
  TORCH_CHECK(threshold >= 0 && threshold < 65536, "threshold must be in [0, 65536)");
  const auto k = static_cast<uint64_t>(key);
  const auto t = static_cast<uint16_t>(threshold);
  const auto f = static_cast<float>(scale);
  if (x.scalar_type() == at::kFloat)
    zero_dropped(x.data_ptr<float>(), x.numel(), k, t, f);
  else
    zero_dropped(x.data_ptr<at::BFloat16>(), x.numel(), k, t, f);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(neoformer_cpu, m) {
  m.def("cross_entropy_rows_(Tensor(a!) logits, Tensor targets, int ignore_index, bool write_grad) -> Tensor");
  m.def("zero_dropped_(Tensor(a!) x, int key, int threshold, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(neoformer_cpu, CPU, m) {
  m.impl("cross_entropy_rows_", &cross_entropy_rows_);
  m.impl("zero_dropped_", &zero_dropped_);
}
