/* SwiGLU experts for thin slices (a few rows per expert): out = (silu(x W1^T) * (x W3^T)) W2^T.
 *
 * Why: with a few tokens per expert a step is bound by reading the experts' weights, and MKL's
 * GEMM packs each weight matrix before multiplying (it reads ~4-8 GB/s on a core here, against
 * ~16 GB/s for a plain stream). These loops read every weight once, straight from where it lies,
 * and keep the few activation rows in L1.
 *
 * Layout (row-major, as ExpertBank and the checkpoints store them): w13[e] is (2F, D) with the
 * gate rows first, w2[e] is (D, F); expert e takes rows [starts[e], starts[e] + counts[e]) of x
 * (A, D) float32 or bfloat16 and writes the same rows of out (A, D) float32. Weights are float32
 * or bfloat16 (widened to float32 in registers, or multiplied in pairs by vdpbf16ps; always
 * accumulated in float32). D and F must be multiples of 8.
 *
 * Numbers: on the AVX2 path (float32 weights or activations, or no AVX512-BF16) everything after
 * the inputs is float32, act included. On the AVX512-BF16 path (bfloat16 weights and x) act is
 * rounded to bfloat16 (to nearest even, as PyTorch's float -> bfloat16) before phase 2, so phase
 * 2 also runs on vdpbf16ps: one instruction per 32 weights and act row instead of four FMAs
 * (see the AVX512 section). A bfloat16 model in PyTorch rounds there too (its down projection
 * takes bfloat16 activations).
 *
 * Work splits over threads by weight rows (each thread reads a disjoint slice of every expert):
 * phase 1 computes act = silu(gate) * up for all experts, a barrier, phase 2 the output. Threads
 * come from OpenMP: loaded into a process that has PyTorch, the library binds to PyTorch's own
 * libgomp (same soname), so the kernel runs on PyTorch's warm thread team instead of competing
 * with it for the cores (a separate pthread team ran 2x slower right after an op).
 *
 * Built at first use by expertmesh/platform/model/kernels/__init__.py (cc -O3 -mavx2 -mfma
 * -fopenmp); the AVX512-BF16 functions carry their own target attribute and run only where
 * __builtin_cpu_supports finds the instructions.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec_math.h"

#define MAX_ROWS 256 /* rows per expert handled here; callers use a GEMM above this */
#define MAX_ROWS_BLOCKED 4096 /* the blocked path takes slices of any usual size (scratch 2 x rows x F floats) */
#define ONE_PASS_ROWS 12 /* up to this many x rows, each weight row is used in one pass */
/* The weight stream is prefetched PF_AHEAD bytes ahead into L2 (measured on the 2-core EPYC, one
 * thread, 8 experts of 3-6 rows: the hardware prefetcher alone reads ~9 GB/s; 4 KB ahead into
 * L1 ~12 GB/s; 8-64 KB ahead into L2 16-17 GB/s, as fast as a plain sum over the same bytes;
 * into L1 that far evicts the x rows). */
#ifndef PF_AHEAD
#define PF_AHEAD 16384
#endif

/* bfloat16 weights are widened by lane: a 32-bit lane holding bf16 elements (2j, 2j+1) gives
 * element 2j as float32 by a shift and element 2j+1 by a mask (one op per 8 weights instead of
 * a widening convert plus a shift). The x rows they meet are permuted to match once per call:
 * in each block of 16, the even elements first, then the odd ones ("lane order"). A row whose
 * length is not a multiple of 16 ends with 8 elements in plain order, widened the slow way. */
static inline __m256 bf16_even(__m256i w) { return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)); }
static inline __m256 bf16_odd(__m256i w) {
    return _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32((int)0xFFFF0000u)));
}
static inline __m256 bf16_plain8(const uint16_t *w) {
    __m128i v = _mm_loadu_si128((const __m128i *)w);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

/* dst = src (n floats) with each whole block of 16 in lane order (see above) */
static void to_lane_order(const float *src, float *dst, int64_t n) {
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        const __m256 a = _mm256_loadu_ps(src + k), b = _mm256_loadu_ps(src + k + 8);
        /* shuffle gives a0 a2 b0 b2 | a4 a6 b4 b6; the 64-bit permute puts a's pairs first */
        const __m256 ev = _mm256_shuffle_ps(a, b, 0x88), od = _mm256_shuffle_ps(a, b, 0xDD);
        _mm256_storeu_ps(dst + k, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), 0xD8)));
        _mm256_storeu_ps(dst + k + 8,
                         _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od), 0xD8)));
    }
    for (; k < n; k++) dst[k] = src[k];
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* dst[j] = silu(g[j]) * u[j] = g u / (1 + exp(-g)) for j < n, n a multiple of 8 */
static void swiglu(const float *g, const float *u, float *dst, int64_t n) {
    const __m256 lo = _mm256_set1_ps(-88.0f), hi = _mm256_set1_ps(88.0f), one = _mm256_set1_ps(1.0f);
    for (int64_t j = 0; j < n; j += 8) {
        const __m256 gv = _mm256_loadu_ps(g + j);
        const __m256 e = exp8(_mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv), lo), hi));
        _mm256_storeu_ps(dst + j, _mm256_div_ps(_mm256_mul_ps(gv, _mm256_loadu_ps(u + j)),
                                                _mm256_add_ps(one, e)));
    }
}

/* A weight stream is prefetched into L2 a fixed distance ahead of where it is read. Each tile
 * asks prefetch_span for the lines from what was already prefetched up to ``upto`` bytes of the
 * stream, and spreads them over its loop with prefetch_tick (Bresenham: npf lines over iters
 * iterations). */
static inline int64_t prefetch_span(const char *base, int64_t upto, int64_t total, int64_t *done,
                                    const char **pf) {
    if (upto > total) upto = total;
    const int64_t n = upto > *done ? (upto - *done + 63) / 64 : 0;
    *pf = base + *done;
    *done += n * 64;
    return n;
}

static inline __attribute__((always_inline)) void prefetch_tick(const char **pf, int64_t *credit,
                                                                int64_t npf, int64_t iters) {
    *credit += npf;
    while (*credit >= iters && npf > 0) {
        _mm_prefetch(*pf, _MM_HINT_T1);
        *pf += 64;
        *credit -= iters;
    }
}

