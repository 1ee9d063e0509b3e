// The softmax passes of model/chunked_attention.py for bf16 q, k, v (CPU training with attention dropout, AMX).
//
// Why hand-written (measured on lumi-tiny's bf16 step, the 2-core Xeon with AMX of BENCHMARKS.md): around its bf16
// products each query chunk ran ~8 fp32 passes in PyTorch (upcast, scale, causal fill, max, subtract, exp, sum,
// downcast) forward and ~10 backward, and the bf16 <-> fp32 copies alone were ~19 % of the step. Here one pass
// per row reads the bf16 scores and writes bf16 results, with fp32 arithmetic in between (as FlashAttention).
// A chunk is (rows, keys) contiguous, rows = B * H * c; row i of a causal chunk sees keys < keys - c + i % c + 1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <limits>

#include "simd.h"

namespace {

using neoformer_simd::exp512;
using neoformer_simd::lanes;
using neoformer_simd::load_bf16;
using neoformer_simd::store_bf16;

int64_t visible(int64_t row, int64_t chunk_rows, int64_t keys, bool causal) {
  return causal ? keys - chunk_rows + row % chunk_rows + 1 : keys;
}

void check_chunk(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.scalar_type() == at::kBFloat16, name,
              " must be a contiguous bfloat16 (rows, keys) tensor");
}

// scores -> exp(scores * scale - row max), 0 past the causal edge, in place; returns (rows, 2): max, sum
at::Tensor softmax_forward_(at::Tensor scores, double scale, int64_t chunk_rows, bool causal) {
  check_chunk(scores, "scores");
  const int64_t rows = scores.size(0), keys = scores.size(1);
  auto stats = at::empty({rows, 2}, scores.options().dtype(at::kFloat));
  at::BFloat16* S = scores.data_ptr<at::BFloat16>();
  float* out = stats.data_ptr<float>();
  const __m512 vscale = _mm512_set1_ps(static_cast<float>(scale));
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      at::BFloat16* row = S + i * keys;
      const int64_t n = visible(i, chunk_rows, keys, causal);
      __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = lanes(j, n);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_mul_ps(load_bf16(row + j, m), vscale));
      }
      const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < keys; j += 16) {
        const __mmask16 m = lanes(j, keys), live = j < n ? lanes(j, n) : __mmask16(0);
        const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_fmsub_ps(load_bf16(row + j, m), vscale, mx)));
        sum = _mm512_add_ps(sum, e);
        store_bf16(row + j, m, e);
      }
      out[2 * i] = _mm512_reduce_max_ps(mx);
      out[2 * i + 1] = _mm512_reduce_add_ps(sum);
    }
  });
  return stats;
}

// backward of one chunk: probs = exp(scores * scale - lse) (0 past the causal edge) overwrites `scores`, and
// probs * (grad_probs - row_dot) overwrites `grad_probs` (the caller zeroes grad_probs' dropped elements before
// and the dropped probabilities after: the dropout mask is applied by zero_dropped_)
void softmax_backward_(at::Tensor scores, at::Tensor grad_probs, const at::Tensor& lse, const at::Tensor& row_dot,
                       double scale, int64_t chunk_rows, bool causal) {
  check_chunk(scores, "scores");
  check_chunk(grad_probs, "grad_probs");
  const int64_t rows = scores.size(0), keys = scores.size(1);
  TORCH_CHECK(grad_probs.sizes() == scores.sizes(), "grad_probs must have the scores' shape");
  TORCH_CHECK(lse.numel() == rows && row_dot.numel() == rows && lse.scalar_type() == at::kFloat &&
                  row_dot.scalar_type() == at::kFloat && lse.is_contiguous() && row_dot.is_contiguous(),
              "lse and row_dot must be contiguous float32 with one value per row");
  at::BFloat16* S = scores.data_ptr<at::BFloat16>();
  at::BFloat16* G = grad_probs.data_ptr<at::BFloat16>();
  const float* L = lse.data_ptr<float>();
  const float* D = row_dot.data_ptr<float>();
  const __m512 vscale = _mm512_set1_ps(static_cast<float>(scale));
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      at::BFloat16* s = S + i * keys;
      at::BFloat16* g = G + i * keys;
      const int64_t n = visible(i, chunk_rows, keys, causal);
      const __m512 vlse = _mm512_set1_ps(L[i]), vdot = _mm512_set1_ps(D[i]);
      for (int64_t j = 0; j < keys; j += 16) {
        const __mmask16 m = lanes(j, keys), live = j < n ? lanes(j, n) : __mmask16(0);
        const __m512 p = _mm512_maskz_mov_ps(live, exp512(_mm512_fmsub_ps(load_bf16(s + j, m), vscale, vlse)));
        store_bf16(g + j, m, _mm512_mul_ps(p, _mm512_sub_ps(load_bf16(g + j, m), vdot)));
        store_bf16(s + j, m, p);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(neoformer_cpu, m) {
  m.def("softmax_forward_(Tensor(a!) scores, float scale, int chunk_rows, bool causal) -> Tensor");
  m.def("softmax_backward_(Tensor(a!) scores, Tensor(b!) grad_probs, Tensor lse, Tensor row_dot, float scale, "
        "int chunk_rows, bool causal) -> ()");
}

TORCH_LIBRARY_IMPL(neoformer_cpu, CPU, m) {
  m.impl("softmax_forward_", &softmax_forward_);
  m.impl("softmax_backward_", &softmax_backward_);
}
