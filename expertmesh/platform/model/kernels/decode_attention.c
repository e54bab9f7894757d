/* Decode attention: one query per sequence against its cached keys and values (float32).
 *
 * Why: a decode step's attention is a few small products per (sequence, key/value head): the
 * H / G query heads sharing a key/value head against that head's L cached keys. As two batched
 * matmuls (layers.decode_attention's PyTorch path) each of the B * G problems costs a GEMM call,
 * and the cache, which the expert weights pushed out of L3 since the last step, is read at a few
 * GB/s. Here one pass per (sequence, head) computes the scores, the softmax and the weighted sum
 * of values while the next pair's keys and values are prefetched (each pair is a stream of its
 * own, too short for the hardware prefetcher to ramp up). Measured on the 2-core EPYC, B=64, G=4,
 * H=8, K=32, cold cache, one thread: 2.1x the PyTorch path at L=64, 1.9x at L=96.
 *
 * Layout: q is (B, H, K) contiguous; head h reads key/value head h / (H / G). Keys of sequence b
 * and head g start at k + b * sb + g * sg, one row of K floats per position (rows contiguous);
 * values likewise from v, with the same strides (the KV cache read in place, or a gathered
 * copy). Sequence b sees positions [0, n_keys[b]), clipped to [1, L]. out is (B, H, K).
 *
 * Numbers: float32 throughout. The sums run in another order than the GEMMs', and exp is
 * Cephes' expf polynomial on 8 lanes (vec_math.h, ~1 ulp), so outputs differ from the PyTorch
 * path by ~1e-7 relative.
 *
 * Threads: OpenMP over the B * G pairs, on PyTorch's own libgomp team (see thin_experts.c).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "vec_math.h"

#define ATTN_MAX_K 256 /* head size, a multiple of 8 */
#define ATTN_MAX_R 16  /* query heads per key/value head */

/* exp(x) on 8 lanes for x <= 0 (a softmax's max-subtracted scores), -inf included: 0 below
 * -87.34, where exp8's range ends. */
static inline __m256 exp8_nonpositive(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    return _mm256_andnot_ps(underflow, exp8(_mm256_max_ps(x, lo)));
}

/* lane j of the result: the sum of p[j]'s 8 lanes */
static inline __m256 hsum8x8(const __m256 *p) {
    __m256 a = _mm256_hadd_ps(p[0], p[1]), b = _mm256_hadd_ps(p[2], p[3]);
    __m256 c = _mm256_hadd_ps(p[4], p[5]), d = _mm256_hadd_ps(p[6], p[7]);
    a = _mm256_hadd_ps(a, b);
    c = _mm256_hadd_ps(c, d);
    return _mm256_add_ps(_mm256_permute2f128_ps(a, c, 0x20), _mm256_permute2f128_ps(a, c, 0x31));
}

static inline float hmax8(__m256 m) {
    m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
    m = _mm256_max_ps(m, _mm256_permute_ps(m, 0x4e));
    m = _mm256_max_ps(m, _mm256_permute_ps(m, 0xb1));
    return _mm256_cvtss_f32(m);
}

static inline float hadd8(__m256 s) {
    s = _mm256_add_ps(s, _mm256_permute2f128_ps(s, s, 1));
    s = _mm256_add_ps(s, _mm256_permute_ps(s, 0x4e));
    s = _mm256_add_ps(s, _mm256_permute_ps(s, 0xb1));
    return _mm256_cvtss_f32(s);
}

/* scale * (q . k_l) for the 8 positions l0 .. l0 + 7 (-inf from position n on) */
static inline __m256 scores8(const __m256 *qv, const float *kb, int64_t KB, int64_t l0,
                             int64_t n) {
    __m256 p[8];
    for (int j = 0; j < 8; j++) {
        if (l0 + j >= n) {
            p[j] = _mm256_set1_ps(-INFINITY);
            continue;
        }
        const float *kl = kb + (l0 + j) * KB * 8;
        __m256 d = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kl));
        for (int64_t c = 1; c < KB; c++) d = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(kl + 8 * c), d);
        p[j] = d;
    }
    return hsum8x8(p);
}