/* One tile: y[i * ldy + r] = dot(x_i, w_r) for NX x rows (stride K) and R weight rows (w0 + r K
 * elements), over K. Inlined with constant NX, R and BF so each shape compiles to its own loop
 * with its NX * R accumulators in registers. Every shape sums a dot product in the same order
 * (one float32 accumulator over k, then hsum), so a row's result does not depend on the tile it
 * fell in (batch size, thread count). BF: bfloat16 weights, x in lane order. ``wide``: store the
 * widened rows there (float32, lane order) for later tiles that reuse them from L1. The ``npf``
 * cache lines from ``pf`` are prefetched, spread over the loop. */
static inline __attribute__((always_inline)) void tile(const float *x, const int NX, const int R,
                                                       int64_t K, const void *w0, const int BF,
                                                       float *const wide, const char *pf, int64_t npf,
                                                       float *y, int64_t ldy) {
    __m256 acc[ONE_PASS_ROWS][4];
    for (int i = 0; i < NX; i++)
        for (int r = 0; r < R; r++) acc[i][r] = _mm256_setzero_ps();
    const int64_t step = BF ? 16 : 8, K16 = BF ? K / 16 * 16 : K;
    const int64_t iters = K16 / step;
    int64_t credit = 0;
    for (int64_t k = 0; k < K16; k += step) {
        prefetch_tick(&pf, &credit, npf, iters);
        if (BF) {
            for (int r = 0; r < R; r++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w0 + r * K + k));
                const __m256 ev = bf16_even(raw), od = bf16_odd(raw);
                if (wide) {
                    _mm256_storeu_ps(wide + r * K + k, ev);
                    _mm256_storeu_ps(wide + r * K + k + 8, od);
                }
                for (int i = 0; i < NX; i++) {
                    acc[i][r] = _mm256_fmadd_ps(ev, _mm256_loadu_ps(x + i * K + k), acc[i][r]);
                    acc[i][r] = _mm256_fmadd_ps(od, _mm256_loadu_ps(x + i * K + k + 8), acc[i][r]);
                }
            }
        } else {
            for (int r = 0; r < R; r++) {
                const __m256 wv = _mm256_loadu_ps((const float *)w0 + r * K + k);
                for (int i = 0; i < NX; i++)
                    acc[i][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * K + k), acc[i][r]);
            }
        }
    }
    if (BF && K16 < K) { /* the last 8 of a row not a multiple of 16, in plain order */
        for (int r = 0; r < R; r++) {
            const __m256 wv = bf16_plain8((const uint16_t *)w0 + r * K + K16);
            if (wide) _mm256_storeu_ps(wide + r * K + K16, wv);
            for (int i = 0; i < NX; i++)
                acc[i][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * K + K16), acc[i][r]);
        }
    }
    for (int i = 0; i < NX; i++)
        for (int r = 0; r < R; r++) y[i * ldy + r] = hsum(acc[i][r]);
}

/* Weight rows per tile for n x rows in one pass: as many as the 16 registers hold. */
static inline int rows_for(int n) { return n <= 3 ? 4 : n == 4 ? 3 : n <= 6 ? 2 : 1; }

#define TILE_CASE(NX, R)                                                                     \
    case (NX) * 8 + (R):                                                                     \
        if (bf16 && wide) tile(x, NX, R, K, w, 1, wide, pf, npf, y, ldy);                    \
        else if (bf16) tile(x, NX, R, K, w, 1, NULL, pf, npf, y, ldy);                       \
        else tile(x, NX, R, K, w, 0, NULL, pf, npf, y, ldy);                                 \
        return;

/* one tile of any supported shape (NX <= 12 with R = rows_for(NX); or NX <= 3, R <= 4) */
static void tile_any(const float *x, int nx, int r, int64_t K, const void *w, int bf16,
                     float *wide, const char *pf, int64_t npf, float *y, int64_t ldy) {
    switch (nx * 8 + r) {
        TILE_CASE(1, 4) TILE_CASE(2, 4) TILE_CASE(3, 4) TILE_CASE(4, 3) TILE_CASE(5, 2)
        TILE_CASE(6, 2) TILE_CASE(7, 1) TILE_CASE(8, 1) TILE_CASE(9, 1) TILE_CASE(10, 1)
        TILE_CASE(11, 1) TILE_CASE(12, 1) TILE_CASE(1, 1) TILE_CASE(2, 1) TILE_CASE(3, 1)
        TILE_CASE(4, 1) TILE_CASE(5, 1) TILE_CASE(6, 1) TILE_CASE(1, 2) TILE_CASE(2, 2)
        TILE_CASE(3, 2) TILE_CASE(4, 2) TILE_CASE(1, 3) TILE_CASE(2, 3) TILE_CASE(3, 3)
    default:
        abort(); /* unreachable: dot_rows only asks for the shapes above */
    }
}

/* y[i * ldy + j] = dot(x_i, w_j) for i < n, j < rows; w: ``rows`` contiguous rows of K elements.
 * Up to ONE_PASS_ROWS x rows, tiles of rows_for(n) weight rows against all n x rows: each weight
 * is loaded once and used at once. More x rows: tiles of 4 weight rows, the first against 3 x
 * rows from memory (widening bf16 into ``wide``, 4K floats), the rest against the copy in L1
 * (compute bound there anyway). The weight stream is prefetched PF_AHEAD bytes ahead. */
static void dot_rows(const float *x, int n, const void *w0, int bf16, int64_t K, int64_t rows,
                     float *y, int64_t ldy, float *wide) {
    const int64_t es = bf16 ? 2 : 4, row_bytes = K * es, total = rows * row_bytes;
    const char *w = (const char *)w0;
    const int R = n <= ONE_PASS_ROWS ? rows_for(n) : 4;
    int64_t pf_done = 0; /* bytes of this stream prefetched so far */
    for (int64_t j = 0; j < rows;) {
        const int r = rows - j >= R ? R : (rows - j >= 3 && R == 4 ? 3 : 1);
        const char *wj = w + j * row_bytes;
        const char *pf;
        const int64_t npf = prefetch_span(w, (j + r) * row_bytes + PF_AHEAD, total, &pf_done, &pf);
        if (n <= ONE_PASS_ROWS) {
            tile_any(x, n, r, K, wj, bf16, NULL, pf, npf, y + j, ldy);
        } else {
            const int first = 3;
            tile_any(x, first, r, K, wj, bf16, bf16 ? wide : NULL, pf, npf, y + j, ldy);
            const void *rows_l1 = bf16 ? (const void *)wide : (const void *)wj;
            for (int i = first; i < n; i += 3) {
                const int nx = n - i < 3 ? n - i : 3;
                tile_any(x + (int64_t)i * K, nx, r, K, rows_l1, 0, NULL, NULL, 0,
                         y + (int64_t)i * ldy + j, ldy);
            }
        }
        j += r;
    }
}

