/*
 * kernels_avx2.c - AVX2 + FMA + F16C versions of the inner loops (compiled with those flags only).
 *
 * Shapes that are not specialised here (out_group_size > 1, in_group_size not a multiple of 8,
 * fewer than 8 codewords) go to the scalar references.
 */
#include "internal.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Eight consecutive elements of a float array of any supported dtype, as fp32. */
ALWAYS_INLINE __m256 load8(aqlm_dtype dtype, const void *base, int64_t index) {
    if (dtype == AQLM_F32) return _mm256_loadu_ps((const float *)base + index);
    const __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + index));
    if (dtype == AQLM_F16) return _mm256_cvtph_ps(half);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

/* Stores eight fp32 values as `dtype`, rounding to nearest even like the scalar path. */
ALWAYS_INLINE void store8(aqlm_dtype dtype, void *base, int64_t index, __m256 value) {
    if (dtype == AQLM_F32) {
        _mm256_storeu_ps((float *)base + index, value);
        return;
    }
    __m128i half;
    if (dtype == AQLM_F16) {
        half = _mm256_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
        const __m256i bits = _mm256_castps_si256(value);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
        rounded = _mm256_srli_epi32(rounded, 16);
        const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
        const __m256 is_nan = _mm256_cmp_ps(value, value, _CMP_UNORD_Q);
        rounded = _mm256_blendv_epi8(rounded, quiet, _mm256_castps_si256(is_nan));
        const __m256i packed = _mm256_packus_epi32(rounded, rounded); /* per 128-bit lane */
        half = _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
    }
    _mm_storeu_si128((__m128i *)((uint16_t *)base + index), half);
}

ALWAYS_INLINE float hsum8(__m256 v) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
}

/* ---- lookup-table build ---------------------------------------------------------------------- */

void aqlm_lut_build_t1_avx2(const aqlm_block_shape *s, int64_t j0, int64_t j1,
                              const float *restrict x, const float *restrict cbt, float *restrict lut) {
    const int64_t og = s->og, ig = s->ig, M = s->M, K = s->K;
    if (K % 8 != 0) {
        aqlm_lut_build_t1_ref(s, j0, j1, x, cbt, lut);
        return;
    }
    for (int64_t j = j0; j < j1; j++) {
        const float *xj = x + j * ig;
        for (int64_t mr = 0; mr < M * og; mr++) {
            float *out = lut + ((j - j0) * M * og + mr) * K;
            const float *columns = cbt + mr * ig * K;
            for (int64_t c = 0; c < K; c += 8) {
                __m256 sum = _mm256_setzero_ps();
                for (int64_t i = 0; i < ig; i++)
                    sum = _mm256_fmadd_ps(_mm256_set1_ps(xj[i]), _mm256_loadu_ps(columns + i * K + c), sum);
                _mm256_storeu_ps(out + c, sum);
            }
        }
    }
}

void aqlm_lut_build_t8_avx2(const aqlm_block_shape *s, int64_t j0, int64_t j1,
                              const float *restrict xt, const float *restrict cb, float *restrict lut) {
    const int64_t og = s->og, ig = s->ig, M = s->M, K = s->K;
    for (int64_t j = j0; j < j1; j++) {
        const float *xj = xt + j * ig * 8;
        for (int64_t m = 0; m < M; m++) {
            for (int64_t c = 0; c < K; c++) {
                for (int64_t r = 0; r < og; r++) {
                    const float *word = cb + ((m * K + c) * og + r) * ig;
                    __m256 sum = _mm256_setzero_ps();
                    for (int64_t i = 0; i < ig; i++)
                        sum = _mm256_fmadd_ps(_mm256_set1_ps(word[i]), _mm256_loadu_ps(xj + i * 8), sum);
                    _mm256_storeu_ps(lut + ((((j - j0) * M + m) * og + r) * K + c) * 8, sum);
                }
            }
        }
    }
}

