/* SwiGLU experts for thin slices (a few rows per expert): out = (silu(x W1^T) * (x W3^T)) W2^T.
 *
 * Why: with a few tokens per expert a step is bound by reading the experts' weights, and MKL's
 * GEMM packs each weight matrix before multiplying (it reads ~4-8 GB/s on a core here, against
 * ~16 GB/s for a plain stream). These loops read every weight once, straight from where it lies,
 * and keep the few activation rows in L1.
 *
 * Layout (row-major, as ExpertBank and the checkpoints store them): w13[e] is (2F, D) with the
 * gate rows first, w2[e] is (D, F); expert e takes rows [starts[e], starts[e] + counts[e]) of x
 * (A, D) float32 and writes the same rows of out (A, D) (and of the scratch act, (A, F)).
 * Weights are float32 or bfloat16 (widened to float32 in registers). D and F must be multiples
 * of 8. Work splits over threads by weight rows (each thread reads a disjoint slice of every
 * expert): phase 1 computes act = silu(gate) * up for all experts, a barrier, phase 2 the output.
 * Threads come from OpenMP: loaded into a process that has PyTorch, the library binds to
 * PyTorch's own libgomp (same soname), so the kernel runs on PyTorch's warm thread team instead
 * of competing with it for the cores (a separate pthread team ran 2x slower right after an op).
 *
 * Built at first use by expertmesh/platform/model/kernels/__init__.py (cc -O3 -mavx2 -mfma
 * -fopenmp).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_ROWS 256 /* rows per expert handled here; callers use a GEMM above this */

static inline __m256 load8(const void *w, int bf16, int64_t k) {
    if (bf16) {
        __m128i v = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + k));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    }
    return _mm256_loadu_ps((const float *)w + k);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One pass of NX (1-3) x rows over four w rows: y[i][0..3] = dot(x[i], w0..w3) over K.
 * Inlined with constant nx and bf16 so each combination compiles to its own loop; 12
 * accumulators + 3 x + 1 w = the 16 ymm registers. When ``wide`` is set (bfloat16 weights, first
 * pass), the widened rows are also stored there so later passes read float32 from L1. When
 * ``next`` is set, the next four rows (4K elements at ``next``) are prefetched on the way. */
static inline __attribute__((always_inline)) void pass4(const float *x, const int nx, int64_t K,
                                                        const void *w0, const int bf16,
                                                        float *wide, const char *next,
                                                        float *y, int64_t ldy) {
    const int64_t es = bf16 ? 2 : 4, stride = K * es;
    const char *w = (const char *)w0;
    __m256 acc[3][4];
    for (int i = 0; i < nx; i++)
        for (int r = 0; r < 4; r++) acc[i][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        if (next && ((k * es) & 63) == 0) {
            const char *p = next + k * es * 4;
            _mm_prefetch(p, _MM_HINT_T0);
            _mm_prefetch(p + 64, _MM_HINT_T0);
            _mm_prefetch(p + 128, _MM_HINT_T0);
            _mm_prefetch(p + 192, _MM_HINT_T0);
        }
        __m256 xv[3];
        for (int i = 0; i < nx; i++) xv[i] = _mm256_loadu_ps(x + i * K + k);
        for (int r = 0; r < 4; r++) {
            const __m256 v = load8(w + r * stride, bf16, k);
            if (wide) _mm256_storeu_ps(wide + r * K + k, v);
            for (int i = 0; i < nx; i++) acc[i][r] = _mm256_fmadd_ps(v, xv[i], acc[i][r]);
        }
    }
    for (int i = 0; i < nx; i++)
        for (int r = 0; r < 4; r++) y[i * ldy + r] = hsum(acc[i][r]);
}

/* y[i][j] = dot(x[i], w[j]) for i < n, j in [j0, j1); w rows have K elements, stride K.
 * Four w rows at a time (four streams from memory keep more loads in flight than one or two);
 * x rows three at a time over them. The first pass reads the four rows from memory (widening
 * bfloat16 into ``wide``, 4K floats) and prefetches the next four; later passes reread the rows
 * from L1, so each weight is read from memory once. */
