/* An MoE gate's logits for bfloat16 tokens and weights: out (T, E) = x (T, D) @ w (E, D)^T,
 * each sum rounded to bfloat16 (to nearest even) and stored as float32.
 *
 * Why: at a decode step's few tokens PyTorch's bfloat16 linear costs 17 us warm and ~77 us right
 * after the experts' weights streamed through the caches (a cold 16-token layer of the
 * d=512, f=1408 bench: ~8 % of the layer), dispatch and oneDNN's code cold. This is a few
 * hundred instructions.
 *
 * Numbers: the order oneDNN's bfloat16 GEMM sums in, so that the logits are F.linear's bits
 * (the MoE layer's fused and general paths, and transformers' Mixtral, route alike): the
 * columns in pieces of KB, each piece one vdpbf16ps chain over its pairs in order (16 experts
 * per zmm), the pieces' float32 sums added left to right, then rounded. oneDNN's piece depends
 * on the width (on the 2-core EPYC: the whole row up to D = 512, 512 at D = 1024, 1024 at
 * 2048 and 4096), so kernels.native_gate_block finds it with a probe and the caller uses this
 * only where one matched; a single chain over D = 4096 differed from F.linear in 56 of 153600
 * logits by one bfloat16 step.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec_math.h"

#define GATE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define GATE_TOKENS 4 /* tokens per pass: 4 independent chains hide vdpbf16ps' latency */

/* Returns 0; 1 for a non-positive or odd D or KB, T < 0 or E < 1; 3 out of memory. */
GATE_AVX512 int moe_gate_logits_bf16(const uint16_t *x, int64_t T, int64_t D, const uint16_t *w,
                                     int64_t E, int64_t KB, float *out) {
    if (D <= 0 || D % 2 || KB <= 0 || KB % 2 || T < 0 || E < 1) return 1;
    /* w for 16 experts at a time, pairs side by side: (D/2, 16, 2), zeros past E */
    uint16_t *wv = (uint16_t *)aligned_alloc(64, (size_t)(D * 32 * sizeof(uint16_t)));
    if (!wv) return 3;
    for (int64_t e0 = 0; e0 < E; e0 += 16) {
        const int64_t n = E - e0 < 16 ? E - e0 : 16;
        memset(wv, 0, (size_t)(D * 32 * sizeof(uint16_t)));
        for (int64_t e = 0; e < n; e++)
            for (int64_t p = 0; p < D / 2; p++) {
                wv[p * 32 + 2 * e] = w[(e0 + e) * D + 2 * p];
                wv[p * 32 + 2 * e + 1] = w[(e0 + e) * D + 2 * p + 1];
            }
        for (int64_t t0 = 0; t0 < T; t0 += GATE_TOKENS) {
            const int64_t nt = T - t0 < GATE_TOKENS ? T - t0 : GATE_TOKENS;
            __m512 acc[GATE_TOKENS], part[GATE_TOKENS];
            for (int64_t k0 = 0; k0 < D; k0 += KB) {
                const int64_t p1 = (k0 + KB < D ? k0 + KB : D) / 2;
                for (int i = 0; i < GATE_TOKENS; i++) part[i] = _mm512_setzero_ps();
                for (int64_t p = k0 / 2; p < p1; p++) {
                    const __m512bh wp = (__m512bh)_mm512_load_si512(wv + p * 32);
                    for (int64_t i = 0; i < nt; i++) {
                        int32_t pair;
                        memcpy(&pair, x + (t0 + i) * D + 2 * p, 4);
                        part[i] = _mm512_dpbf16_ps(part[i], (__m512bh)_mm512_set1_epi32(pair), wp);
                    }
                }
                for (int i = 0; i < GATE_TOKENS; i++)
                    acc[i] = k0 == 0 ? part[i] : _mm512_add_ps(acc[i], part[i]);
            }
            for (int64_t i = 0; i < nt; i++) {
                float lanes[16];
                _mm512_storeu_ps(lanes, acc[i]);
                for (int64_t e = 0; e < n; e++)
                    out[(t0 + i) * E + e0 + e] = from_bf16_bits(to_bf16_bits(lanes[e]));
            }
        }
    }
    free(wv);
    return 0;
}

