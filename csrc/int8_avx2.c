/*
 * int8_avx2.c - the AVX2 int8 matrix-vector kernel (definition in int8.h).
 *
 * Blocks of 4 weight rows x 2 tokens (8 accumulators, within the 16 ymm registers): each 16-byte
 * slice of a row is sign-extended to int16 once and multiplied into both tokens' int32 lanes by
 * vpmaddwd (two products per lane). Every CHUNK inputs the lanes are added into int64 totals; the
 * last in % 16 columns are added one by one.
 */
#include "int8.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

enum { ROWS = 4, TOKENS = 2, STEP = 16 };
_Static_assert(AQLM_INT8_CHUNK % STEP == 0, "chunks hold whole steps");

/* The sum of 8 int32 lanes, exact in int64. */
ALWAYS_INLINE int64_t sum_lanes(__m256i v) {
    const __m256i wide = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                          _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
    const __m128i half = _mm_add_epi64(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
    return _mm_cvtsi128_si64(half) + _mm_extract_epi64(half, 1);
}

/* dots[r * tokens + t] = sum_i xq[t * in + i] * q[r * in + i] for r < rows, t < tokens. */
ALWAYS_INLINE void dot_block(const int rows, const int tokens, int64_t in, const int16_t *restrict xq,
                             const int8_t *restrict q, int64_t *restrict dots) {
    int64_t total[ROWS][TOKENS];
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tokens; t++) total[r][t] = 0;
    const int64_t body = in / STEP * STEP;
    for (int64_t c0 = 0; c0 < body; c0 += AQLM_INT8_CHUNK) {
        const int64_t c1 = body - c0 < AQLM_INT8_CHUNK ? body : c0 + AQLM_INT8_CHUNK;
        __m256i acc[ROWS][TOKENS];
        for (int r = 0; r < rows; r++)
            for (int t = 0; t < tokens; t++) acc[r][t] = _mm256_setzero_si256();
        for (int64_t i = c0; i < c1; i += STEP) {
            __m256i xv[TOKENS];
            for (int t = 0; t < tokens; t++) xv[t] = _mm256_loadu_si256((const __m256i *)(xq + t * in + i));
            for (int r = 0; r < rows; r++) {
                const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + r * in + i)));
                for (int t = 0; t < tokens; t++) acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(w, xv[t]));
            }
        }
        for (int r = 0; r < rows; r++)
            for (int t = 0; t < tokens; t++) total[r][t] += sum_lanes(acc[r][t]);
    }
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tokens; t++) {
            int64_t dot = total[r][t];
            for (int64_t i = body; i < in; i++) dot += (int32_t)xq[t * in + i] * (int32_t)q[r * in + i];
            dots[r * tokens + t] = dot;
        }
}

/* One block with its sizes as constants, so the accumulators stay in registers. */
static void dot_block_any(int rows, int tokens, int64_t in, const int16_t *restrict xq, const int8_t *restrict q,
                          int64_t *restrict dots) {
    if (rows == ROWS) {
        if (tokens == 1) dot_block(ROWS, 1, in, xq, q, dots);
        else dot_block(ROWS, 2, in, xq, q, dots);
        return;
    }
    for (int r = 0; r < rows; r++) {
        if (tokens == 1) dot_block(1, 1, in, xq, q + r * in, dots + r * tokens);
        else dot_block(1, 2, in, xq, q + r * in, dots + r * tokens);
    }
}

_Static_assert(ROWS * TOKENS <= AQLM_INT8_MAX_DOTS, "dots buffer of aqlm_int8_rows_blocked");

static void int8_rows_avx2(int64_t o0, int64_t o1, int64_t n, int64_t in, int64_t out,
                           const int16_t *restrict xq, const float *restrict steps, const int8_t *restrict q,
                           const float *restrict scales, const float *restrict bias, float *restrict y) {
    aqlm_int8_rows_blocked(ROWS, TOKENS, dot_block_any, o0, o1, n, in, out, xq, steps, q, scales, bias, y);
}

const aqlm_int8_kernels aqlm_int8_kernels_avx2 = {.level = AQLM_SIMD_AVX2, .rows = int8_rows_avx2};

#else /* built without AVX2: never chosen */

const aqlm_int8_kernels aqlm_int8_kernels_avx2 = {.level = AQLM_SIMD_SCALAR, .rows = aqlm_int8_rows_ref};

#endif
