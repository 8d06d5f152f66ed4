/*
 * kernels_avx2.c - AVX2 + FMA + F16C versions of the inner loops (compiled with those flags only).
 *
 * Shapes that are not specialised here (out_group_size > 1, in_group_size not a multiple of 8,
 * fewer than 8 codewords) go to the scalar references.
 */
#include <math.h>

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

/* The codeword of group j (summed over codebooks), columns [i0, i0 + 8). */
ALWAYS_INLINE __m256 decoded_word(const aqlm_block_shape *s, const void *restrict codes, int64_t row_codes, int64_t j,
                                  int64_t i0, const aqlm_dtype dtype, const void *restrict cb) {
    const int64_t M = s->M, ig = s->ig;
    __m256 word = load8(dtype, cb, (int64_t)aqlm_code_at(s->code_bits, codes, row_codes + j * M, s->code_mask) * ig + i0);
    for (int64_t m = 1; m < M; m++) {
        const uint32_t code = aqlm_code_at(s->code_bits, codes, row_codes + j * M + m, s->code_mask);
        word = _mm256_add_ps(word, load8(dtype, cb, (m * s->K + code) * ig + i0));
    }
    return word;
}

/* With few tokens every group's FMA would feed one accumulator per token, a chain of dependent
 * FMAs; U interleaved accumulators per token (groups j, j+1, ... in turn) keep U chains going.
 * All loop bounds over u and t are compile-time constants so the accumulators stay in registers. */
ALWAYS_INLINE void decode_dot_rows(const aqlm_block_shape *s, int64_t o0, int64_t o1, const int n,
                                   const float *restrict x, const void *restrict codes,
                                   const aqlm_dtype dtype, const void *restrict cb, float *restrict acc) {
    enum { U_MAX = 4 };
    const int U = n == 1 ? 4 : n <= 3 ? 2 : 1;
    const int64_t ig = s->ig, G = s->in_groups, in = G * ig, M = s->M;
    const int64_t full = G / U * U;
    for (int64_t o = o0; o < o1; o++) {
        __m256 sums[U_MAX][AQLM_DECODE_DOT_MAX_TOKENS];
        for (int u = 0; u < U; u++)
            for (int t = 0; t < n; t++) sums[u][t] = _mm256_setzero_ps();
        const int64_t row_codes = o * G * M;
        for (int64_t i0 = 0; i0 < ig; i0 += 8) {
            for (int64_t j0 = 0; j0 < full; j0 += U) {
                for (int u = 0; u < U; u++) {
                    const __m256 word = decoded_word(s, codes, row_codes, j0 + u, i0, dtype, cb);
                    for (int t = 0; t < n; t++)
                        sums[u][t] = _mm256_fmadd_ps(word, _mm256_loadu_ps(x + t * in + (j0 + u) * ig + i0), sums[u][t]);
                }
            }
            for (int64_t j = full; j < G; j++) {
                const __m256 word = decoded_word(s, codes, row_codes, j, i0, dtype, cb);
                for (int t = 0; t < n; t++) sums[0][t] = _mm256_fmadd_ps(word, _mm256_loadu_ps(x + t * in + j * ig + i0), sums[0][t]);
            }
        }
        for (int t = 0; t < n; t++) {
            __m256 total = sums[0][t];
            for (int u = 1; u < U; u++) total = _mm256_add_ps(total, sums[u][t]);
            acc[(o - o0) * n + t] = hsum8(total);
        }
    }
}

/* The 1x16g8 case (one codebook of 2**16 codewords, groups of 8) with one token: four named
 * accumulators over consecutive groups, nothing between the code load and the FMA. */