static inline int64_t visible(const int64_t *n_keys, int64_t b, int64_t L) {
    const int64_t n = n_keys[b];
    return n < 1 ? 1 : (n > L ? L : n);
}

/* Returns 0, or 1 for an unsupported shape, 3 when scratch memory ran out. */
int decode_attention(const float *q, const float *k, const float *v, int64_t sb, int64_t sg,
                     const int64_t *n_keys, int64_t B, int64_t H, int64_t G, int64_t K, int64_t L,
                     float scale, float *out, int n_threads) {
    if (B < 0 || L < 1 || G <= 0 || H % G != 0 || H / G > ATTN_MAX_R || K <= 0 || K % 8 != 0 ||
        K > ATTN_MAX_K)
        return 1;
    const int64_t r = H / G, KB = K / 8, LP = (L + 7) & ~(int64_t)7;
    int rc = 0;
#pragma omp parallel num_threads(n_threads)
    {
        float *s = aligned_alloc(32, sizeof(float) * (size_t)(r * LP)); /* probabilities */
        if (s == NULL) {
#pragma omp atomic write
            rc = 3;
        } else {
#pragma omp for schedule(static)
            for (int64_t bg = 0; bg < B * G; bg++) {
                const int64_t b = bg / G, g = bg % G, n = visible(n_keys, b, L);
                const float *kb = k + b * sb + g * sg, *vb = v + b * sb + g * sg;
                const float *qb = q + (b * H + g * r) * K;
                if (bg + 1 < B * G) { /* the next pair's rows, into L2 */
                    const int64_t b1 = (bg + 1) / G, g1 = (bg + 1) % G;
                    const char *k1 = (const char *)(k + b1 * sb + g1 * sg);
                    const char *v1 = (const char *)(v + b1 * sb + g1 * sg);
                    const int64_t bytes = visible(n_keys, b1, L) * K * (int64_t)sizeof(float);
                    for (int64_t off = 0; off < bytes; off += 64) {
                        _mm_prefetch(k1 + off, _MM_HINT_T1);
                        _mm_prefetch(v1 + off, _MM_HINT_T1);
                    }
                }
                __m256 acc[ATTN_MAX_R * ATTN_MAX_K / 8];
                for (int64_t i = 0; i < r; i++) {
                    __m256 qv[ATTN_MAX_K / 8];
                    const __m256 sc = _mm256_set1_ps(scale);
                    for (int64_t c = 0; c < KB; c++)
                        qv[c] = _mm256_mul_ps(_mm256_loadu_ps(qb + i * K + 8 * c), sc);
                    float *si = s + i * LP;
                    __m256 m = _mm256_set1_ps(-INFINITY);
                    for (int64_t l = 0; l < n; l += 8) {
                        const __m256 s8 = scores8(qv, kb, KB, l, n);
                        _mm256_store_ps(si + l, s8);
                        m = _mm256_max_ps(m, s8);
                    }
                    const __m256 mx = _mm256_set1_ps(hmax8(m));
                    __m256 sum = _mm256_setzero_ps();
                    for (int64_t l = 0; l < n; l += 8) { /* lanes past n: exp(-inf) = 0 */
                        const __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_load_ps(si + l), mx));
                        _mm256_store_ps(si + l, e);
                        sum = _mm256_add_ps(sum, e);
                    }
                    const __m256 inv = _mm256_set1_ps(1.0f / hadd8(sum));
                    for (int64_t l = 0; l < n; l += 8)
                        _mm256_store_ps(si + l, _mm256_mul_ps(_mm256_load_ps(si + l), inv));
                    for (int64_t c = 0; c < KB; c++) acc[i * KB + c] = _mm256_setzero_ps();
                }
                for (int64_t l = 0; l < n; l++) {
                    const float *vl = vb + l * K;
                    for (int64_t c = 0; c < KB; c++) {
                        const __m256 vv = _mm256_loadu_ps(vl + 8 * c);
                        for (int64_t i = 0; i < r; i++)
                            acc[i * KB + c] =
                                _mm256_fmadd_ps(_mm256_set1_ps(s[i * LP + l]), vv, acc[i * KB + c]);
                    }
                }
                float *ob = out + (b * H + g * r) * K;
                for (int64_t i = 0; i < r; i++)
                    for (int64_t c = 0; c < KB; c++)
                        _mm256_storeu_ps(ob + i * K + 8 * c, acc[i * KB + c]);
            }
        }
        free(s);
    }
    return rc;
}