/* ---- gather-accumulate ----------------------------------------------------------------------- */

/* One table entry per code and row, eight rows interleaved so their additions overlap. The loads
 * are scalar: on current x86 cores table gathers are slower than two loads per entry, and packing
 * the eight sums into one vector (which GCC's SLP pass would do) costs more than it saves. */
#if defined(__GNUC__) && !defined(__clang__)
#define SCALAR_LOOKUPS __attribute__((optimize("no-tree-slp-vectorize")))
#else
#define SCALAR_LOOKUPS
#endif

ALWAYS_INLINE SCALAR_LOOKUPS void lut_accumulate_t1_8rows(int64_t count, int64_t K, int64_t stride,
                                                          const uint8_t *restrict c, uint32_t mask,
                                                          const float *restrict table, float *restrict acc) {
    const uint8_t *c0 = c, *c1 = c + stride, *c2 = c + 2 * stride, *c3 = c + 3 * stride;
    const uint8_t *c4 = c + 4 * stride, *c5 = c + 5 * stride, *c6 = c + 6 * stride, *c7 = c + 7 * stride;
    float a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3], a4 = acc[4], a5 = acc[5], a6 = acc[6], a7 = acc[7];
    for (int64_t k = 0; k < count; k++, table += K) {
        a0 += table[c0[k] & mask];
        a1 += table[c1[k] & mask];
        a2 += table[c2[k] & mask];
        a3 += table[c3[k] & mask];
        a4 += table[c4[k] & mask];
        a5 += table[c5[k] & mask];
        a6 += table[c6[k] & mask];
        a7 += table[c7[k] & mask];
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3, acc[4] = a4, acc[5] = a5, acc[6] = a6, acc[7] = a7;
}

SCALAR_LOOKUPS void aqlm_lut_accumulate_t1_avx2(const aqlm_block_shape *s, int64_t rows, int64_t j0,
                                                int64_t j1, const int8_t *restrict codes,
                                                const float *restrict lut, float *restrict acc) {
    if (s->og != 1) {
        aqlm_lut_accumulate_t1_ref(s, rows, j0, j1, codes, lut, acc);
        return;
    }
    const int64_t M = s->M, K = s->K, stride = s->in_groups * M, count = (j1 - j0) * M;
    int64_t row = 0;
    for (; row + 8 <= rows; row += 8) {
        const uint8_t *c = (const uint8_t *)codes + row * stride + j0 * M;
        /* With 256 codewords every byte is a valid code: the constant mask compiles away. */
        if (K == 256) lut_accumulate_t1_8rows(count, 256, stride, c, 0xffu, lut, acc + row);
        else lut_accumulate_t1_8rows(count, K, stride, c, s->code_mask, lut, acc + row);
    }
    if (row < rows) aqlm_lut_accumulate_t1_ref(s, rows - row, j0, j1, codes + row * stride, lut, acc + row);
}