ALWAYS_INLINE void decode_dot_1x16g8_one_token(const aqlm_block_shape *s, int64_t o0, int64_t o1,
                                               const float *restrict x, const uint16_t *restrict codes,
                                               const aqlm_dtype dtype, const void *restrict cb, float *restrict acc) {
    const int64_t G = s->in_groups, full = G / 4 * 4;
    for (int64_t o = o0; o < o1; o++) {
        const uint16_t *c = codes + o * G;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t j = 0; j < full; j += 4) {
            a0 = _mm256_fmadd_ps(load8(dtype, cb, (int64_t)c[j] * 8), _mm256_loadu_ps(x + j * 8), a0);
            a1 = _mm256_fmadd_ps(load8(dtype, cb, (int64_t)c[j + 1] * 8), _mm256_loadu_ps(x + j * 8 + 8), a1);
            a2 = _mm256_fmadd_ps(load8(dtype, cb, (int64_t)c[j + 2] * 8), _mm256_loadu_ps(x + j * 8 + 16), a2);
            a3 = _mm256_fmadd_ps(load8(dtype, cb, (int64_t)c[j + 3] * 8), _mm256_loadu_ps(x + j * 8 + 24), a3);
        }
        for (int64_t j = full; j < G; j++) a0 = _mm256_fmadd_ps(load8(dtype, cb, (int64_t)c[j] * 8), _mm256_loadu_ps(x + j * 8), a0);
        acc[o - o0] = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
}

/* Groups of 8 with 2**8 or 2**16 codewords (every stored value is a valid code, no masking), any
 * number of codebooks, 1..8 tokens: one decoded codeword serves every token's FMA. */
#define DEFINE_DECODE_DOT_G8(NAME, CODE_T, CODEBOOK_SIZE)                                                  \
    ALWAYS_INLINE void NAME(const aqlm_block_shape *s, int64_t o0, int64_t o1, const int n,                   \
                            const float *restrict x, const CODE_T *restrict codes, const aqlm_dtype dtype,     \
                            const void *restrict cb, float *restrict acc) {                                   \
        const int64_t G = s->in_groups, in = G * 8, M = s->M;                                                 \
        for (int64_t o = o0; o < o1; o++) {                                                                   \
            const CODE_T *c = codes + o * G * M;                                                              \
            __m256 sums[AQLM_DECODE_DOT_MAX_TOKENS];                                                          \
            for (int t = 0; t < n; t++) sums[t] = _mm256_setzero_ps();                                        \
            for (int64_t j = 0; j < G; j++) {                                                                 \
                __m256 word = load8(dtype, cb, (int64_t)c[j * M] * 8);                                        \
                for (int64_t m = 1; m < M; m++)                                                               \
                    word = _mm256_add_ps(word, load8(dtype, cb, (m * (CODEBOOK_SIZE) + c[j * M + m]) * 8));   \
                for (int t = 0; t < n; t++) sums[t] = _mm256_fmadd_ps(word, _mm256_loadu_ps(x + t * in + j * 8), sums[t]); \
            }                                                                                                 \
            for (int t = 0; t < n; t++) acc[(o - o0) * n + t] = hsum8(sums[t]);                               \
        }                                                                                                     \
    }

DEFINE_DECODE_DOT_G8(decode_dot_g8_k256, uint8_t, 256)
DEFINE_DECODE_DOT_G8(decode_dot_g8_k65536, uint16_t, 65536)

/* The same for 8 codebooks of 256 codewords (8x8g8), the codeword summed pairwise, ((c0 + c1) +
 * (c2 + c3)) + ((c4 + c5) + (c6 + c7)): 3 dependent adds instead of 7; and two accumulators per
 * token (even and odd groups) halve the chain of dependent FMAs. */
ALWAYS_INLINE __m256 decoded_8x8(const uint8_t *restrict c, const aqlm_dtype dtype, const void *restrict cb) {
    __m256 w[8];
    for (int m = 0; m < 8; m++) w[m] = load8(dtype, cb, ((int64_t)m * 256 + c[m]) * 8);
    return _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(w[0], w[1]), _mm256_add_ps(w[2], w[3])),
                         _mm256_add_ps(_mm256_add_ps(w[4], w[5]), _mm256_add_ps(w[6], w[7])));
}

