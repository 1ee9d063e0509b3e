// AVX-512 helpers shared by the CPU kernels (gemv_cpu.cpp, loss_cpu.cpp, attention_cpu.cpp).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace neoformer_simd {

inline __m512 bf16_to_f32(__m256i v) {  // 16 bf16 -> 16 fp32, exact (bf16 is the top half of fp32)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// the first min(16, n - j) lanes of a row of n values starting at j
inline __mmask16 lanes(int64_t j, int64_t n) { return n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1); }

// masked bf16 <-> fp32 (lanes outside the mask read 0 and are not written); stores round to nearest even,
// as Tensor.to does (needs AVX512-BF16)
inline __m512 load_bf16(const void* p, __mmask16 m) { return bf16_to_f32(_mm256_maskz_loadu_epi16(m, p)); }
inline void store_bf16(void* p, __mmask16 m, __m512 v) { _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v)); }

inline __m512 exp512(__m512 x) {  // Cephes expf: |relative error| < 2e-7 on [-87, 88]
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365478515625f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

}  // namespace neoformer_simd