/* --- AVX512-BF16: bfloat16 weights against bfloat16 activations (both phases when the layer's
 * input is bfloat16). vdpbf16ps multiplies pairs of bfloat16 exactly and adds them into float32
 * lanes: one instruction per 32 weights and x row, no widening, where the path above needs two
 * FMAs and two widening ops; on the AVX2 path phase 1 was compute bound at ~13 GB/s a core, and
 * phase 2 at ~30 GB/s on both hyperthreads (they share the FMA units). In phase 1 the x rows
 * are bfloat16 already (the layer's input), so the products are the same numbers as the AVX2
 * path's; only the order of the float32 sums differs. Phase 2's x rows are act, computed in
 * float32 and rounded to bfloat16 by act_to_bf16 (PyTorch's bfloat16 FFN rounds them there
 * too), so phase 2 differs from the AVX2 path by that rounding (up to 2^-8 relative per element).
 * 32 zmm registers hold up to 20 accumulators, the weight rows and the x row they meet, so
 * each x load serves R FMAs. */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define DP_ONE_PASS_ROWS 20

static inline __attribute__((always_inline)) AVX512 void
tile_dp(const uint16_t *x, const int NX, const int R, int64_t K, const uint16_t *w0,
        const char *pf, int64_t npf, float *y, int64_t ldy) {
    __m512 acc[DP_ONE_PASS_ROWS][4];
    for (int i = 0; i < NX; i++)
        for (int r = 0; r < R; r++) acc[i][r] = _mm512_setzero_ps();
    const int64_t K32 = K / 32 * 32, iters = K32 / 32;
    int64_t credit = 0;
    for (int64_t k = 0; k < K32; k += 32) {
        prefetch_tick(&pf, &credit, npf, iters);
        __m512i wv[4];
        for (int r = 0; r < R; r++) wv[r] = _mm512_loadu_si512(w0 + r * K + k);
        for (int i = 0; i < NX; i++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * K + k);
            for (int r = 0; r < R; r++) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, (__m512bh)wv[r]);
        }
    }
    if (K32 < K) { /* 8, 16 or 24 elements left: masked loads, zeros beyond */
        const __mmask32 m = (__mmask32)((1ull << (K - K32)) - 1);
        for (int r = 0; r < R; r++) {
            const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w0 + r * K + K32);
            for (int i = 0; i < NX; i++)
                acc[i][r] = _mm512_dpbf16_ps(
                    acc[i][r], (__m512bh)_mm512_maskz_loadu_epi16(m, x + i * K + K32), wv);
        }
    }
    for (int i = 0; i < NX; i++)
        for (int r = 0; r < R; r++) y[i * ldy + r] = _mm512_reduce_add_ps(acc[i][r]);
}

/* dst = src rounded to bfloat16 for n elements, as PyTorch's vectorised float -> bfloat16
 * (aten cvtfp32_bf16): to nearest even by adding 0x7FFF + lsb to the bits, NaN to 0xFFFF (the
 * bias would carry a NaN's low bits into inf or -0), subnormals kept. Plain order, like x. */
static AVX512 void act_to_bf16(const float *src, uint16_t *dst, int64_t n) {
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF),
                  nan = _mm512_set1_epi32(0xFFFF);
    for (int64_t k = 0; k < n; k += 16) {
        const __mmask16 m = n - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - k)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(m, src + k);
        const __m512i bits = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, bias), lsb), 16);
        r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), nan);
        _mm512_mask_cvtepi32_storeu_epi16(dst + k, m, r);
    }
}

static inline int dp_rows_for(int n) { return n <= 4 ? 4 : n <= 6 ? 3 : n <= 10 ? 2 : 1; }

#define DP_CASE(NX, R)                                                                       \
    case (NX) * 8 + (R):                                                                     \
        tile_dp(x, NX, R, K, w, pf, npf, y, ldy);                                            \
        return;

static AVX512 void tile_dp_any(const uint16_t *x, int nx, int r, int64_t K, const uint16_t *w,
                               const char *pf, int64_t npf, float *y, int64_t ldy) {
    switch (nx * 8 + r) {
        DP_CASE(1, 4) DP_CASE(2, 4) DP_CASE(3, 4) DP_CASE(4, 4) DP_CASE(5, 3) DP_CASE(6, 3)
        DP_CASE(7, 2) DP_CASE(8, 2) DP_CASE(9, 2) DP_CASE(10, 2) DP_CASE(1, 1) DP_CASE(2, 1)
        DP_CASE(3, 1) DP_CASE(4, 1) DP_CASE(5, 1) DP_CASE(6, 1) DP_CASE(7, 1) DP_CASE(8, 1)
        DP_CASE(9, 1) DP_CASE(10, 1) DP_CASE(11, 1) DP_CASE(12, 1) DP_CASE(13, 1)
        DP_CASE(14, 1) DP_CASE(15, 1) DP_CASE(16, 1) DP_CASE(17, 1) DP_CASE(18, 1)
        DP_CASE(19, 1) DP_CASE(20, 1)
    default:
        abort(); /* unreachable: dot_rows_dp only asks for the shapes above */
    }
}

/* dot_rows for bfloat16 x and weights with vdpbf16ps: tiles of dp_rows_for(n) weight rows
 * against up to DP_ONE_PASS_ROWS x rows; more x rows take further passes over each tile's
 * rows (from L1). */