ALWAYS_INLINE void decode_dot_8x8g8(const aqlm_block_shape *s, int64_t o0, int64_t o1, const int n,
                                    const float *restrict x, const uint8_t *restrict codes, const aqlm_dtype dtype,
                                    const void *restrict cb, float *restrict acc) {
    const int64_t G = s->in_groups, in = G * 8;
    for (int64_t o = o0; o < o1; o++) {
        const uint8_t *c = codes + o * G * 8;
        __m256 even[AQLM_DECODE_DOT_MAX_TOKENS], odd[AQLM_DECODE_DOT_MAX_TOKENS];
        for (int t = 0; t < n; t++) even[t] = odd[t] = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 2 <= G; j += 2) {
            const __m256 first = decoded_8x8(c + j * 8, dtype, cb), second = decoded_8x8(c + j * 8 + 8, dtype, cb);
            for (int t = 0; t < n; t++) {
                even[t] = _mm256_fmadd_ps(first, _mm256_loadu_ps(x + t * in + j * 8), even[t]);
                odd[t] = _mm256_fmadd_ps(second, _mm256_loadu_ps(x + t * in + j * 8 + 8), odd[t]);
            }
        }
        if (j < G) {
            const __m256 word = decoded_8x8(c + j * 8, dtype, cb);
            for (int t = 0; t < n; t++) even[t] = _mm256_fmadd_ps(word, _mm256_loadu_ps(x + t * in + j * 8), even[t]);
        }
        for (int t = 0; t < n; t++) acc[(o - o0) * n + t] = hsum8(_mm256_add_ps(even[t], odd[t]));
    }
}

#define DECODE_DOT_G8_CASE(N)                                                                                 \
    case N:                                                                                                   \
        if (s->K == 256 && s->M == 8) {                                                                       \
            const uint8_t *c8 = (const uint8_t *)codes;                                                       \
            if (cb_dtype == AQLM_F32) decode_dot_8x8g8(s, o0, o1, N, x, c8, AQLM_F32, cb, acc);               \
            else if (cb_dtype == AQLM_F16) decode_dot_8x8g8(s, o0, o1, N, x, c8, AQLM_F16, cb, acc);          \
            else decode_dot_8x8g8(s, o0, o1, N, x, c8, AQLM_BF16, cb, acc);                                   \
        } else if (s->K == 256) {                                                                             \
            const uint8_t *c8 = (const uint8_t *)codes;                                                       \
            if (cb_dtype == AQLM_F32) decode_dot_g8_k256(s, o0, o1, N, x, c8, AQLM_F32, cb, acc);             \
            else if (cb_dtype == AQLM_F16) decode_dot_g8_k256(s, o0, o1, N, x, c8, AQLM_F16, cb, acc);        \
            else decode_dot_g8_k256(s, o0, o1, N, x, c8, AQLM_BF16, cb, acc);                                 \
        } else {                                                                                              \
            const uint16_t *c16 = (const uint16_t *)codes;                                                    \
            if (cb_dtype == AQLM_F32) decode_dot_g8_k65536(s, o0, o1, N, x, c16, AQLM_F32, cb, acc);          \
            else if (cb_dtype == AQLM_F16) decode_dot_g8_k65536(s, o0, o1, N, x, c16, AQLM_F16, cb, acc);     \
            else decode_dot_g8_k65536(s, o0, o1, N, x, c16, AQLM_BF16, cb, acc);                              \
        }                                                                                                     \
        return;

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
    if (s->M == 1 && s->ig == 8 && s->K == 65536 && n == 1) { /* every 16-bit value is a valid code */
        const uint16_t *c16 = (const uint16_t *)codes;
        if (cb_dtype == AQLM_F32) decode_dot_1x16g8_one_token(s, o0, o1, x, c16, AQLM_F32, cb, acc);
        else if (cb_dtype == AQLM_F16) decode_dot_1x16g8_one_token(s, o0, o1, x, c16, AQLM_F16, cb, acc);
        else decode_dot_1x16g8_one_token(s, o0, o1, x, c16, AQLM_BF16, cb, acc);
        return;
    }
    if (s->og == 1 && s->ig == 8 && (s->K == 256 || s->K == 65536)) {
        switch (n) {
            DECODE_DOT_G8_CASE(1)
            DECODE_DOT_G8_CASE(2)
            DECODE_DOT_G8_CASE(3)
            DECODE_DOT_G8_CASE(4)
            DECODE_DOT_G8_CASE(5)
            DECODE_DOT_G8_CASE(6)
            DECODE_DOT_G8_CASE(7)
            DECODE_DOT_G8_CASE(8)
        }
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

/* ---- top-k scores over codewords ------------------------------------------------------------- */

/* Scores of 32 consecutive codewords (four vectors) for one query, in the reference's order. */
ALWAYS_INLINE void scores32(int64_t D, int64_t K, const float *restrict query, const float *restrict ct,
                            const float *restrict bias, int64_t c, __m256 out[4]) {
    __m256 v0 = _mm256_loadu_ps(bias + c), v1 = _mm256_loadu_ps(bias + c + 8);
    __m256 v2 = _mm256_loadu_ps(bias + c + 16), v3 = _mm256_loadu_ps(bias + c + 24);
    for (int64_t d = 0; d < D; d++) {
        const __m256 qd = _mm256_broadcast_ss(query + d);
        const float *column = ct + d * K + c;
        v0 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(column), v0);
        v1 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(column + 8), v1);
        v2 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(column + 16), v2);
        v3 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(column + 24), v3);
    }
    out[0] = v0, out[1] = v1, out[2] = v2, out[3] = v3;
}

