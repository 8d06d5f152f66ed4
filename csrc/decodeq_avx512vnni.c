/*
 * decodeq_avx512vnni.c - the int8-codebook decoding kernel by gathers and byte products
 * (definition in decodeq.h), for the common format (one codebook of 2**16 codewords).
 *
 * One row at a time, 8 input groups a step: one vpgatherqq brings the row's 8 codewords (64 int8)
 * into a zmm, and each token's activations come as two byte planes, xq = 256 hi + lo (the
 * driver's aqlm_decodeq_planes). vpdpbusd multiplies unsigned bytes by signed ones, 4 products
 * into each int32 lane, so
 *     lo_acc = sum lo * c                      (lo unsigned, the codewords c signed)
 *     hi_acc = sum (c + 128) * hi              (c + 128 = c ^ 0x80 unsigned, hi signed)
 *     dot    = 256 (hi_acc - 128 sum hi) + lo_acc,
 * the same integer as the other levels compute, so the same bits. The current AVX-512 step
 * spends its time on the byte shuffles that widen 4 codewords into one zmm (one port on Intel);
 * here there are none. The last G % 8 groups of a chunk are a masked step (zero bytes add
 * nothing). A lane gets 4 products of at most 255 * 128 a step, so CHUNK_GROUPS / 8 steps stay
 * below 2**31 (512 / 8 * 4 * 32640 = 8355840).
 */
#include "decodeq.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

_Static_assert(AQLM_DECODEQ_CHUNK_GROUPS % 8 == 0, "chunks hold whole steps");
_Static_assert(AQLM_DECODEQ_MAX_TOKENS == 8, "dots_gather has a case for each token count of a pass");

ALWAYS_INLINE int64_t sum_lanes(__m512i v) {
    return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
                                                    _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1))));
}

/* One step of `count` (1..8) groups from group j of one row, for `tokens` tokens. */
ALWAYS_INLINE void step(const int tokens, int64_t in, int64_t j, int count, const uint16_t *restrict codes,
                        const int8_t *restrict cq, const aqlm_decodeq_planes *p, __m512i *lo_acc, __m512i *hi_acc) {
    const __mmask8 words = (__mmask8)((1u << count) - 1);
    const __mmask64 bytes = count == 8 ? ~(__mmask64)0 : (((__mmask64)1 << (8 * count)) - 1);
    const __m512i index = _mm512_cvtepu16_epi64(_mm_maskz_loadu_epi16(words, codes + j));
    const __m512i w = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), words, index, (const void *)cq, 8);
    const __m512i w_unsigned = _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80));
    for (int t = 0; t < tokens; t++) {
        const __m512i lo = _mm512_maskz_loadu_epi8(bytes, p->lo + t * in + j * 8);
        const __m512i hi = _mm512_maskz_loadu_epi8(bytes, p->hi + t * in + j * 8);
        lo_acc[t] = _mm512_dpbusd_epi32(lo_acc[t], lo, w);
        hi_acc[t] = _mm512_dpbusd_epi32(hi_acc[t], w_unsigned, hi);
    }
}

/* dot[t] of one row (codes: its G codes) for `tokens` tokens (a constant where inlined). */
ALWAYS_INLINE void dot_row(const int tokens, int64_t G, const uint16_t *restrict codes, const int8_t *restrict cq,
                           const aqlm_decodeq_planes *p, int64_t *restrict dots) {
    const int64_t in = 8 * G;
    int64_t hi_total[AQLM_DECODEQ_MAX_TOKENS], lo_total[AQLM_DECODEQ_MAX_TOKENS];
    for (int t = 0; t < tokens; t++) hi_total[t] = lo_total[t] = 0;
    for (int64_t g0 = 0; g0 < G; g0 += AQLM_DECODEQ_CHUNK_GROUPS) {
        const int64_t g1 = G - g0 < AQLM_DECODEQ_CHUNK_GROUPS ? G : g0 + AQLM_DECODEQ_CHUNK_GROUPS;
        __m512i lo_acc[AQLM_DECODEQ_MAX_TOKENS], hi_acc[AQLM_DECODEQ_MAX_TOKENS];
        for (int t = 0; t < tokens; t++) lo_acc[t] = hi_acc[t] = _mm512_setzero_si512();
        int64_t j = g0;
        for (; j + 8 <= g1; j += 8) step(tokens, in, j, 8, codes, cq, p, lo_acc, hi_acc);
        if (j < g1) step(tokens, in, j, (int)(g1 - j), codes, cq, p, lo_acc, hi_acc);
        for (int t = 0; t < tokens; t++) {
            hi_total[t] += sum_lanes(hi_acc[t]);
            lo_total[t] += sum_lanes(lo_acc[t]);
        }
    }
    for (int t = 0; t < tokens; t++) dots[t] = 256 * (hi_total[t] - 128 * p->hi_sum[t]) + lo_total[t];
}

#define DOTS_CASE(T)                                                                                   \
    case T:                                                                                            \
        dot_row(T, s->G, codes, cq_m, planes, dots);                                                   \
        return;
static void dots_gather(const aqlm_decodeq_shape *s, int rows, int tokens, int64_t m, const int16_t *restrict xq,
                        const aqlm_decodeq_planes *planes, const uint16_t *restrict codes,
                        const int8_t *restrict cq_m, int64_t *restrict dots) {
    switch (tokens) {
        DOTS_CASE(1) DOTS_CASE(2) DOTS_CASE(3) DOTS_CASE(4) DOTS_CASE(5) DOTS_CASE(6) DOTS_CASE(7) DOTS_CASE(8)
    default: break;
    }
}
#undef DOTS_CASE

static void decodeq_rows_gather(const aqlm_decodeq_shape *s, int64_t o0, int64_t o1, int64_t n, int64_t out,
                                const int16_t *restrict xq, const aqlm_decodeq_planes *planes,
                                const float *restrict steps, const uint16_t *restrict codes,
                                const int8_t *restrict cq, aqlm_dtype param_dtype, const void *scales,
                                const void *bias, aqlm_dtype y_dtype, void *y) {
    if (s->M != 1 || s->code_mask != 0xffffu) { /* only the common format gathers */
        aqlm_decodeq_kernels_avx512.rows(s, o0, o1, n, out, xq, planes, steps, codes, cq, param_dtype, scales, bias,
                                         y_dtype, y);
        return;
    }
    aqlm_decodeq_rows_blocked(1, dots_gather, s, o0, o1, n, out, xq, planes, steps, codes, cq, param_dtype, scales,
                              bias, y_dtype, y);
}

const aqlm_decodeq_kernels aqlm_decodeq_kernels_avx512vnni = {
    .level = AQLM_SIMD_AVX512, .rows = decodeq_rows_gather, .name = "avx512vnni", .byte_planes = 1};

#else /* built without AVX-512 VNNI: never chosen */

const aqlm_decodeq_kernels aqlm_decodeq_kernels_avx512vnni = {
    .level = AQLM_SIMD_SCALAR, .rows = aqlm_decodeq_rows_ref, .name = "scalar"};

#endif