void aqlm_lut_accumulate_t8_avx2(const aqlm_block_shape *s, int64_t rows, int64_t j0, int64_t j1,
                                   const int8_t *restrict codes, const float *restrict lut,
                                   float *restrict acc) {
    if (s->og != 1) {
        aqlm_lut_accumulate_t8_ref(s, rows, j0, j1, codes, lut, acc);
        return;
    }
    const int64_t M = s->M, K = s->K, stride = s->in_groups * M;
    const uint32_t mask = s->code_mask;
    int64_t row = 0;
    for (; row + 4 <= rows; row += 4) {
        const uint8_t *c = (const uint8_t *)codes + row * stride + j0 * M;
        __m256 a0 = _mm256_loadu_ps(acc + row * 8), a1 = _mm256_loadu_ps(acc + row * 8 + 8);
        __m256 a2 = _mm256_loadu_ps(acc + row * 8 + 16), a3 = _mm256_loadu_ps(acc + row * 8 + 24);
        const float *table = lut;
        for (int64_t k = 0; k < (j1 - j0) * M; k++, table += K * 8) {
            a0 = _mm256_add_ps(a0, _mm256_loadu_ps(table + (c[k] & mask) * 8));
            a1 = _mm256_add_ps(a1, _mm256_loadu_ps(table + (c[stride + k] & mask) * 8));
            a2 = _mm256_add_ps(a2, _mm256_loadu_ps(table + (c[2 * stride + k] & mask) * 8));
            a3 = _mm256_add_ps(a3, _mm256_loadu_ps(table + (c[3 * stride + k] & mask) * 8));
        }
        _mm256_storeu_ps(acc + row * 8, a0), _mm256_storeu_ps(acc + row * 8 + 8, a1);
        _mm256_storeu_ps(acc + row * 8 + 16, a2), _mm256_storeu_ps(acc + row * 8 + 24, a3);
    }
    if (row < rows) aqlm_lut_accumulate_t8_ref(s, rows - row, j0, j1, codes + row * stride, lut, acc + row * 8);
}

/* ---- decode-and-dot -------------------------------------------------------------------------- */

ALWAYS_INLINE void decode_dot_rows(const aqlm_block_shape *s, int64_t o0, int64_t o1, const int n,
                                   const float *restrict x, const void *restrict codes,
                                   const aqlm_dtype dtype, const void *restrict cb, float *restrict acc) {
    const int64_t ig = s->ig, M = s->M, K = s->K, G = s->in_groups, in = G * ig;
    const int code_bits = s->code_bits;
    const uint32_t mask = s->code_mask;
    for (int64_t o = o0; o < o1; o++) {
        __m256 sums[AQLM_DECODE_DOT_MAX_TOKENS];
        for (int t = 0; t < n; t++) sums[t] = _mm256_setzero_ps();
        const int64_t row_codes = o * G * M;
        for (int64_t j = 0; j < G; j++) {
            for (int64_t i0 = 0; i0 < ig; i0 += 8) {
                __m256 word = load8(dtype, cb, (int64_t)aqlm_code_at(code_bits, codes, row_codes + j * M, mask) * ig + i0);
                for (int64_t m = 1; m < M; m++) {
                    const uint32_t code = aqlm_code_at(code_bits, codes, row_codes + j * M + m, mask);
                    word = _mm256_add_ps(word, load8(dtype, cb, (m * K + code) * ig + i0));
                }
                for (int t = 0; t < n; t++)
                    sums[t] = _mm256_fmadd_ps(word, _mm256_loadu_ps(x + t * in + j * ig + i0), sums[t]);
            }
        }
        for (int t = 0; t < n; t++) acc[(o - o0) * n + t] = hsum8(sums[t]);
    }
}

#define DECODE_DOT_CASE(N)                                                                          \
    case N:                                                                                         \
        if (cb_dtype == AQLM_F32) decode_dot_rows(s, o0, o1, N, x, codes, AQLM_F32, cb, acc);      \
        else if (cb_dtype == AQLM_F16) decode_dot_rows(s, o0, o1, N, x, codes, AQLM_F16, cb, acc); \
        else decode_dot_rows(s, o0, o1, N, x, codes, AQLM_BF16, cb, acc);                         \
        break;

void aqlm_decode_dot_avx2(const aqlm_block_shape *s, int64_t o0, int64_t o1, int64_t n,
                            const float *restrict x, const void *restrict codes, aqlm_dtype cb_dtype,
                            const void *restrict cb, float *restrict acc) {
    if (s->og != 1 || s->ig % 8 != 0 || n < 1 || n > AQLM_DECODE_DOT_MAX_TOKENS) {
        aqlm_decode_dot_ref(s, o0, o1, n, x, codes, cb_dtype, cb, acc);
        return;
    }
    switch (n) {
        DECODE_DOT_CASE(1)
        DECODE_DOT_CASE(2)
        DECODE_DOT_CASE(3)
        DECODE_DOT_CASE(4)
        DECODE_DOT_CASE(5)
        DECODE_DOT_CASE(6)
        DECODE_DOT_CASE(7)
        DECODE_DOT_CASE(8)
    }
}