ALWAYS_INLINE float score_one(int64_t D, int64_t K, const float *restrict query, const float *restrict ct,
                              const float *restrict bias, int64_t c) {
    float value = bias[c];
    for (int64_t d = 0; d < D; d++) value = _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(query[d]), _mm_set_ss(ct[d * K + c]), _mm_set_ss(value)));
    return value;
}

enum { TOPK_BLOCK = 512 }; /* codewords per block: D x 512 floats stay in L1 across all queries */

void aqlm_topk_scores_avx2(int64_t n, int64_t D, int64_t K, int64_t k, const float *restrict q,
                           const float *restrict ct, const float *restrict bias, float *restrict values,
                           int32_t *restrict indices) {
    for (int64_t t = 0; t < n * k; t++) values[t] = INFINITY, indices[t] = -1;
    /* Codewords in blocks, every query against a block before the next: each query still sees
     * the codewords in ascending order, so the result equals one sequential scan. */
    for (int64_t c0 = 0; c0 < K; c0 += TOPK_BLOCK) {
        const int64_t c1 = c0 + TOPK_BLOCK < K ? c0 + TOPK_BLOCK : K;
        const int64_t c32 = c0 + (c1 - c0) / 32 * 32;
        for (int64_t row = 0; row < n; row++) {
            const float *query = q + row * D;
            float *best = values + row * k;
            int32_t *best_index = indices + row * k;
            __m256 scores[4];
            if (k == 1) {
                /* Per-lane first minimum within the block, then the smallest index among the lanes
                 * holding it: the same answer as a sequential scan with a strict comparison. */
                __m256 lane_best = _mm256_set1_ps(INFINITY);
                __m256i lane_index = _mm256_set1_epi32(-1);
                const __m256i step = _mm256_set1_epi32(8);
                __m256i index = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)c0));
                for (int64_t c = c0; c < c32; c += 32) {
                    scores32(D, K, query, ct, bias, c, scores);
                    for (int b = 0; b < 4; b++) {
                        const __m256 better = _mm256_cmp_ps(scores[b], lane_best, _CMP_LT_OQ);
                        lane_best = _mm256_blendv_ps(lane_best, scores[b], better);
                        lane_index = _mm256_blendv_epi8(lane_index, index, _mm256_castps_si256(better));
                        index = _mm256_add_epi32(index, step);
                    }
                }
                float lanes[8];
                int32_t lane_indices[8];
                _mm256_storeu_ps(lanes, lane_best);
                _mm256_storeu_si256((__m256i *)lane_indices, lane_index);
                float block_best = INFINITY;
                int32_t block_index = -1;
                for (int lane = 0; lane < 8; lane++) {
                    if (lane_indices[lane] < 0) continue;
                    if (lanes[lane] < block_best || (lanes[lane] == block_best && lane_indices[lane] < block_index))
                        block_best = lanes[lane], block_index = lane_indices[lane];
                }
                if (block_index >= 0) aqlm_topk_insert(1, best, best_index, block_best, block_index);
                for (int64_t c = c32; c < c1; c++) aqlm_topk_insert(1, best, best_index, score_one(D, K, query, ct, bias, c), (int32_t)c);
                continue;
            }
            for (int64_t c = c0; c < c32; c += 32) {
                scores32(D, K, query, ct, bias, c, scores);
                const __m256 threshold = _mm256_set1_ps(best[k - 1]);
                int any = 0;
                for (int b = 0; b < 4; b++) any |= _mm256_movemask_ps(_mm256_cmp_ps(scores[b], threshold, _CMP_LT_OQ));
                if (!any) continue;
                float block[32];
                for (int b = 0; b < 4; b++) _mm256_storeu_ps(block + 8 * b, scores[b]);
                for (int lane = 0; lane < 32; lane++) aqlm_topk_insert(k, best, best_index, block[lane], (int32_t)(c + lane));
            }
            for (int64_t c = c32; c < c1; c++) aqlm_topk_insert(k, best, best_index, score_one(D, K, query, ct, bias, c), (int32_t)c);
        }
    }
}

