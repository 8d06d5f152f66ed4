/*
 * decodeq_avx2.c - the AVX2 int8-codebook decoding kernel (definition in decodeq.h).
 *
 * Blocks of 2 rows x up to 8 tokens: 2 codewords of a row (16 int8, 2 loads) are sign-extended to
 * 16 int16 side by side and multiplied into each token's int32 lanes by vpmaddwd. Every
 * CHUNK_GROUPS groups the lanes are added into int64 totals; an odd last group of a chunk is
 * added one by one.
 */
#include "decodeq.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

enum { ROWS = 2 };
_Static_assert(AQLM_DECODEQ_CHUNK_GROUPS % 2 == 0, "chunks hold whole steps");
_Static_assert((int)ROWS <= (int)AQLM_DECODEQ_MAX_ROWS, "dots buffer of aqlm_decodeq_rows_blocked");
_Static_assert(AQLM_DECODEQ_MAX_TOKENS == 8, "dots_avx2 has a case for each token count of a pass");

ALWAYS_INLINE int64_t sum_lanes(__m256i v) {
    const __m256i wide = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                          _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
    const __m128i half = _mm_add_epi64(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
    return _mm_cvtsi128_si64(half) + _mm_extract_epi64(half, 1);
}

ALWAYS_INLINE __m128i codeword(const int8_t *cq_m, const uint16_t *codes, int64_t index, uint32_t mask) {
    return _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(cq_m + (int64_t)(codes[index] & mask) * 8)));
}

/* The codewords of groups j and j + 1 of one row (codes at stride M), as 16 int16. */
ALWAYS_INLINE __m256i codewords2(const int8_t *cq_m, const uint16_t *codes, int64_t M, uint32_t mask) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(codeword(cq_m, codes, 0, mask)),
                                   codeword(cq_m, codes, M, mask), 1);
}

/* M and mask as arguments, so that the common case (one codebook of 2**16 codewords) inlines
 * them as constants: no masking, fixed strides (a third fewer instructions a code). */
ALWAYS_INLINE void dot_block(const int rows, const int tokens, int64_t G, const int64_t M, const uint32_t mask,
                             int64_t m, const int16_t *restrict xq, const uint16_t *restrict codes,
                             const int8_t *restrict cq_m, int64_t *restrict dots) {
    const int64_t in = 8 * G;
    const uint16_t *row_codes = codes + m;
    for (int i = 0; i < rows * tokens; i++) dots[i] = 0;
    for (int64_t g0 = 0; g0 < G; g0 += AQLM_DECODEQ_CHUNK_GROUPS) {
        const int64_t g1 = G - g0 < AQLM_DECODEQ_CHUNK_GROUPS ? G : g0 + AQLM_DECODEQ_CHUNK_GROUPS;
        __m256i acc[ROWS][AQLM_DECODEQ_MAX_TOKENS];
        for (int r = 0; r < rows; r++)
            for (int t = 0; t < tokens; t++) acc[r][t] = _mm256_setzero_si256();
        int64_t j = g0;
        for (; j + 2 <= g1; j += 2) {
            __m256i w[ROWS];
            for (int r = 0; r < rows; r++) w[r] = codewords2(cq_m, row_codes + (r * G + j) * M, M, mask);
            for (int t = 0; t < tokens; t++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + t * in + j * 8));
                for (int r = 0; r < rows; r++) acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(w[r], xv));
            }
        }
        for (int r = 0; r < rows; r++)
            for (int t = 0; t < tokens; t++) {
                int64_t total = sum_lanes(acc[r][t]);
                for (int64_t k = j; k < g1; k++) {
                    const int8_t *word = cq_m + (int64_t)(row_codes[(r * G + k) * M] & mask) * 8;
                    for (int i = 0; i < 8; i++) total += (int32_t)xq[t * in + k * 8 + i] * (int32_t)word[i];
                }
                dots[r * tokens + t] += total;
            }
    }
}

/* One block with its token count as a constant, so the accumulators stay in the 16 registers
 * (2 rows x up to 4 tokens, or 1 row x 5 to 8 tokens, one row after the other), and with the
 * common format's M and mask as constants. */
#define DOTS_CASE(R, T)                                                                                \
    case T:                                                                                            \
        for (int r = 0; r < rows; r += R) {                                                            \
            const uint16_t *row = codes + r * G * M;                                                   \
            if (common) dot_block(R, T, G, 1, 0xffffu, 0, xq, row, cq_m, dots + r * T);                \
            else dot_block(R, T, G, M, mask, m, xq, row, cq_m, dots + r * T);                          \
        }                                                                                              \
        return;
static void dots_avx2(const aqlm_decodeq_shape *s, int rows, int tokens, int64_t m, const int16_t *restrict xq,
                      const aqlm_decodeq_planes *planes,
                      const uint16_t *restrict codes, const int8_t *restrict cq_m, int64_t *restrict dots) {
    const int64_t G = s->G, M = s->M;
    const uint32_t mask = s->code_mask;
    const int common = M == 1 && mask == 0xffffu;
    if (rows == ROWS) {
        switch (tokens) {
            DOTS_CASE(ROWS, 1) DOTS_CASE(ROWS, 2) DOTS_CASE(ROWS, 3) DOTS_CASE(ROWS, 4)
            DOTS_CASE(1, 5) DOTS_CASE(1, 6) DOTS_CASE(1, 7) DOTS_CASE(1, 8)
        default: break;
        }
    }
    for (int r = 0; r < rows; r++) dot_block(1, tokens, G, M, mask, m, xq, codes + r * G * M, cq_m, dots + r * tokens);
}
#undef DOTS_CASE

static void decodeq_rows_avx2(const aqlm_decodeq_shape *s, int64_t o0, int64_t o1, int64_t n, int64_t out,
                              const int16_t *restrict xq, const aqlm_decodeq_planes *planes,
                              const float *restrict steps, const uint16_t *restrict codes,
                              const int8_t *restrict cq, aqlm_dtype param_dtype, const void *scales,
                              const void *bias, aqlm_dtype y_dtype, void *y) {
    aqlm_decodeq_rows_blocked(ROWS, dots_avx2, s, o0, o1, n, out, xq, planes, steps, codes, cq, param_dtype,
                              scales, bias, y_dtype, y);
}

const aqlm_decodeq_kernels aqlm_decodeq_kernels_avx2 = {
    .level = AQLM_SIMD_AVX2, .rows = decodeq_rows_avx2, .name = "avx2"};

#else /* built without AVX2: never chosen */

const aqlm_decodeq_kernels aqlm_decodeq_kernels_avx2 = {
    .level = AQLM_SIMD_SCALAR, .rows = aqlm_decodeq_rows_ref, .name = "scalar"};

#endif