static AVX512 void dot_rows_dp(const uint16_t *x, int n, const uint16_t *w, int64_t K,
                               int64_t rows, float *y, int64_t ldy) {
    const int64_t row_bytes = K * 2, total = rows * row_bytes;
    const int R = dp_rows_for(n < DP_ONE_PASS_ROWS ? n : DP_ONE_PASS_ROWS);
    int64_t pf_done = 0;
    for (int64_t j = 0; j < rows;) {
        const int r = rows - j >= R ? R : 1;
        const char *pf;
        const int64_t npf =
            prefetch_span((const char *)w, (j + r) * row_bytes + PF_AHEAD, total, &pf_done, &pf);
        for (int i = 0; i < n; i += DP_ONE_PASS_ROWS) {
            const int nx = n - i < DP_ONE_PASS_ROWS ? n - i : DP_ONE_PASS_ROWS;
            tile_dp_any(x + (int64_t)i * K, nx, r, K, w + j * K, i == 0 ? pf : NULL,
                        i == 0 ? npf : 0, y + (int64_t)i * ldy + j, ldy);
        }
        j += r;
    }
}

/* --- AVX-512F, float32 weights in blocks (``blocked``): out[i, j] = sum_k x[i, k] w[j, k] with
 * each expert matrix (R, K) stored as R/16 blocks of (K, 16), block b holding rows 16b..16b+15
 * of w column by column (w.view(R/16, 16, K).transpose(1, 2): kernels.block_weights). A tile is
 * MR x rows against one or two blocks: per k, each block's 16 weights are one load and each x
 * element one broadcast, both used by MR (or 2 MR) FMAs into accumulators that stay in zmm
 * registers for the whole K; no horizontal sums, which at the short rows of a small model
 * (K = 256) cost the row-major dot products above about a third of their time. Each output
 * element is one float32 FMA chain over k = 0..K-1, in order, whatever the tile, batch or
 * thread count: a row's result does not depend on what it is batched with. Against the
 * row-major path on the 2-core EPYC (Zen 4), 4 experts of D=256, F=704 (configs/tiny.yaml's):
 * one thread 1.33x at 4 rows per expert, 1.70x at 8, 1.29x at 16, 1.25x at 64; two threads
 * 1.30x, 1.71x, 1.41x, 1.24x. Where reading the weights bounds a call (8 experts of D=512,
 * F=1408 at 4 rows) 1.07x. Medians of 7 alternating rounds of 50 calls. */
#define AVX512F __attribute__((target("avx512f")))
#define BC_MAX_MR 12 /* 2 x 12 accumulators + 2 weight vectors of the 32 zmm registers */
/* Slices of at least BC_PF_MIN_ROWS rows prefetch their blocks BC_PF_AHEAD bytes past the
 * tile being read, into L2; thinner ones leave the stream to the hardware prefetcher. Where the
 * rows make a tile compute-bound the loop asks for the stream too slowly for the hardware
 * prefetcher alone; where they are few, software prefetches only get in its way (each block is
 * one sequential run of K * 64 bytes). Cold, medians of ~90-470 interleaved rounds on the
 * 2-core EPYC, bound/kernel with against without the prefetch (fast / slow memory phase):
 * 8 experts of D=512, F=1408 at 4 rows each 0.70 / 0.89 against 0.77 / 0.92, at 5 1 9 3 4 6 2 2
 * rows 0.74 / 0.90 against 0.83 / 0.98; at 16 rows each 0.41 / 0.62 against 0.39 / 0.61;
 * configs/tiny.yaml's experts (D=256, F=704) at 16 rows 0.36 / 0.56 against 0.31 / 0.51, at 4
 * rows even; 64-row decode projections (blocked_linear) 2-3 % faster with it. (An earlier test,
 * with the prefetch on for every slice: 64 KB beat 16 KB by 1.06-1.12x.) */
#ifndef BC_PF_AHEAD
#define BC_PF_AHEAD 65536
#endif
#ifndef BC_PF_MIN_ROWS
#define BC_PF_MIN_ROWS 8
#endif

