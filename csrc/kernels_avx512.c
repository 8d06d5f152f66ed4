/*
 * kernels_avx512.c - AVX-512 (F, BW, VL, DQ) versions of the loops that gain from 16-wide
 * vectors: the one-token table build (16 codewords per vector) and, for in_group_size a multiple
 * of 16, decode-and-dot and dequantize (one vector per group row). Everything else reuses the
 * AVX2 versions, which run unchanged on AVX-512 hardware.
 */
#include "internal.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE __m512 load16(aqlm_dtype dtype, const void *base, int64_t index) {
    if (dtype == AQLM_F32) return _mm512_loadu_ps((const float *)base + index);
    const __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + index));
    if (dtype == AQLM_F16) return _mm512_cvtph_ps(half);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

static void lut_build_t1_avx512(const aqlm_block_shape *s, int64_t j0, int64_t j1,
                                const float *restrict x, const float *restrict cbt, float *restrict lut) {
    const int64_t og = s->og, ig = s->ig, M = s->M, K = s->K;
    if (K % 16 != 0) {
        aqlm_lut_build_t1_avx2(s, j0, j1, x, cbt, lut);
        return;
    }
    for (int64_t j = j0; j < j1; j++) {
        const float *xj = x + j * ig;
        for (int64_t mr = 0; mr < M * og; mr++) {
            float *out = lut + ((j - j0) * M * og + mr) * K;
            const float *columns = cbt + mr * ig * K;
            for (int64_t c = 0; c < K; c += 16) {
                __m512 sum = _mm512_setzero_ps();
                for (int64_t i = 0; i < ig; i++)
                    sum = _mm512_fmadd_ps(_mm512_set1_ps(xj[i]), _mm512_loadu_ps(columns + i * K + c), sum);
                _mm512_storeu_ps(out + c, sum);
            }
        }
    }
}

ALWAYS_INLINE void decode_dot_rows(const aqlm_block_shape *s, int64_t o0, int64_t o1, int64_t n,
                                   const float *restrict x, const void *restrict codes,
                                   const aqlm_dtype dtype, const void *restrict cb, float *restrict acc) {
    const int64_t ig = s->ig, M = s->M, K = s->K, G = s->in_groups, in = G * ig;
    const int code_bits = s->code_bits;
    const uint32_t mask = s->code_mask;
    for (int64_t o = o0; o < o1; o++) {
        __m512 sums[AQLM_DECODE_DOT_MAX_TOKENS];
        for (int64_t t = 0; t < n; t++) sums[t] = _mm512_setzero_ps();
        const int64_t row_codes = o * G * M;
        for (int64_t j = 0; j < G; j++) {
            for (int64_t i0 = 0; i0 < ig; i0 += 16) {
                __m512 word = _mm512_setzero_ps();
                for (int64_t m = 0; m < M; m++) {
                    const uint32_t code = aqlm_code_at(code_bits, codes, row_codes + j * M + m, mask);
                    word = _mm512_add_ps(word, load16(dtype, cb, (m * K + code) * ig + i0));
                }
                for (int64_t t = 0; t < n; t++)
                    sums[t] = _mm512_fmadd_ps(word, _mm512_loadu_ps(x + t * in + j * ig + i0), sums[t]);
            }
        }
        for (int64_t t = 0; t < n; t++) acc[(o - o0) * n + t] = _mm512_reduce_add_ps(sums[t]);
    }
}

static void decode_dot_avx512(const aqlm_block_shape *s, int64_t o0, int64_t o1, int64_t n,
                              const float *restrict x, const void *restrict codes, aqlm_dtype cb_dtype,
                              const void *restrict cb, float *restrict acc) {
    if (s->og != 1 || s->ig % 16 != 0 || n < 1 || n > AQLM_DECODE_DOT_MAX_TOKENS) {
        aqlm_decode_dot_avx2(s, o0, o1, n, x, codes, cb_dtype, cb, acc);
        return;
    }
    if (cb_dtype == AQLM_F32) decode_dot_rows(s, o0, o1, n, x, codes, AQLM_F32, cb, acc);
    else if (cb_dtype == AQLM_F16) decode_dot_rows(s, o0, o1, n, x, codes, AQLM_F16, cb, acc);
    else decode_dot_rows(s, o0, o1, n, x, codes, AQLM_BF16, cb, acc);
}

const aqlm_kernels aqlm_kernels_avx512 = {
    .level = AQLM_SIMD_AVX512,
    .lut_build_t1 = lut_build_t1_avx512,
    .lut_build_t8 = aqlm_lut_build_t8_avx2,
    .lut_accumulate_t1 = aqlm_lut_accumulate_t1_avx2,
    .lut_accumulate_t8 = aqlm_lut_accumulate_t8_avx2,
    .decode_dot = decode_dot_avx512,
    .dequant_rows = aqlm_dequant_rows_avx2,
    .topk_scores = aqlm_topk_scores_avx2,
    .gradient_update = aqlm_gradient_update_avx2,
};

#else /* built without AVX-512: a scalar table that aqlm_kernels_for never returns for AVX-512 */

const aqlm_kernels aqlm_kernels_avx512 = {
    .level = AQLM_SIMD_SCALAR,
    .lut_build_t1 = aqlm_lut_build_t1_ref,
    .lut_build_t8 = aqlm_lut_build_t8_ref,
    .lut_accumulate_t1 = aqlm_lut_accumulate_t1_ref,
    .lut_accumulate_t8 = aqlm_lut_accumulate_t8_ref,
    .decode_dot = aqlm_decode_dot_ref,
    .dequant_rows = aqlm_dequant_rows_ref,
    .topk_scores = aqlm_topk_scores_ref,
    .gradient_update = aqlm_gradient_update_ref,
};

#endif