/* ---- gradient update ------------------------------------------------------------------------- */

ALWAYS_INLINE void gradient_update_tail(int64_t ig, int64_t width, int64_t from, const float *restrict d,
                                        const float *restrict h, float *restrict g) {
    for (int64_t col = from; col < width; col++) {
        float value = g[col];
        for (int64_t i = 0; i < ig; i++) value = fmaf(-d[i], h[i * width + col], value);
        g[col] = value;
    }
}

void aqlm_gradient_update_avx2(int64_t n, int64_t ig, int64_t width, const float *restrict delta,
                               const float *restrict h, float *const *restrict g_rows) {
    const int64_t width8 = width / 8 * 8;
    int64_t row = 0;
    for (; row + 4 <= n; row += 4) { /* four rows share every load of h */
        float *g0 = g_rows[row], *g1 = g_rows[row + 1], *g2 = g_rows[row + 2], *g3 = g_rows[row + 3];
        const float *d0 = delta + row * ig, *d1 = d0 + ig, *d2 = d1 + ig, *d3 = d2 + ig;
        for (int64_t col = 0; col < width8; col += 8) {
            __m256 a0 = _mm256_loadu_ps(g0 + col), a1 = _mm256_loadu_ps(g1 + col);
            __m256 a2 = _mm256_loadu_ps(g2 + col), a3 = _mm256_loadu_ps(g3 + col);
            for (int64_t i = 0; i < ig; i++) {
                const __m256 hv = _mm256_loadu_ps(h + i * width + col);
                a0 = _mm256_fnmadd_ps(_mm256_set1_ps(d0[i]), hv, a0);
                a1 = _mm256_fnmadd_ps(_mm256_set1_ps(d1[i]), hv, a1);
                a2 = _mm256_fnmadd_ps(_mm256_set1_ps(d2[i]), hv, a2);
                a3 = _mm256_fnmadd_ps(_mm256_set1_ps(d3[i]), hv, a3);
            }
            _mm256_storeu_ps(g0 + col, a0), _mm256_storeu_ps(g1 + col, a1);
            _mm256_storeu_ps(g2 + col, a2), _mm256_storeu_ps(g3 + col, a3);
        }
        gradient_update_tail(ig, width, width8, d0, h, g0), gradient_update_tail(ig, width, width8, d1, h, g1);
        gradient_update_tail(ig, width, width8, d2, h, g2), gradient_update_tail(ig, width, width8, d3, h, g3);
    }
    for (; row < n; row++) {
        float *g = g_rows[row];
        const float *d = delta + row * ig;
        for (int64_t col = 0; col < width8; col += 8) {
            __m256 a = _mm256_loadu_ps(g + col);
            for (int64_t i = 0; i < ig; i++) a = _mm256_fnmadd_ps(_mm256_set1_ps(d[i]), _mm256_loadu_ps(h + i * width + col), a);
            _mm256_storeu_ps(g + col, a);
        }
        gradient_update_tail(ig, width, width8, d, h, g);
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
    .topk_scores = aqlm_topk_scores_avx2,
    .gradient_update = aqlm_gradient_update_avx2,
    .codeword_norms = aqlm_codeword_norms_ref,
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
    .topk_scores = aqlm_topk_scores_ref,
    .gradient_update = aqlm_gradient_update_ref,
    .codeword_norms = aqlm_codeword_norms_ref,
};

#endif