static inline __attribute__((always_inline)) AVX512F void
tile_bc(const float *x, int64_t ldx, const int MR, const int NB, int64_t K, const float *wb,
        const char *pf, int64_t npf, float *y, int64_t ldy) {
    __m512 acc[BC_MAX_MR][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const float *w1 = wb + K * 16; /* the next block (NB == 2) */
    int64_t credit = 0;
    for (int64_t k = 0; k < K; k++) {
        prefetch_tick(&pf, &credit, npf, K);
        const __m512 a = _mm512_loadu_ps(wb + k * 16);
        const __m512 b = NB == 2 ? _mm512_loadu_ps(w1 + k * 16) : a;
        for (int i = 0; i < MR; i++) {
            const __m512 xv = _mm512_set1_ps(x[i * ldx + k]);
            acc[i][0] = _mm512_fmadd_ps(a, xv, acc[i][0]);
            if (NB == 2) acc[i][1] = _mm512_fmadd_ps(b, xv, acc[i][1]);
        }
    }
    for (int i = 0; i < MR; i++) {
        _mm512_storeu_ps(y + i * ldy, acc[i][0]);
        if (NB == 2) _mm512_storeu_ps(y + i * ldy + 16, acc[i][1]);
    }
}

#define BC_CASE(MR)                                                                          \
    case MR:                                                                                 \
        if (nb == 2) tile_bc(x, ldx, MR, 2, K, wb, pf, npf, y, ldy);                         \
        else tile_bc(x, ldx, MR, 1, K, wb, pf, npf, y, ldy);                                 \
        return;

static AVX512F void tile_bc_any(const float *x, int64_t ldx, int mr, int nb, int64_t K,
                                const float *wb, const char *pf, int64_t npf, float *y,
                                int64_t ldy) {
    switch (mr) {
        BC_CASE(1) BC_CASE(2) BC_CASE(3) BC_CASE(4) BC_CASE(5) BC_CASE(6) BC_CASE(7) BC_CASE(8)
        BC_CASE(9) BC_CASE(10) BC_CASE(11) BC_CASE(12)
    default:
        abort(); /* unreachable: dot_rows_bc asks for 1..BC_MAX_MR */
    }
}

/* y[i * ldy + j] = dot(x_i, w_j) for i < n, j < 16 * nblocks; wb: the first of nblocks blocks
 * of (K, 16). Tiles of two blocks; more than BC_MAX_MR rows go in even groups, the first group
 * streaming the tile from memory (prefetched for BC_PF_MIN_ROWS rows and more), the others
 * finding it in L1/L2. */
static AVX512F void dot_rows_bc(const float *x, int64_t ldx, int n, const float *wb, int64_t K,
                                int64_t nblocks, float *y, int64_t ldy) {
    const int groups = (n + BC_MAX_MR - 1) / BC_MAX_MR;
    const int64_t block_bytes = K * 64, total = nblocks * block_bytes;
    int64_t pf_done = 0; /* bytes of these blocks prefetched so far: BC_PF_AHEAD past each tile */
    for (int64_t jb = 0; jb < nblocks;) {
        const int nb = nblocks - jb >= 2 ? 2 : 1;
        const float *w = wb + jb * K * 16;
        const char *pf = NULL;
        const int64_t npf = n < BC_PF_MIN_ROWS ? 0
                                                : prefetch_span((const char *)wb,
                                                                (jb + nb) * block_bytes + BC_PF_AHEAD,
                                                                total, &pf_done, &pf);
        for (int g = 0, i0 = 0; g < groups; g++) {
            const int mr = (n - i0 + (groups - g) - 1) / (groups - g);
            tile_bc_any(x + (int64_t)i0 * ldx, ldx, mr, nb, K, w, pf, g == 0 ? npf : 0,
                        y + (int64_t)i0 * ldy + jb * 16, ldy);
            i0 += mr;
        }
        jb += nb;
    }
}

/* --- AVX512-BF16, bfloat16 weights in groups of pairs (``blocked`` with bfloat16 weights and
 * x): the float32 blocks' idea on vdpbf16ps. Each expert matrix (R, K), R a multiple of 64, is
 * stored as R/64 groups of (K/2, 4, 16, 2): group g holds rows 64g..64g+63, and for each pair of
 * columns (2p, 2p+1) its four blocks of 16 rows, each row's two weights side by side
 * (w.view(R/64, 4, 16, K/2, 2).permute(0, 3, 1, 2, 4): kernels.block_weights). So a tile reads
 * one contiguous stream: per pair, four 64-byte loads of 32 weights, and one vdpbf16ps per load
 * and x row (the row's pair broadcast to every lane) adds both products into 16 float32
 * accumulators; a thread's slice of an expert is one sequential stream from end to end.
 *
 * Why the groups: with the float32 blocks' layout (each block of 16 rows its own (K/2, 16, 2)
 * run) a tile reads 2-4 streams a block apart, each only K * 32 bytes long (16 KB at K = 512),
 * and the hardware prefetcher, retrained at every tile, fetched the experts of a cold 16-token
 * bfloat16 layer (8 of D=512, F=1408; 5 1 9 3 4 6 2 2 rows) at 0.67-0.72x the bandwidth of a
 * plain read in the machine's fast memory phase (~55 GB/s), the row-major kernel at 0.59x,
 * a plain sequential sweep of the same bytes at 1.05x. The groups: 0.76x (0.81x on huge
 * pages). Medians of 150-400 interleaved rounds on the 2-core EPYC (Zen 4).
 *
 * Like the float32 blocks: no horizontal sum per output (the row-major dot products above
 * reduce a zmm for every output element), and each output element is one chain of pair
 * products over p = 0..K/2-1 in order, whatever the tile, batch or thread count. The products
 * are the row-major AVX512-BF16 path's; only the order of their float32 sums differs. */
#define G4_ROWS 64   /* rows of a group: 4 blocks of 16 */
#define G4_MAX_MR 6  /* 6 x 4 accumulators + 4 weight vectors + the broadcast x of the 32 zmm */
static inline __attribute__((always_inline)) AVX512 void
tile_g4(const uint16_t *x, int64_t ldx, const int MR, int64_t K, const uint16_t *wg, float *y,
        int64_t ldy) {
    __m512 acc[G4_MAX_MR][4];
    for (int i = 0; i < MR; i++)
        for (int b = 0; b < 4; b++) acc[i][b] = _mm512_setzero_ps();
    for (int64_t p = 0; p < K / 2; p++) {
        const uint16_t *wp = wg + p * 128;
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp), w1 = (__m512bh)_mm512_loadu_si512(wp + 32),
                       w2 = (__m512bh)_mm512_loadu_si512(wp + 64), w3 = (__m512bh)_mm512_loadu_si512(wp + 96);
        for (int i = 0; i < MR; i++) {
            int32_t pair;
            memcpy(&pair, x + i * ldx + 2 * p, 4);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xv, w0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xv, w1);
            acc[i][2] = _mm512_dpbf16_ps(acc[i][2], xv, w2);
            acc[i][3] = _mm512_dpbf16_ps(acc[i][3], xv, w3);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int b = 0; b < 4; b++) _mm512_storeu_ps(y + i * ldy + 16 * b, acc[i][b]);
}

#define G4_CASE(MR)                                                                          \
    case MR:                                                                                 \
        tile_g4(x, ldx, MR, K, wg, y, ldy);                                                  \
        return;

static AVX512 void tile_g4_any(const uint16_t *x, int64_t ldx, int mr, int64_t K,
                               const uint16_t *wg, float *y, int64_t ldy) {
    switch (mr) {
        G4_CASE(1) G4_CASE(2) G4_CASE(3) G4_CASE(4) G4_CASE(5) G4_CASE(6)
    default:
        abort(); /* unreachable: dot_rows_g4 asks for 1..G4_MAX_MR */
    }
}

/* y[i * ldy + j] = dot(x_i, w_j) for i < n, j < 64 * ngroups; x: bfloat16 rows of ldx
 * elements; wg: the first of ngroups groups of (K/2, 4, 16, 2), K even. More than G4_MAX_MR
 * rows go in even passes over each group, the first streaming it from memory, the others
 * finding it in L2 (64 rows x K bfloat16: 64 KB at K = 512, 176 KB at K = 1408).
 *
 * No software prefetch: the stream is sequential, and the hardware prefetcher alone read it
 * fastest. Prefetching 32-64 KB ahead into L2 slowed a cold 16-token layer's experts from 0.80x
 * to 0.60-0.75x of a plain read of the same bytes (medians of ~300 interleaved rounds in the
 * machine's fast memory phase), whether for every slice or only those of 2, 4 or 6 rows and
 * more; unlike the float32 blocks' it slowed 16-row slices too (0.35x against 0.375x; tiny
 * experts 0.27x against 0.29x). */