static void dot_rows(const float *x, int n, const void *w, int bf16, int64_t K, int64_t j0,
                     int64_t j1, float *y, int64_t ldy, float *wide) {
    const int64_t es = bf16 ? 2 : 4;
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {
        const char *w0 = (const char *)w + j * K * es;
        const char *next = j + 8 <= j1 ? w0 + 4 * K * es : NULL;
        const int first = n < 3 ? n : 3;
        float *y0 = y + j;
        /* first pass: from memory */
        if (bf16) {
            if (first == 3) pass4(x, 3, K, w0, 1, wide, next, y0, ldy);
            else if (first == 2) pass4(x, 2, K, w0, 1, wide, next, y0, ldy);
            else pass4(x, 1, K, w0, 1, wide, next, y0, ldy);
        } else {
            if (first == 3) pass4(x, 3, K, w0, 0, NULL, next, y0, ldy);
            else if (first == 2) pass4(x, 2, K, w0, 0, NULL, next, y0, ldy);
            else pass4(x, 1, K, w0, 0, NULL, next, y0, ldy);
        }
        /* later passes: float32 rows from L1 */
        const void *rows = bf16 ? (const void *)wide : (const void *)w0;
        for (int i = first; i < n; i += 3) {
            const int nx = n - i < 3 ? n - i : 3;
            const float *xi = x + (int64_t)i * K;
            float *yi = y0 + (int64_t)i * ldy;
            if (nx == 3) pass4(xi, 3, K, rows, 0, NULL, NULL, yi, ldy);
            else if (nx == 2) pass4(xi, 2, K, rows, 0, NULL, NULL, yi, ldy);
            else pass4(xi, 1, K, rows, 0, NULL, NULL, yi, ldy);
        }
    }
    for (; j < j1; j++) { /* the last rows of a slice not divisible by four */
        const char *w0 = (const char *)w + j * K * es;
        for (int i = 0; i < n; i++) {
            const float *xa = x + (int64_t)i * K;
            __m256 a0 = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k += 8)
                a0 = _mm256_fmadd_ps(load8(w0, bf16, k), _mm256_loadu_ps(xa + k), a0);
            y[(int64_t)i * ldy + j] = hsum(a0);
        }
    }
}

static void slice(int64_t total, int t, int nt, int64_t *lo, int64_t *hi) {
    /* split [0, total) into nt slices on multiples of 8 (keeps vector loops whole) */
    const int64_t blocks = total / 8;
    *lo = blocks * t / nt * 8;
    *hi = blocks * (t + 1) / nt * 8;
}

/* Returns 0 on success, a positive code for arguments this kernel does not take. */
int thin_experts(const float *x, const int64_t *starts, const int64_t *counts, int n_experts,
                 const void *const *w13, const void *const *w2, int bf16, int64_t D, int64_t F,
                 float *act, float *out, int n_threads) {
    if (D % 8 || F % 8 || D <= 0 || F <= 0) return 1;
    int64_t maxn = 0;
    for (int e = 0; e < n_experts; e++) {
        if (counts[e] < 0 || counts[e] > MAX_ROWS) return 2;
        if (counts[e] > maxn) maxn = counts[e];
    }
    if (maxn == 0) return 0;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > F / 8) n_threads = (int)(F / 8);
    /* scratch: each thread's gate and up columns, (2 * maxn) rows of its slice of F */
    float *h = (float *)malloc((size_t)(2 * maxn * F) * sizeof(float));
    const int64_t kmax = D > F ? D : F;
    float *wide = bf16 ? (float *)malloc((size_t)n_threads * 4 * kmax * sizeof(float)) : NULL;
    if (!h || (bf16 && !wide)) {
        free(h);
        free(wide);
        return 3;
    }
    const int64_t es = bf16 ? 2 : 4;
#pragma omp parallel num_threads(n_threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float *wt = bf16 ? wide + (int64_t)t * 4 * kmax : NULL;
        int64_t lo, hi;
        slice(F, t, nt, &lo, &hi);
        const int64_t width = hi - lo;
        float *g = h + 2 * maxn * lo, *u = g + maxn * width;
        for (int e = 0; e < n_experts && width > 0; e++) {
            const int n = (int)counts[e];
            if (n == 0) continue;
            const char *w = (const char *)w13[e];
            const float *xe = x + starts[e] * D;
            dot_rows(xe, n, w + lo * D * es, bf16, D, 0, width, g, width, wt);       /* gate */
            dot_rows(xe, n, w + (F + lo) * D * es, bf16, D, 0, width, u, width, wt); /* up */
            for (int i = 0; i < n; i++) {
                const float *gi = g + (int64_t)i * width, *ui = u + (int64_t)i * width;
                float *dst = act + (starts[e] + i) * F + lo;
                for (int64_t j = 0; j < width; j++) dst[j] = gi[j] / (1.0f + expf(-gi[j])) * ui[j];
            }
        }
#pragma omp barrier
        slice(D, t, nt, &lo, &hi);
        for (int e = 0; e < n_experts && hi > lo; e++) {
            const int n = (int)counts[e];
            if (n > 0)
                dot_rows(act + starts[e] * F, n, w2[e], bf16, F, lo, hi, out + starts[e] * D, D, wt);
        }
    }
    free(h);
    free(wide);
    return 0;
}
