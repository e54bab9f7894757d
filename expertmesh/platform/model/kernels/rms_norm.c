/* RMSNorm over rows (float32): out = x * (1 / sqrt(mean(x^2) + eps)) * w.
 *
 * Why: PyTorch 2.13's CPU rms_norm is a composite of six ops (pow, mean, add, rsqrt and two
 * products), each with its dispatch overhead; at a decode step's 64 rows of 256 that overhead is
 * the whole cost, ~70 us a call measured in the engine, and a decoder layer makes two calls.
 * Here it is one pass per row.
 *
 * Numbers: the mean of squares is summed over 8 lanes and then across them (PyTorch's
 * reduction sums in another order), and 1 / sqrt is exact (not an approximate rsqrt), so
 * outputs differ from PyTorch's by float32 rounding only (~1e-7 relative). The product is
 * (x * r) * w, in PyTorch's order.
 *
 * Returns 0, or 1 when D is not a positive multiple of 8. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

int rms_norm(const float *x, const float *w, float eps, int64_t rows, int64_t D, float *out) {
    if (D <= 0 || D % 8 != 0) return 1;
    for (int64_t i = 0; i < rows; i++) {
        const float *xi = x + i * D;
        float *oi = out + i * D;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < D; j += 8) {
            const __m256 v = _mm256_loadu_ps(xi + j);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        const float r = 1.0f / sqrtf(_mm_cvtss_f32(s) / (float)D + eps);
        const __m256 rv = _mm256_set1_ps(r);
        for (int64_t j = 0; j < D; j += 8)
            _mm256_storeu_ps(oi + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xi + j), rv),
                                                   _mm256_loadu_ps(w + j)));
    }
    return 0;
}
