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
 *
 * Built at first use by expertmesh/platform/model/kernels/__init__.py (cc -O3 -mavx2 -mfma).
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_ROWS 32 /* rows per expert handled here; callers use a GEMM above this */
#define MAX_THREADS 64

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

/* y[i][j] = dot(x[i], w[j]) for i < n, j in [j0, j1); w rows have K elements, stride K.
 * Rows of x in blocks of 4, rows of w in blocks of 2: 8 accumulators, each w load feeds 4 FMAs. */
static void dot_rows(const float *x, int n, const void *w, int bf16, int64_t K, int64_t j0,
                     int64_t j1, float *y, int64_t ldy) {
    const int es = bf16 ? 2 : 4;
    for (int i0 = 0; i0 < n; i0 += 4) {
        const int ni = n - i0 < 4 ? n - i0 : 4;
        const float *x0 = x + (int64_t)i0 * K;
        const float *x1 = ni > 1 ? x0 + K : x0, *x2 = ni > 2 ? x0 + 2 * K : x0;
        const float *x3 = ni > 3 ? x0 + 3 * K : x0;
        int64_t j = j0;
        for (; j + 2 <= j1; j += 2) {
            const char *wa = (const char *)w + j * K * es, *wb = wa + K * es;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (int64_t k = 0; k < K; k += 8) {
                const __m256 va = load8(wa, bf16, k), vb = load8(wb, bf16, k);
                const __m256 v0 = _mm256_loadu_ps(x0 + k), v1 = _mm256_loadu_ps(x1 + k);
                const __m256 v2 = _mm256_loadu_ps(x2 + k), v3 = _mm256_loadu_ps(x3 + k);
                a0 = _mm256_fmadd_ps(va, v0, a0);
                a1 = _mm256_fmadd_ps(va, v1, a1);
                a2 = _mm256_fmadd_ps(va, v2, a2);
                a3 = _mm256_fmadd_ps(va, v3, a3);
                b0 = _mm256_fmadd_ps(vb, v0, b0);
                b1 = _mm256_fmadd_ps(vb, v1, b1);
                b2 = _mm256_fmadd_ps(vb, v2, b2);
                b3 = _mm256_fmadd_ps(vb, v3, b3);
            }
            const __m256 acc_a[4] = {a0, a1, a2, a3}, acc_b[4] = {b0, b1, b2, b3};
            for (int i = 0; i < ni; i++) {
                y[(int64_t)(i0 + i) * ldy + j] = hsum(acc_a[i]);
                y[(int64_t)(i0 + i) * ldy + j + 1] = hsum(acc_b[i]);
            }
        }
        for (; j < j1; j++) {
            const char *wa = (const char *)w + j * K * es;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t k = 0; k < K; k += 8) {
                const __m256 va = load8(wa, bf16, k);
                a0 = _mm256_fmadd_ps(va, _mm256_loadu_ps(x0 + k), a0);
                a1 = _mm256_fmadd_ps(va, _mm256_loadu_ps(x1 + k), a1);
                a2 = _mm256_fmadd_ps(va, _mm256_loadu_ps(x2 + k), a2);
                a3 = _mm256_fmadd_ps(va, _mm256_loadu_ps(x3 + k), a3);
            }
            const __m256 acc[4] = {a0, a1, a2, a3};
            for (int i = 0; i < ni; i++) y[(int64_t)(i0 + i) * ldy + j] = hsum(acc[i]);
        }
    }
}

typedef struct {
    int n_experts, bf16, n_threads;
    int64_t D, F;
    const float *x;
    const int64_t *starts, *counts;
    const void *const *w13;
    const void *const *w2;
    float *act; /* (A, F) scratch */
    float *h;   /* (2 * maxn, F) scratch: each thread's gate and up columns */
    int64_t maxn;
    float *out;
    pthread_barrier_t *barrier;
    int go; /* 0: wait; 1: run (n_threads, h and the barrier are final) */
} job_t;

typedef struct {
    job_t *job;
    int t;
} arg_t;

