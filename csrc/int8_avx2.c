/*
 * int8_avx2.c - the AVX2 int8 matrix-vector kernel (definition in int8.h).
 *
 * Blocks of 4 weight rows x 2 tokens (8 accumulators, within the 16 ymm registers): each 8-byte
 * slice of a row is sign-extended to int32, converted to fp32 once and multiplied into both
 * tokens' accumulators. The last in % 8 columns are added one by one after the lanes are summed.
 */
#include "int8.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

enum { ROWS = 4, TOKENS = 2 };

ALWAYS_INLINE float sum_lanes(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* dots[r * tokens + t] = sum_i x[t * in + i] * q[r * in + i] for r < rows, t < tokens. */
ALWAYS_INLINE void dot_block(const int rows, const int tokens, int64_t in, const float *restrict x,
                             const int8_t *restrict q, float *restrict dots) {
    __m256 acc[ROWS][TOKENS];
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tokens; t++) acc[r][t] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= in; i += 8) {
        __m256 xv[TOKENS];
        for (int t = 0; t < tokens; t++) xv[t] = _mm256_loadu_ps(x + t * in + i);
        for (int r = 0; r < rows; r++) {
            const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + r * in + i))));
            for (int t = 0; t < tokens; t++) acc[r][t] = _mm256_fmadd_ps(w, xv[t], acc[r][t]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tokens; t++) {
            float dot = sum_lanes(acc[r][t]);
            for (int64_t tail = i; tail < in; tail++) dot += x[t * in + tail] * (float)q[r * in + tail];
            dots[r * tokens + t] = dot;
        }
}

/* One block with its sizes as constants, so the accumulators stay in registers. */
static void dot_block_any(int rows, int tokens, int64_t in, const float *restrict x, const int8_t *restrict q,
                          float *restrict dots) {
    if (rows == ROWS) {
        if (tokens == 1) dot_block(ROWS, 1, in, x, q, dots);
        else dot_block(ROWS, 2, in, x, q, dots);
        return;
    }
    for (int r = 0; r < rows; r++) {
        if (tokens == 1) dot_block(1, 1, in, x, q + r * in, dots + r * tokens);
        else dot_block(1, 2, in, x, q + r * in, dots + r * tokens);
    }
}

_Static_assert(ROWS * TOKENS <= AQLM_INT8_MAX_DOTS, "dots buffer of aqlm_int8_rows_blocked");

static void int8_rows_avx2(int64_t o0, int64_t o1, int64_t n, int64_t in, int64_t out,
                           const float *restrict x, const int8_t *restrict q,
                           const float *restrict scales, const float *restrict bias, float *restrict y) {
    aqlm_int8_rows_blocked(ROWS, TOKENS, dot_block_any, o0, o1, n, in, out, x, q, scales, bias, y);
}

const aqlm_int8_kernels aqlm_int8_kernels_avx2 = {.level = AQLM_SIMD_AVX2, .rows = int8_rows_avx2};

#else /* built without AVX2: never chosen */

const aqlm_int8_kernels aqlm_int8_kernels_avx2 = {.level = AQLM_SIMD_SCALAR, .rows = aqlm_int8_rows_ref};

#endif