/* --- float32 gate with MKL's bits -----------------------------------------------------------
 * PyTorch's float32 F.linear(x, w) is one MKL SGEMM('T', 'N', m=E, n=T, k=D). On the 2-core
 * EPYC (MKL 2024 in torch 2.13, its AVX2 kernels on this AMD CPU) for E <= 8 experts it sums
 * each logit in 4 lanes, lane j taking the products k = j mod 4 in order, each product rounded
 * before it is added (no FMA), and ends with (l0 + l2) + (l1 + l3); for one token (a GEMV)
 * the first 4 products go into lane 0 in order first. Rows not 16-byte aligned, or D not a
 * multiple of 4, move a few products into such a head or a tail (below). Larger E takes other
 * kernels whose token split depends on the thread count, so this stops at 8 experts; and
 * kernels.native_gate_f32_ok compares with F.linear once per shape before anything uses it.
 *
 * Why: right after a decode step's expert weights streamed through the caches, PyTorch's gate
 * costs ~60 us of a cold 16-token layer of the d=512, f=1408 bench (dispatch and MKL's code
 * cold); this is ~2k vector instructions. */

#define GATE32_AVX512 __attribute__((target("avx512f"), optimize("fp-contract=off")))

/* MKL's 4-lane dot product for one logit: `peel` leading products summed in order into lane 0,
 * then lanes over k = peel + 4i + j, then (l0 + l2) + (l1 + l3), then the tail in order. */
static GATE32_AVX512 float gate32_dot4(const float *a, const float *b, int64_t D, int64_t peel) {
    if (peel > D) peel = D;
    float l[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t k = 0;
    for (; k < peel; k++) {
        const float p = a[k] * b[k];
        l[0] = l[0] + p;
    }
    for (; k + 4 <= D; k += 4)
        for (int j = 0; j < 4; j++) {
            const float p = a[k + j] * b[k + j];
            l[j] = l[j] + p;
        }
    float sum = (l[0] + l[2]) + (l[1] + l[3]);
    for (; k < D; k++) {
        const float p = a[k] * b[k];
        sum = sum + p;
    }
    return sum;
}

/* Returns 0; 1 for E not 4 or 8, D < 1 or T < 0; 3 out of memory. */
GATE32_AVX512 int moe_gate_logits_f32(const float *x, int64_t T, int64_t D, const float *w,
                                      int64_t E, float *out) {
    if ((E != 4 && E != 8) || D < 1 || T < 0) return 1;
    /* where the rows start within 16 bytes moves MKL's heads (in floats: address / 4 mod 4) */
    const int64_t x_mis = (int64_t)(((uintptr_t)x / 4) % 4), w_mis = (int64_t)(((uintptr_t)w / 4) % 4);
    if (D % 4 || x_mis || w_mis) { /* heads and tails: one logit at a time */
        for (int64_t t = 0; t < T; t++)
            for (int64_t e = 0; e < E; e++) {
                const int64_t peel = T == 1 ? 4 - (w_mis + e * D) % 4 : (4 - (x_mis + t * D) % 4) % 4;
                out[t * E + e] = gate32_dot4(x + t * D, w + e * D, D, peel);
            }
        return 0;
    }
    /* 4 experts' 4 lanes per zmm: wv[s][e][j] = w[e][4s + j] */
    const int64_t S = D / 4, G = E / 4;
    float *wv = (float *)aligned_alloc(64, (size_t)(D * E * sizeof(float)));
    if (!wv) return 3;
    for (int64_t st = 0; st < S; st++)
        for (int64_t e = 0; e < E; e++) memcpy(wv + (st * E + e) * 4, w + e * D + 4 * st, 16);
    const int64_t s0 = T == 1 ? 1 : 0; /* a GEMV sums its first 4 products into lane 0 first */
    for (int64_t t0 = 0; t0 < T; t0 += 4) {
        const int64_t nt = T - t0 < 4 ? T - t0 : 4;
        __m512 acc[4][2];
        for (int64_t i = 0; i < nt; i++)
            for (int64_t g = 0; g < G; g++) {
                float head[16] = {0};
                if (s0)
                    for (int64_t e = 0; e < 4; e++)
                        for (int64_t k = 0; k < 4; k++) {
                            const float p = x[k] * w[(4 * g + e) * D + k];
                            head[4 * e] = head[4 * e] + p;
                        }
                acc[i][g] = _mm512_loadu_ps(head);
            }
        for (int64_t st = s0; st < S; st++) {
            const __m512 w0 = _mm512_load_ps(wv + st * E * 4);
            const __m512 w1 = G == 2 ? _mm512_load_ps(wv + st * E * 4 + 16) : w0;
            for (int64_t i = 0; i < nt; i++) {
                const __m512 xb = _mm512_broadcast_f32x4(_mm_loadu_ps(x + (t0 + i) * D + 4 * st));
                acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_mul_ps(xb, w0));
                if (G == 2) acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_mul_ps(xb, w1));
            }
        }
        for (int64_t i = 0; i < nt; i++)
            for (int64_t g = 0; g < G; g++) {
                /* per 128-bit lane: (l0 + l2) + (l1 + l3) into its first element */
                __m512 v = acc[i][g];
                v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E));
                v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));
                float lanes[16];
                _mm512_storeu_ps(lanes, v);
                for (int64_t e = 0; e < 4; e++) out[(t0 + i) * E + 4 * g + e] = lanes[4 * e];
            }
    }
    free(wv);
    return 0;
}

