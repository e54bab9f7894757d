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
