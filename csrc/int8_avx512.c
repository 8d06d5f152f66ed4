/*
 * int8_avx512.c - the AVX-512 int8 matrix-vector kernel (definition in int8.h).
 *
 * Blocks of 4 weight rows x 4 tokens: each 16-byte slice of a row is sign-extended to int32,
 * converted to fp32 once and multiplied into the 4 tokens' accumulators (16 independent FMA
 * chains). The last slice of a row (in not a multiple of 16) is read with masked loads.
 */
#include "int8.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

enum { ROWS = 4, TOKENS = 4 };

/* dots[r * tokens + t] = sum_i x[t * in + i] * q[r * in + i] for r < rows, t < tokens. */
ALWAYS_INLINE void dot_block(const int rows, const int tokens, int64_t in, const float *restrict x,
                             const int8_t *restrict q, float *restrict dots) {
    __m512 acc[ROWS][TOKENS];
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tokens; t++) acc[r][t] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= in; i += 16) {
        __m512 xv[TOKENS];
        for (int t = 0; t < tokens; t++) xv[t] = _mm512_loadu_ps(x + t * in + i);
        for (int r = 0; r < rows; r++) {
            const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + r * in + i))));
            for (int t = 0; t < tokens; t++) acc[r][t] = _mm512_fmadd_ps(w, xv[t], acc[r][t]);
        }
    }
    if (i < in) {
        const __mmask16 mask = (__mmask16)((1u << (in - i)) - 1u);
        __m512 xv[TOKENS];
        for (int t = 0; t < tokens; t++) xv[t] = _mm512_maskz_loadu_ps(mask, x + t * in + i);
        for (int r = 0; r < rows; r++) {
            const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, q + r * in + i)));
            for (int t = 0; t < tokens; t++) acc[r][t] = _mm512_fmadd_ps(w, xv[t], acc[r][t]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tokens; t++) dots[r * tokens + t] = _mm512_reduce_add_ps(acc[r][t]);
}

/* One block with its sizes as constants, so the accumulators stay in registers. */
static void dot_block_any(int rows, int tokens, int64_t in, const float *restrict x, const int8_t *restrict q,
                          float *restrict dots) {
    if (rows == ROWS) {
        switch (tokens) {
        case 1: dot_block(ROWS, 1, in, x, q, dots); return;
        case 2: dot_block(ROWS, 2, in, x, q, dots); return;
        case 3: dot_block(ROWS, 3, in, x, q, dots); return;
        default: dot_block(ROWS, 4, in, x, q, dots); return;
        }
    }
    for (int r = 0; r < rows; r++) {
        switch (tokens) {
        case 1: dot_block(1, 1, in, x, q + r * in, dots + r * tokens); break;
        case 2: dot_block(1, 2, in, x, q + r * in, dots + r * tokens); break;
        case 3: dot_block(1, 3, in, x, q + r * in, dots + r * tokens); break;
        default: dot_block(1, 4, in, x, q + r * in, dots + r * tokens); break;
        }
    }
}

_Static_assert(ROWS * TOKENS <= AQLM_INT8_MAX_DOTS, "dots buffer of aqlm_int8_rows_blocked");

static void int8_rows_avx512(int64_t o0, int64_t o1, int64_t n, int64_t in, int64_t out,
                             const float *restrict x, const int8_t *restrict q,
                             const float *restrict scales, const float *restrict bias, float *restrict y) {
    aqlm_int8_rows_blocked(ROWS, TOKENS, dot_block_any, o0, o1, n, in, out, x, q, scales, bias, y);
}

const aqlm_int8_kernels aqlm_int8_kernels_avx512 = {.level = AQLM_SIMD_AVX512, .rows = int8_rows_avx512};

#else /* built without AVX-512: never chosen */

const aqlm_int8_kernels aqlm_int8_kernels_avx512 = {.level = AQLM_SIMD_SCALAR, .rows = aqlm_int8_rows_ref};

#endif