/* ---- dequantize ------------------------------------------------------------------------------ */

ALWAYS_INLINE void dequant_rows_typed(const aqlm_block_shape *s, int64_t o0, int64_t o1,
                                      const void *restrict codes, const aqlm_dtype dtype,
                                      const void *restrict cb, const void *restrict scales,
                                      const aqlm_dtype w_dtype, void *restrict w) {
    const int64_t ig = s->ig, M = s->M, K = s->K, G = s->in_groups, in = G * ig;
    const int code_bits = s->code_bits;
    const uint32_t mask = s->code_mask;
    for (int64_t o = o0; o < o1; o++) {
        const __m256 scale = _mm256_set1_ps(aqlm_load(dtype, scales, o));
        for (int64_t j = 0; j < G; j++) {
            for (int64_t i0 = 0; i0 < ig; i0 += 8) {
                __m256 sum = _mm256_setzero_ps();
                for (int64_t m = 0; m < M; m++) {
                    const uint32_t code = aqlm_code_at(code_bits, codes, (o * G + j) * M + m, mask);
                    sum = _mm256_add_ps(sum, load8(dtype, cb, (m * K + code) * ig + i0));
                }
                store8(w_dtype, w, o * in + j * ig + i0, _mm256_mul_ps(sum, scale));
            }
        }
    }
}

void aqlm_dequant_rows_avx2(const aqlm_block_shape *s, int64_t o0, int64_t o1,
                              const void *restrict codes, aqlm_dtype param_dtype,
                              const void *restrict cb, const void *restrict scales,
                              aqlm_dtype w_dtype, void *restrict w) {
    if (s->og != 1 || s->ig % 8 != 0) {
        aqlm_dequant_rows_ref(s, o0, o1, codes, param_dtype, cb, scales, w_dtype, w);
        return;
    }
    const aqlm_dtype types[3] = {AQLM_F32, AQLM_F16, AQLM_BF16};
    for (int p = 0; p < 3; p++) {
        if (param_dtype != types[p]) continue;
        if (w_dtype == AQLM_F32) dequant_rows_typed(s, o0, o1, codes, types[p], cb, scales, AQLM_F32, w);
        else if (w_dtype == AQLM_F16) dequant_rows_typed(s, o0, o1, codes, types[p], cb, scales, AQLM_F16, w);
        else dequant_rows_typed(s, o0, o1, codes, types[p], cb, scales, AQLM_BF16, w);
    }
}

const aqlm_kernels aqlm_kernels_avx2 = {
    .level = AQLM_SIMD_AVX2,
    .lut_build_t1 = aqlm_lut_build_t1_avx2,
    .lut_build_t8 = aqlm_lut_build_t8_avx2,
    .lut_accumulate_t1 = aqlm_lut_accumulate_t1_avx2,
    .lut_accumulate_t8 = aqlm_lut_accumulate_t8_avx2,
    .decode_dot = aqlm_decode_dot_avx2,
    .dequant_rows = aqlm_dequant_rows_avx2,
};

#else /* built without AVX2: a scalar table that aqlm_kernels_for never returns for AVX2 */

const aqlm_kernels aqlm_kernels_avx2 = {
    .level = AQLM_SIMD_SCALAR,
    .lut_build_t1 = aqlm_lut_build_t1_ref,
    .lut_build_t8 = aqlm_lut_build_t8_ref,
    .lut_accumulate_t1 = aqlm_lut_accumulate_t1_ref,
    .lut_accumulate_t8 = aqlm_lut_accumulate_t8_ref,
    .decode_dot = aqlm_decode_dot_ref,
    .dequant_rows = aqlm_dequant_rows_ref,
};

#endif