/* --- Top-k routing with PyTorch's numbers (routers.topk_choice) ---------------------------
 * Per token: the k experts with the largest logits (plus bias_E where given: selection only)
 * in torch.topk's order, then the softmax of their unbiased logits as PyTorch's softmax kernel
 * computes it on AVX-512 (max, exp(x - max) with SLEEF's expf_u10, the sum left to right,
 * times 1 / sum), so that the weights are topk_choice's bits (kernels.native_route_ok checks
 * that with a probe, since a PyTorch build may compute its softmax otherwise).
 *
 * Equal logits are common in bfloat16 (8 bits of mantissa: a 16-token step of 8 experts had
 * a tie among some token's three largest more often than not), and torch.topk leaves their
 * order to its sort: below 64 * k experts std::nth_element, then std::sort of the first k - 1
 * (TopKImpl.h). route_select repeats libstdc++'s introselect and insertion sort step by step,
 * so ties come out in the same order. Where PyTorch takes std::partial_sort instead (64 * k
 * experts or more), or the introselect would fall back to its heap, or a value is NaN, a tie
 * among a token's k + 1 largest returns 8, having written nothing for that token on, and the
 * caller routes with PyTorch. */

#define ROUTE_AVX512 __attribute__((target("avx512f")))
#define ROUTE_MAX_K 15 /* PyTorch sums a full vector of 16 exps as a tree, fewer in order */

typedef struct {
    float v;
    int64_t e;
} route_elem;

/* comp(x, y) of TopKImpl.h for largest = true and no NaN: x before y */
static inline int route_before(const route_elem *x, const route_elem *y) { return x->v > y->v; }

static inline void route_swap(route_elem *a, route_elem *b) {
    const route_elem t = *a;
    *a = *b;
    *b = t;
}

/* libstdc++'s __insertion_sort */
static void route_insertion_sort(route_elem *first, route_elem *last) {
    if (first == last) return;
    for (route_elem *i = first + 1; i != last; i++) {
        const route_elem val = *i;
        if (route_before(&val, first)) {
            memmove(first + 1, first, (size_t)(i - first) * sizeof(route_elem));
            *first = val;
        } else {
            route_elem *hole = i, *next = i - 1;
            while (route_before(&val, next)) {
                *hole = *next;
                hole = next--;
            }
            *hole = val;
        }
    }
}

/* libstdc++'s std::nth_element (__introselect with its median-of-three pivot and unguarded
 * partition); returns 0, or 1 where it would fall back to its heap select (depth exhausted) */
static int route_nth_element(route_elem *first, route_elem *nth, route_elem *last) {
    if (first == last || nth == last) return 0;
    int depth = 0;
    for (int64_t n = last - first; n > 1; n >>= 1) depth++; /* 2 * floor(log2(n)) */
    depth *= 2;
    while (last - first > 3) {
        if (depth == 0) return 1;
        depth--;
        /* __unguarded_partition_pivot: the median of first + 1, mid and last - 1 to first */
        route_elem *a = first + 1, *b = first + (last - first) / 2, *c = last - 1;
        route_elem *m;
        if (route_before(a, b)) m = route_before(b, c) ? b : route_before(a, c) ? c : a;
        else m = route_before(a, c) ? a : route_before(b, c) ? c : b;
        route_swap(first, m);
        route_elem *lo = first + 1, *hi = last;
        for (;;) {
            while (route_before(lo, first)) lo++;
            hi--;
            while (route_before(first, hi)) hi--;
            if (!(lo < hi)) break;
            route_swap(lo, hi);
            lo++;
        }
        if (lo <= nth) first = lo;
        else last = lo;
    }
    route_insertion_sort(first, last);
    return 0;
}