/* A whole decode step's attention from the fused q|k|v projection: rotary embedding of the
 * queries and keys, the step's key and value appended to the cache, then decode_attention.
 *
 * Why: in PyTorch these are ~10 small ops per layer (the rotation's slices, cat, negation,
 * products and sum; two index_put writes into the cache), each costing its dispatch overhead at
 * a decode step's 64 rows; here they are one pass over B x (H + 2G) rows of K floats.
 *
 * Layout: qkv is (B, H + 2G, K) contiguous: H query rows, then G key rows, then G value rows per
 * sequence. cos and sin are (B, K) contiguous (both halves of a row equal, as layers.Rotary
 * makes them). Sequence b's new key and value go to position pos[b] of its cache rows (k + b * sb
 * + g * sg, rows of K floats; positions below n_pos), and it then attends to positions
 * 0 .. pos[b]. q_rot (B, H, K) receives the rotated queries; out is (B, H, K).
 *
 * Numbers: the rotation is layers.apply_rotary's, x * cos + rotate_half(x) * sin with each
 * product and the sum rounded to float32 on its own (no fused multiply-add), so the rotated
 * rows and the cache entries are bitwise those of the PyTorch path.
 *
 * Returns 0; 1 for an unsupported shape, 2 for a position outside [0, n_pos), 3 when scratch
 * memory ran out. Nothing is written unless every position is in range. */
__attribute__((optimize("fp-contract=off"))) static void rotate(const float *x, const float *c,
                                                               const float *s, float *y,
                                                               int64_t K) {
    const int64_t h = K / 2;
    for (int64_t j = 0; j < h; j++) {
        const float a = x[j] * c[j], b = x[j + h] * s[j];
        y[j] = a - b;
    }
    for (int64_t j = h; j < K; j++) {
        const float a = x[j] * c[j], b = x[j - h] * s[j];
        y[j] = a + b;
    }
}

int decode_rope_attention(const float *qkv, const float *cos, const float *sin, float *k, float *v,
                          int64_t sb, int64_t sg, const int64_t *pos, int64_t n_pos, int64_t B,
                          int64_t H, int64_t G, int64_t K, float scale, float *q_rot, float *out,
                          int n_threads) {
    if (B < 0 || G <= 0 || H % G != 0 || H / G > ATTN_MAX_R || K <= 0 || K % 8 != 0 ||
        K > ATTN_MAX_K)
        return 1;
    int64_t L = 1;
    for (int64_t b = 0; b < B; b++) {
        if (pos[b] < 0 || pos[b] >= n_pos) return 2;
        if (pos[b] + 1 > L) L = pos[b] + 1;
    }
    int64_t *n_keys = malloc(sizeof(int64_t) * (size_t)(B > 0 ? B : 1));
    if (n_keys == NULL) return 3;
    const int64_t rows = H + 2 * G;
    for (int64_t b = 0; b < B; b++) {
        const float *xb = qkv + b * rows * K, *cb = cos + b * K, *snb = sin + b * K;
        for (int64_t i = 0; i < H; i++) rotate(xb + i * K, cb, snb, q_rot + (b * H + i) * K, K);
        for (int64_t g = 0; g < G; g++) {
            const int64_t at = b * sb + g * sg + pos[b] * K;
            rotate(xb + (H + g) * K, cb, snb, k + at, K);
            const float *vx = xb + (H + G + g) * K;
            for (int64_t j = 0; j < K; j++) v[at + j] = vx[j];
        }
        n_keys[b] = pos[b] + 1;
    }
    const int rc = decode_attention(q_rot, k, v, sb, sg, n_keys, B, H, G, K, L, scale, out,
                                    n_threads);
    free(n_keys);
    return rc;
}
