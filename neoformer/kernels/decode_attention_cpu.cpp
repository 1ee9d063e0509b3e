// Attention for a few query rows against a KV cache (decode steps, speculative verification), on the CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

using neoformer_simd::bf16_to_f32;
using neoformer_simd::exp512;

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

TORCH_LIBRARY_FRAGMENT(neoformer_cpu, m) {
  m.def("small_query_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(neoformer_cpu, CPU, m) {
  m.impl("small_query_attention", &small_query_attention);
}
