/*
 * int8_avx512.c - the AVX-512 int8 matrix-vector kernel (definition in int8.h).
 *
 * Blocks of 4 weight rows x 4 tokens: each 32-byte slice of a row is sign-extended to int16 once
 * and multiplied into the 4 tokens' int32 lanes by vpmaddwd (two products per lane; 16 independent
 * chains). Every CHUNK inputs the lanes are added into int64 totals. The last slice of a row (in
 * not a multiple of 32) is read with masked loads.
 */
#include "int8.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

enum { ROWS = 4, TOKENS = 4, STEP = 32 };
_Static_assert(AQLM_INT8_CHUNK % STEP == 0, "chunks hold whole steps");

/* The sum of 16 int32 lanes, exact in int64. */
ALWAYS_INLINE int64_t sum_lanes(__m512i v) {
    return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
                                                    _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1))));
}

/* Adds q's slice [i, i + 32) (masked) times each token's into acc. */
ALWAYS_INLINE void add_step(const int rows, const int tokens, int64_t in, int64_t i, __mmask32 mask,
                            const int16_t *restrict xq, const int8_t *restrict q, __m512i acc[ROWS][TOKENS]) {
    __m512i xv[TOKENS];
    for (int t = 0; t < tokens; t++) xv[t] = _mm512_maskz_loadu_epi16(mask, xq + t * in + i);
    for (int r = 0; r < rows; r++) {
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, q + r * in + i));
        for (int t = 0; t < tokens; t++) acc[r][t] = _mm512_add_epi32(acc[r][t], _mm512_madd_epi16(w, xv[t]));
    }
}

/* dots[r * tokens + t] = sum_i xq[t * in + i] * q[r * in + i] for r < rows, t < tokens. */
ALWAYS_INLINE void dot_block(const int rows, const int tokens, int64_t in, const int16_t *restrict xq,
                             const int8_t *restrict q, int64_t *restrict dots) {
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tokens; t++) dots[r * tokens + t] = 0;
    for (int64_t c0 = 0; c0 < in; c0 += AQLM_INT8_CHUNK) {
        const int64_t c1 = in - c0 < AQLM_INT8_CHUNK ? in : c0 + AQLM_INT8_CHUNK;
        __m512i acc[ROWS][TOKENS];
        for (int r = 0; r < rows; r++)
            for (int t = 0; t < tokens; t++) acc[r][t] = _mm512_setzero_si512();
        int64_t i = c0;
        for (; i + STEP <= c1; i += STEP) add_step(rows, tokens, in, i, (__mmask32)0xffffffffu, xq, q, acc);
        if (i < c1) add_step(rows, tokens, in, i, (__mmask32)((1u << (c1 - i)) - 1u), xq, q, acc);
        for (int r = 0; r < rows; r++)
            for (int t = 0; t < tokens; t++) dots[r * tokens + t] += sum_lanes(acc[r][t]);
    }
}

/* One block with its sizes as constants, so the accumulators stay in registers. */
static void dot_block_any(int rows, int tokens, int64_t in, const int16_t *restrict xq, const int8_t *restrict q,
                          int64_t *restrict dots) {
    if (rows == ROWS) {
        switch (tokens) {
        case 1: dot_block(ROWS, 1, in, xq, q, dots); return;
        case 2: dot_block(ROWS, 2, in, xq, q, dots); return;
        case 3: dot_block(ROWS, 3, in, xq, q, dots); return;
        default: dot_block(ROWS, 4, in, xq, q, dots); return;
        }
    }
    for (int r = 0; r < rows; r++) {
        switch (tokens) {
        case 1: dot_block(1, 1, in, xq, q + r * in, dots + r * tokens); break;
        case 2: dot_block(1, 2, in, xq, q + r * in, dots + r * tokens); break;
        case 3: dot_block(1, 3, in, xq, q + r * in, dots + r * tokens); break;
        default: dot_block(1, 4, in, xq, q + r * in, dots + r * tokens); break;
        }
    }
}

_Static_assert(ROWS * TOKENS <= AQLM_INT8_MAX_DOTS, "dots buffer of aqlm_int8_rows_blocked");

static void int8_rows_avx512(int64_t o0, int64_t o1, int64_t n, int64_t in, int64_t out,
                             const int16_t *restrict xq, const float *restrict steps, const int8_t *restrict q,
                             const float *restrict scales, const float *restrict bias, float *restrict y) {
    aqlm_int8_rows_blocked(ROWS, TOKENS, dot_block_any, o0, o1, n, in, out, xq, steps, q, scales, bias, y);
}

const aqlm_int8_kernels aqlm_int8_kernels_avx512 = {.level = AQLM_SIMD_AVX512, .rows = int8_rows_avx512};

#else /* built without AVX-512: never chosen */

const aqlm_int8_kernels aqlm_int8_kernels_avx512 = {.level = AQLM_SIMD_SCALAR, .rows = aqlm_int8_rows_ref};

#endif
