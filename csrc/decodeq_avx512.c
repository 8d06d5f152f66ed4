/*
 * decodeq_avx512.c - the AVX-512 int8-codebook decoding kernel (definition in decodeq.h).
 *
 * Blocks of 2 rows x up to 8 tokens: 4 codewords of a row (32 int8, 4 loads) are sign-extended to
 * 32 int16 side by side and multiplied into each token's int32 lanes by vpmaddwd. Every
 * CHUNK_GROUPS groups the lanes are added into int64 totals; the last G % 4 groups of a chunk are
 * added one by one.
 */
#include "decodeq.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

enum { ROWS = 2 };
_Static_assert(AQLM_DECODEQ_CHUNK_GROUPS % 4 == 0, "chunks hold whole steps");
_Static_assert((int)ROWS <= (int)AQLM_DECODEQ_MAX_ROWS, "dots buffer of aqlm_decodeq_rows_blocked");
_Static_assert(AQLM_DECODEQ_MAX_TOKENS == 8, "dots_avx512 has a case for each token count of a pass");

ALWAYS_INLINE int64_t sum_lanes(__m512i v) {
    return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
                                                    _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1))));
}

ALWAYS_INLINE __m128i codeword(const int8_t *cq_m, const uint16_t *codes, int64_t index, uint32_t mask) {
    return _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(cq_m + (int64_t)(codes[index] & mask) * 8)));
}

/* The codewords of groups j .. j + 3 of one row (codes at stride M), as 32 int16. */
ALWAYS_INLINE __m512i codewords4(const int8_t *cq_m, const uint16_t *codes, int64_t M, uint32_t mask) {
    const __m256i low = _mm256_inserti128_si256(_mm256_castsi128_si256(codeword(cq_m, codes, 0, mask)),
                                                codeword(cq_m, codes, M, mask), 1);
    const __m256i high = _mm256_inserti128_si256(_mm256_castsi128_si256(codeword(cq_m, codes, 2 * M, mask)),
                                                 codeword(cq_m, codes, 3 * M, mask), 1);
    return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
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
        __m512i acc[ROWS][AQLM_DECODEQ_MAX_TOKENS];
        for (int r = 0; r < rows; r++)
            for (int t = 0; t < tokens; t++) acc[r][t] = _mm512_setzero_si512();
        int64_t j = g0;
        for (; j + 4 <= g1; j += 4) {
            __m512i w[ROWS];
            for (int r = 0; r < rows; r++) w[r] = codewords4(cq_m, row_codes + (r * G + j) * M, M, mask);
            for (int t = 0; t < tokens; t++) {
                const __m512i xv = _mm512_loadu_si512(xq + t * in + j * 8);
                for (int r = 0; r < rows; r++) acc[r][t] = _mm512_add_epi32(acc[r][t], _mm512_madd_epi16(w[r], xv));
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

/* One block with its token count as a constant, so the accumulators (2 rows x up to 8 tokens)
 * stay in registers, and with the common format's M and mask as constants. */
#define DOTS_CASE(T)                                                                                   \
    case T:                                                                                            \
        if (common) dot_block(ROWS, T, G, 1, 0xffffu, 0, xq, codes, cq_m, dots);                       \
        else dot_block(ROWS, T, G, M, mask, m, xq, codes, cq_m, dots);                                  \
        return;
static void dots_avx512(const aqlm_decodeq_shape *s, int rows, int tokens, int64_t m, const int16_t *restrict xq,
                        const aqlm_decodeq_planes *planes,
                        const uint16_t *restrict codes, const int8_t *restrict cq_m, int64_t *restrict dots) {
    const int64_t G = s->G, M = s->M;
    const uint32_t mask = s->code_mask;
    const int common = M == 1 && mask == 0xffffu;
    if (rows == ROWS) {
        switch (tokens) {
            DOTS_CASE(1) DOTS_CASE(2) DOTS_CASE(3) DOTS_CASE(4) DOTS_CASE(5) DOTS_CASE(6) DOTS_CASE(7) DOTS_CASE(8)
        default: break;
        }
    }
    dot_block(1, tokens, G, M, mask, m, xq, codes, cq_m, dots);
}
#undef DOTS_CASE

static void decodeq_rows_avx512(const aqlm_decodeq_shape *s, int64_t o0, int64_t o1, int64_t n, int64_t out,
                                const int16_t *restrict xq, const aqlm_decodeq_planes *planes,
                                const float *restrict steps, const uint16_t *restrict codes,
                                const int8_t *restrict cq, aqlm_dtype param_dtype, const void *scales,
                                const void *bias, aqlm_dtype y_dtype, void *y) {
    aqlm_decodeq_rows_blocked(ROWS, dots_avx512, s, o0, o1, n, out, xq, planes, steps, codes, cq, param_dtype,
                              scales, bias, y_dtype, y);
}

const aqlm_decodeq_kernels aqlm_decodeq_kernels_avx512 = {
    .level = AQLM_SIMD_AVX512, .rows = decodeq_rows_avx512, .name = "avx512"};

#else /* built without AVX-512: never chosen */

const aqlm_decodeq_kernels aqlm_decodeq_kernels_avx512 = {
    .level = AQLM_SIMD_SCALAR, .rows = aqlm_decodeq_rows_ref, .name = "scalar"};

#endif