/* exp(d) as SLEEF's expf_u10 computes it with FMA (SLEEF's xexpf: q = rint(d / ln 2), a
 * two-part reduction by ln 2, a degree-6 polynomial, 2^q in two factors); 0 below -104 and
 * infinity above 100, as there. */
static inline ROUTE_AVX512 __m512 sleef_expf16(__m512 d) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(d, _mm512_set1_ps(1.442695040888963407f)));
    const __m512 qf = _mm512_cvtepi32_ps(q);
    __m512 s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-0.693145751953125f), d);
    s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-1.428606765330187045e-06f), s);
    __m512 u = _mm512_set1_ps(0.000198527617612853646278381f);
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00139304355252534151077271f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00833336077630519866943359f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.0416664853692054748535156f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.166666671633720397949219f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.5f));
    u = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s));
    const __m512i h = _mm512_srai_epi32(q, 1), bias = _mm512_set1_epi32(127);
    const __m512 p1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(h, bias), 23));
    const __m512 p2 = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(q, h), bias), 23));
    u = _mm512_mul_ps(_mm512_mul_ps(u, p1), p2);
    u = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(d, _mm512_set1_ps(-104.f), _CMP_LT_OQ), u,
                             _mm512_setzero_ps());
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_set1_ps(100.f), d, _CMP_LT_OQ), u,
                                _mm512_set1_ps(__builtin_inff()));
}

/* Returns 0; 1 for k outside 1..min(E, ROUTE_MAX_K) or T < 0; 3 out of memory; 8 where the
 * caller routes (above). */
ROUTE_AVX512 int moe_route_topk(const float *logits, int64_t T, int64_t E, int64_t k,
                                const float *bias, int64_t *expert_TK, float *weight_TK) {
    if (k < 1 || k > ROUTE_MAX_K || k > E || T < 0) return 1;
    route_elem *q = (route_elem *)malloc((size_t)E * sizeof(route_elem));
    if (!q) return 3;
    const int partial_sort = k * 64 <= E; /* TopKImpl.h's use_partial_sort */
    int rc = 0;
    for (int64_t t = 0; t < T && rc == 0; t++) {
        const float *l = logits + t * E;
        for (int64_t e = 0; e < E; e++) {
            q[e].v = bias ? l[e] + bias[e] : l[e];
            q[e].e = e;
            if (q[e].v != q[e].v) rc = 8;
        }
        if (rc || route_nth_element(q, q + k - 1, q + E)) {
            rc = 8;
            break;
        }
        route_insertion_sort(q, q + k - 1); /* std::sort of k - 1 <= 16 elements */
        if (partial_sort) { /* another algorithm there: only an order without ties is sure */
            float below = -__builtin_inff(); /* the largest value left out */
            for (int64_t e = k; e < E; e++)
                if (q[e].v > below) below = q[e].v;
            for (int64_t j = 0; j < k; j++)
                if ((j > 0 && q[j].v == q[j - 1].v) || (k < E && q[j].v == below)) rc = 8;
            if (rc) break;
        }
        float chosen[16] = {0};
        float mx = l[q[0].e];
        for (int64_t j = 0; j < k; j++) {
            chosen[j] = l[q[j].e];
            if (chosen[j] > mx) mx = chosen[j];
        }
        const __mmask16 m = (__mmask16)((1u << k) - 1);
        float ex[16];
        _mm512_storeu_ps(ex, sleef_expf16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, chosen),
                                                        _mm512_set1_ps(mx))));
        float sum = ex[0];
        for (int64_t j = 1; j < k; j++) sum += ex[j];
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < k; j++) {
            expert_TK[t * k + j] = q[j].e;
            weight_TK[t * k + j] = ex[j] * inv;
        }
    }
    free(q);
    return rc;
}