static void slice(int64_t total, int t, int nt, int64_t *lo, int64_t *hi) {
    /* split [0, total) into nt slices on multiples of 8 (keeps vector loops whole) */
    const int64_t blocks = total / 8;
    *lo = blocks * t / nt * 8;
    *hi = blocks * (t + 1) / nt * 8;
}

static void *worker(void *p) {
    const arg_t *a = (const arg_t *)p;
    job_t *J = a->job;
    while (__atomic_load_n(&J->go, __ATOMIC_ACQUIRE) == 0) sched_yield();
    const int t = a->t, nt = J->n_threads;
    const int64_t D = J->D, F = J->F;
    int64_t lo, hi;
    slice(F, t, nt, &lo, &hi);
    const int64_t width = hi - lo, maxn = J->maxn;
    float *h = J->h + 2 * maxn * lo; /* this thread's block: maxn gate rows, then maxn up rows */
    for (int e = 0; e < J->n_experts; e++) {
        const int n = (int)J->counts[e];
        const int64_t start = J->starts[e];
        if (n > 0 && width > 0) {
            const int es = J->bf16 ? 2 : 4;
            const char *w = (const char *)J->w13[e];
            const float *x = J->x + start * D;
            /* gate rows [lo, hi) and up rows [F + lo, F + hi), results at column 0.. of h */
            dot_rows(x, n, w + lo * D * es, J->bf16, D, 0, width, h, width);
            dot_rows(x, n, w + (F + lo) * D * es, J->bf16, D, 0, width, h + maxn * width, width);
            for (int i = 0; i < n; i++) {
                const float *g = h + (int64_t)i * width, *u = h + (maxn + i) * width;
                float *dst = J->act + (start + i) * F + lo;
                for (int64_t j = 0; j < width; j++) dst[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
            }
        }
    }
    pthread_barrier_wait(J->barrier);
    slice(D, t, nt, &lo, &hi);
    for (int e = 0; e < J->n_experts; e++) {
        const int n = (int)J->counts[e];
        const int64_t start = J->starts[e];
        if (n > 0 && hi > lo)
            dot_rows(J->act + start * F, n, J->w2[e], J->bf16, F, lo, hi, J->out + start * D, D);
    }
    return NULL;
}

/* Returns 0 on success, a positive code for arguments this kernel does not take. */
int thin_experts(const float *x, const int64_t *starts, const int64_t *counts, int n_experts, const void *const *w13,
                 const void *const *w2, int bf16, int64_t D, int64_t F, float *act, float *out,
                 int n_threads) {
    if (D % 8 || F % 8 || D <= 0 || F <= 0) return 1;
    int64_t maxn = 0;
    for (int e = 0; e < n_experts; e++) {
        if (counts[e] < 0 || counts[e] > MAX_ROWS) return 2;
        if (counts[e] > maxn) maxn = counts[e];
    }
    if (maxn == 0) return 0;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads > F / 8) n_threads = (int)(F / 8);
    float *h = (float *)malloc((size_t)(2 * maxn * F) * sizeof(float));
    if (!h) return 3;
    pthread_barrier_t barrier;
    job_t job = {n_experts, bf16, n_threads, D, F, x, starts, counts, w13, w2, act, h, maxn, out,
                 &barrier, 0};
    pthread_t tid[MAX_THREADS];
    arg_t args[MAX_THREADS];
    int started = 1; /* the calling thread is worker 0 */
    for (; started < n_threads; started++) {
        args[started] = (arg_t){&job, started};
        if (pthread_create(&tid[started], NULL, worker, &args[started]) != 0) break;
    }
    /* the threads that did start wait for "go"; the work splits over those that exist */
    job.n_threads = started;
    pthread_barrier_init(&barrier, NULL, (unsigned)started);
    __atomic_store_n(&job.go, 1, __ATOMIC_RELEASE);
    args[0] = (arg_t){&job, 0};
    worker(&args[0]);
    for (int t = 1; t < started; t++) pthread_join(tid[t], NULL);
    pthread_barrier_destroy(&barrier);
    free(h);
    return 0;
}