static AVX512 void dot_rows_g4(const uint16_t *x, int64_t ldx, int n, const uint16_t *wg,
                               int64_t K, int64_t ngroups, float *y, int64_t ldy) {
    const int passes = (n + G4_MAX_MR - 1) / G4_MAX_MR;
    for (int64_t g = 0; g < ngroups; g++)
        for (int s = 0, i0 = 0; s < passes; s++) {
            const int mr = (n - i0 + (passes - s) - 1) / (passes - s);
            tile_g4_any(x + (int64_t)i0 * ldx, ldx, mr, K, wg + g * K * G4_ROWS,
                        y + (int64_t)i0 * ldy + g * G4_ROWS, ldy);
            i0 += mr;
        }
}

/* Whether this CPU (and OS) runs the blocked float32 path. */
int thin_experts_has_avx512f(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

/* split [0, total) into nt slices on multiples of ``unit`` (keeps vector loops whole); the last
 * slice also takes a remainder shorter than ``unit`` */
static void slice(int64_t total, int64_t unit, int t, int nt, int64_t *lo, int64_t *hi) {
    const int64_t blocks = total / unit;
    *lo = blocks * t / nt * unit;
    *hi = t == nt - 1 ? total : blocks * (t + 1) / nt * unit;
}

/* y (n, N) = x (n, K) @ w.T for float32 w (N, K) in blocks (N a multiple of 16): the blocked
 * tile of the experts above, for a dense layer's few rows (a decode step's projections). Threads
 * split the blocks. Returns 0, or 4 where AVX-512F is missing or N is not a multiple of 16. */
int blocked_linear(const float *x, int64_t n, int64_t K, const float *wb, int64_t N, float *y,
                   int n_threads) {
    if (N % 16 || K <= 0 || n < 0 || !thin_experts_has_avx512f()) return 4;
    if (n == 0) return 0;
    const int64_t nblocks = N / 16;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > nblocks) n_threads = (int)nblocks;
#pragma omp parallel num_threads(n_threads)
    {
        int64_t lo, hi;
        slice(nblocks, 1, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        if (hi > lo) dot_rows_bc(x, K, (int)n, wb + lo * K * 16, K, hi - lo, y + lo * 16, N);
    }
    return 0;
}

/* Whether this CPU (and OS) runs the AVX512-BF16 path. */
int thin_experts_has_avx512_bf16(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

static void bf16_to_f32(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t k = 0; k < n; k += 8) _mm256_storeu_ps(dst + k, bf16_plain8(src + k));
}

/* out_T[token_A[a]] += weight_A[a] * out_A[a] over a < A, for columns [lo, hi): the gate
 * weights' combine, in the order of the assignments. A product and then a sum, each rounded,
 * never fused into one FMA: the numbers of PyTorch's ``y * w`` followed by ``index_add_``.
 * bf16: out_T is bfloat16, and out_A rows, weights, products and sums are rounded to bfloat16
 * as PyTorch's bfloat16 path rounds them (``y.to(bfloat16) * w.to(bfloat16)``, then
 * ``index_add_`` in bfloat16). */
__attribute__((noinline, optimize("fp-contract=off"))) static void
combine_rows(const float *out_A, int64_t A, int64_t D, const int64_t *token_A,
             const float *weight_A, void *out_T, int bf16, int64_t lo, int64_t hi) {
    for (int64_t a = 0; a < A; a++) {
        const float *y = out_A + a * D;
        if (bf16) {
            const float w = from_bf16_bits(to_bf16_bits(weight_A[a]));
            uint16_t *o = (uint16_t *)out_T + token_A[a] * D;
            for (int64_t c = lo; c < hi; c++) {
                const float yc = from_bf16_bits(to_bf16_bits(y[c]));
                const float p = from_bf16_bits(to_bf16_bits(w * yc));
                o[c] = to_bf16_bits(from_bf16_bits(o[c]) + p);
            }
        } else {
            const float w = weight_A[a];
            float *o = (float *)out_T + token_A[a] * D;
            for (int64_t c = lo; c < hi; c++) {
                const float p = w * y[c];
                o[c] = o[c] + p;
            }
        }
    }
}

static int experts_impl(const void *x, int x_bf16, const int64_t *starts, const int64_t *counts,
                        int n_experts, const void *const *w13, const void *const *w2, int bf16,
                        int64_t D, int64_t F, float *act, float *out, int n_threads,
                        int use_avx512, int blocked, int64_t comb_rows, const int64_t *comb_token,
                        const float *comb_weight, void *comb_out, int comb_bf16);

/* x is (A, D) float32, or bfloat16 when x_bf16 is set. With bfloat16 weights and x, and
 * use_avx512 set on a CPU that has AVX512-BF16, both phases run on vdpbf16ps, act rounded to
 * bfloat16 between them. act: scratch of A * F floats (act of row i at i * F, float32 on the
 * AVX2 path; bfloat16 at element i * F of its first half on the AVX512 path).
 * Returns 0 on success, a positive code for arguments this kernel does not take. */
int thin_experts(const void *x, int x_bf16, const int64_t *starts, const int64_t *counts,
                 int n_experts, const void *const *w13, const void *const *w2, int bf16,
                 int64_t D, int64_t F, float *act, float *out, int n_threads, int use_avx512, int blocked) {
    return experts_impl(x, x_bf16, starts, counts, n_experts, w13, w2, bf16, D, F, act, out,
                        n_threads, use_avx512, blocked, 0, NULL, NULL, NULL, 0);
}

/* The end of a top-k MoE layer in one call, for few tokens (a decode step): T tokens' k choices
 * each (expert_TK[t * k + j] with gate weight weight_TK[t * k + j]) are sorted by expert,
 * stably (by token, then slot, as a stable sort of the flat list orders them), the tokens' rows
 * of x (T, D) gathered in that order, run through their experts (as thin_experts with these
 * x_bf16 = bf16 and blocked flags; use_avx512 set) and each output row, times its gate weight,
 * added into out (T, D) (zeroed here; x's dtype) in the sorted order. Those are the numbers of
 * route's sort, index_select, run_experts, the weight product and index_add_ in PyTorch, bit
 * for bit, without the ~15 small tensor ops in between. Writes the sorted assignments
 * (token_A, expert_A, weight_A; T * k each) and counts_E. w13/w2: every expert's weights (an
 * expert no token chose may be NULL). Returns 0, a thin_experts code, 5 for an expert index
 * out of range, 6 for a chosen expert without weights, or 7, having written counts_E only,
 * when an expert got more than max_rows rows (the caller takes its general path). */
int moe_topk_experts(const void *x, int64_t T, int k, const int64_t *expert_TK,
                     const float *weight_TK, int n_experts, const void *const *w13,
                     const void *const *w2, int bf16, int blocked, int64_t D, int64_t F,
                     int64_t max_rows, int64_t *token_A, int64_t *expert_A, float *weight_A,
                     int64_t *counts_E, void *out, int n_threads) {
    const int64_t A = T * k, es = bf16 ? 2 : 4;
    if (T < 0 || k <= 0 || n_experts <= 0 || D <= 0 || F <= 0) return 1;
    for (int e = 0; e < n_experts; e++) counts_E[e] = 0;
    for (int64_t a = 0; a < A; a++) {
        const int64_t e = expert_TK[a];
        if (e < 0 || e >= n_experts) return 5;
        counts_E[e]++;
    }
    for (int e = 0; e < n_experts; e++) {
        if (counts_E[e] > max_rows) return 7;
        if (counts_E[e] > 0 && (!w13[e] || !w2[e])) return 6;
    }
    memset(out, 0, (size_t)(T * D * es));
    if (A == 0) return 0;
    int64_t *starts = (int64_t *)malloc((size_t)n_experts * 2 * sizeof(int64_t));
    char *xg = (char *)malloc((size_t)(A * D * es));
    float *yg = (float *)malloc((size_t)(A * D) * sizeof(float));
    float *act = (float *)malloc((size_t)(A * F) * sizeof(float));
    if (!starts || !xg || !yg || !act) {
        free(starts);
        free(xg);
        free(yg);
        free(act);
        return 3;
    }
    int64_t *next = starts + n_experts;
    for (int64_t e = 0, s = 0; e < n_experts; e++) {
        starts[e] = next[e] = s;
        s += counts_E[e];
    }
    for (int64_t a = 0; a < A; a++) { /* counting sort: stable */
        const int64_t e = expert_TK[a], pos = next[e]++, t = a / k;
        token_A[pos] = t;
        expert_A[pos] = e;
        weight_A[pos] = weight_TK[a];
        memcpy(xg + pos * D * es, (const char *)x + t * D * es, (size_t)(D * es));
    }
    const int rc = experts_impl(xg, bf16, starts, counts_E, n_experts, w13, w2, bf16, D, F, act,
                                yg, n_threads, 1, blocked, A, token_A, weight_A, out, bf16);
    free(starts);
    free(xg);
    free(yg);
    free(act);
    return rc;
}

/* in moe_gate.c */
int moe_gate_logits_bf16(const uint16_t *x, int64_t T, int64_t D, const uint16_t *w, int64_t E,
                         int64_t KB, float *out);
int moe_gate_logits_f32(const float *x, int64_t T, int64_t D, const float *w, int64_t E,
                        float *out);
int moe_route_topk(const float *logits, int64_t T, int64_t E, int64_t k, const float *bias,
                   int64_t *expert_TK, float *weight_TK);

/* A top-k MoE layer's inference for few tokens in one call: the gate's logits, the top-k choice
 * and moe_topk_experts. With gate_w (E, D) in the experts' dtype the logits are computed here
 * (bfloat16: moe_gate_logits_bf16 in pieces of gate_block; float32: moe_gate_logits_f32) and
 * written to logits_TE (T, E);
 * without, logits_TE holds them. The choice is moe_route_topk's (bias_E: selection only, may
 * be NULL), written to expert_TK and weight_TK (T, k). What the caller does in PyTorch
 * otherwise, in ~10 tensor ops between the gate and the experts: right after a decode step's
 * expert weights went through the caches, each costs 5-30 us there (a cold 16-token layer of
 * the d=512, f=1408 bench spent ~120 us outside the experts).
 *
 * Returns moe_topk_experts' codes; 8 having written the logits only (where the caller routes
 * with PyTorch: see moe_route_topk); 1 for a gate moe_gate.c does not compute. */
int moe_layer_topk(const void *x, int64_t T, int64_t D, const void *gate_w, int64_t gate_block,
                   float *logits_TE, int64_t E, int k, const float *bias_E, int64_t *expert_TK,
                   float *weight_TK, const void *const *w13, const void *const *w2, int bf16,
                   int blocked, int64_t F, int64_t max_rows, int64_t *token_A, int64_t *expert_A,
                   float *weight_A, int64_t *counts_E, void *out, int n_threads) {
    if (gate_w) {
        const int rc = bf16 ? moe_gate_logits_bf16((const uint16_t *)x, T, D,
                                                   (const uint16_t *)gate_w, E, gate_block,
                                                   logits_TE)
                            : moe_gate_logits_f32((const float *)x, T, D, (const float *)gate_w,
                                                  E, logits_TE);
        if (rc) return rc;
    }
    const int rc = moe_route_topk(logits_TE, T, E, k, bias_E, expert_TK, weight_TK);
    if (rc) return rc;
    return moe_topk_experts(x, T, k, expert_TK, weight_TK, (int)E, w13, w2, bf16, blocked, D, F,
                            max_rows, token_A, expert_A, weight_A, counts_E, out, n_threads);
}

static int experts_impl(const void *x, int x_bf16, const int64_t *starts, const int64_t *counts,
                        int n_experts, const void *const *w13, const void *const *w2, int bf16,
                        int64_t D, int64_t F, float *act, float *out, int n_threads,
                        int use_avx512, int blocked, int64_t comb_rows, const int64_t *comb_token,
                        const float *comb_weight, void *comb_out, int comb_bf16) {
    if (D % 8 || F % 8 || D <= 0 || F <= 0) return 1;
    if (blocked && (bf16 != x_bf16 || (bf16 ? D % G4_ROWS || F % G4_ROWS : D % 16 || F % 16) ||
                    !(bf16 ? thin_experts_has_avx512_bf16() : thin_experts_has_avx512f())))
        return 4;
    int64_t maxn = 0, rows = 0;
    for (int e = 0; e < n_experts; e++) {
        if (counts[e] < 0 || counts[e] > (blocked ? MAX_ROWS_BLOCKED : MAX_ROWS)) return 2;
        if (counts[e] > maxn) maxn = counts[e];
        if (counts[e] > 0 && starts[e] + counts[e] > rows) rows = starts[e] + counts[e];
    }
    if (maxn == 0) return 0;
    /* bfloat16 blocks always take vdpbf16ps (checked above) */
    const int dp = bf16 && x_bf16 && (use_avx512 || blocked) && thin_experts_has_avx512_bf16();
    const int64_t unit = blocked && bf16 ? G4_ROWS : bf16 || blocked ? 16 : 8;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > F / unit) n_threads = (int)(F / unit);
    if (n_threads < 1) n_threads = 1;
    /* scratch: each thread's gate and up columns, (2 * maxn) rows of its slice of F; x as
     * float32 (in lane order for bf16 weights) unless given so or used as bfloat16; a widened
     * copy of 4 weight rows per thread for bf16 on the AVX2 path */
    const int64_t kmax = D > F ? D : F;
    const int need_xf = !dp && (bf16 || x_bf16), need_wide = bf16 && !dp;
    float *h = (float *)malloc((size_t)(2 * maxn * F) * sizeof(float));
    float *xf = need_xf ? (float *)malloc((size_t)(rows * D) * sizeof(float)) : NULL;
    float *wide = need_wide ? (float *)malloc((size_t)n_threads * 4 * kmax * sizeof(float)) : NULL;
    /* dp: act as bfloat16 rows of F; thread slices of F start on multiples of unit = 16, so
     * each thread writes its own elements (whole 32-byte blocks but for an 8-element tail) */
    uint16_t *act_bf = (uint16_t *)act;
    if (!h || (need_xf && !xf) || (need_wide && !wide)) {
        free(h);
        free(xf);
        free(wide);
        return 3;
    }
    if (need_xf)
        for (int e = 0; e < n_experts; e++)
            for (int64_t i = starts[e]; i < starts[e] + counts[e]; i++) {
                float *row = xf + i * D;
                if (x_bf16) bf16_to_f32((const uint16_t *)x + i * D, row, D);
                if (bf16) to_lane_order(x_bf16 ? row : (const float *)x + i * D, row, D);
            }
    const float *xin = need_xf ? xf : (const float *)x;
    const int64_t es = bf16 ? 2 : 4;
#pragma omp parallel num_threads(n_threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float *wt = need_wide ? wide + (int64_t)t * 4 * kmax : NULL;
        int64_t lo, hi;
        slice(F, unit, t, nt, &lo, &hi);
        const int64_t width = hi - lo;
        float *g = h + 2 * maxn * lo, *u = g + maxn * width;
        for (int e = 0; e < n_experts && width > 0; e++) {
            const int n = (int)counts[e];
            if (n == 0) continue;
            const char *w = (const char *)w13[e];
            if (blocked && dp) {
                const uint16_t *xe = (const uint16_t *)x + starts[e] * D, *wh = (const uint16_t *)w;
                dot_rows_g4(xe, D, n, wh + lo * D, D, width / G4_ROWS, g, width);       /* gate */
                dot_rows_g4(xe, D, n, wh + (F + lo) * D, D, width / G4_ROWS, u, width); /* up */
            } else if (blocked) {
                const float *xe = (const float *)x + starts[e] * D, *wf = (const float *)w;
                dot_rows_bc(xe, D, n, wf + lo * D, D, width / 16, g, width);           /* gate */
                dot_rows_bc(xe, D, n, wf + (F + lo) * D, D, width / 16, u, width);     /* up */
            } else if (dp) {
                const uint16_t *xe = (const uint16_t *)x + starts[e] * D;
                dot_rows_dp(xe, n, (const uint16_t *)w + lo * D, D, width, g, width);
                dot_rows_dp(xe, n, (const uint16_t *)w + (F + lo) * D, D, width, u, width);
            } else {
                const float *xe = xin + starts[e] * D;
                dot_rows(xe, n, w + lo * D * es, bf16, D, width, g, width, wt);       /* gate */
                dot_rows(xe, n, w + (F + lo) * D * es, bf16, D, width, u, width, wt); /* up */
            }
            for (int i = 0; i < n; i++) {
                float *gi = g + (int64_t)i * width, *dst = act + (starts[e] + i) * F + lo;
                if (dp) { /* act is phase 2's x: bfloat16, plain order */
                    swiglu(gi, u + (int64_t)i * width, gi, width);
                    act_to_bf16(gi, act_bf + (starts[e] + i) * F + lo, width);
                } else if (bf16) { /* act is phase 2's x: lane order (lo is a multiple of 16) */
                    swiglu(gi, u + (int64_t)i * width, gi, width);
                    to_lane_order(gi, dst, width);
                } else {
                    swiglu(gi, u + (int64_t)i * width, dst, width);
                }
            }
        }
#pragma omp barrier
        slice(D, blocked ? (bf16 ? G4_ROWS : 16) : 8, t, nt, &lo, &hi);
        for (int e = 0; e < n_experts && hi > lo; e++) {
            const int n = (int)counts[e];
            if (n == 0) continue;
            if (blocked && dp)
                dot_rows_g4(act_bf + starts[e] * F, F, n, (const uint16_t *)w2[e] + lo * F, F,
                            (hi - lo) / G4_ROWS, out + starts[e] * D + lo, D);
            else if (blocked)
                dot_rows_bc(act + starts[e] * F, F, n, (const float *)w2[e] + lo * F, F, (hi - lo) / 16,
                            out + starts[e] * D + lo, D);
            else if (dp)
                dot_rows_dp(act_bf + starts[e] * F, n, (const uint16_t *)w2[e] + lo * F, F, hi - lo,
                            out + starts[e] * D + lo, D);
            else
                dot_rows(act + starts[e] * F, n, (const char *)w2[e] + lo * F * es, bf16, F, hi - lo,
                         out + starts[e] * D + lo, D, wt);
        }
        /* this thread's columns of every output row are done: combine them (no barrier) */
        if (comb_out && hi > lo)
            combine_rows(out, comb_rows, D, comb_token, comb_weight, comb_out, comb_bf16, lo, hi);
    }
    free(h);
    free(xf);
    free(wide);
    return 0;
}
