/* Vector math shared by the kernels in this folder (AVX2 + FMA; included, not compiled alone),
 * and the scalar float32 <-> bfloat16 rounding they share. */
#ifndef EXPERTMESH_VEC_MATH_H
#define EXPERTMESH_VEC_MATH_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* exp(v) for v in [-88, 88] (Cephes' expf: 2^n * p(r), r = v - n ln2; ~1 ulp) */
static inline __m256 exp8(__m256 v) {
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* float32 <-> bfloat16 bits, one value: to nearest even as PyTorch's c10::BFloat16 (NaN stays
 * a NaN). A float32 product of two bfloat16 values is exact, so rounding it once gives
 * PyTorch's bfloat16 product; a sum is rounded to float32 and then to bfloat16, as there. */
static inline uint16_t to_bf16_bits(float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    if (v != v) return 0xFFFF;
    return (uint16_t)((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}
static inline float from_bf16_bits(uint16_t h) {
    const uint32_t b = (uint32_t)h << 16;
    float v;
    memcpy(&v, &b, 4);
    return v;
}

#endif
