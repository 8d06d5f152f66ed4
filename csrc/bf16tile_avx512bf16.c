/*
 * bf16tile_avx512bf16.c - the bfloat16 tile kernels (bf16tile.h) with AVX-512 BF16 (VDPBF16PS), for
 * CPUs without AMX (AMD Zen 4, Intel Cooper Lake), and the token packing and codebook conversion
 * that the AMX kernels use too.
 *
 * A group of 16 output rows keeps one accumulator per row (16 tokens in fp32, one zmm). For each
 * input group j, the packed tokens' ig / 2 rows of input pairs (one zmm each: 16 tokens x 2) are
 * loaded once, and each row adds VDPBF16PS(codeword pair broadcast from the bfloat16 codebook,
 * tokens' pair) for each pair of its codeword: no panel is built, the codebook is read in place.
 */
#include "bf16tile.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__F16C__)
#include <immintrin.h>

int aqlm_bf16_cpu_has_avx512bf16(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16");
}

/* 32 values from base[index ..] as bfloat16 (round to nearest even). */
static inline __m512i load32_bf16(aqlm_dtype dtype, const void *base, int64_t index) {
    if (dtype == AQLM_BF16) return _mm512_loadu_si512((const uint16_t *)base + index);
    __m512 lo, hi;
    if (dtype == AQLM_F32) {
        lo = _mm512_loadu_ps((const float *)base + index), hi = _mm512_loadu_ps((const float *)base + index + 16);
    } else {
        lo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + index)));
        hi = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + index + 16)));
    }
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

void aqlm_bf16_pack_avx512bf16(aqlm_dtype x_dtype, const void *x, int64_t in, int64_t tokens, int64_t blocks,
                               int64_t c0, int64_t c1, uint16_t *restrict xb) {
    uint32_t rows[AQLM_BF16_TOKENS][AQLM_BF16_CHUNK / 2]; /* token t's 16 input pairs */
    for (int64_t c = c0; c < c1; c++)
        for (int64_t b = 0; b < blocks; b++) {
            for (int64_t t = 0; t < AQLM_BF16_TOKENS; t++) {
                const int64_t token = b * AQLM_BF16_TOKENS + t;
                const __m512i v = token < tokens ? load32_bf16(x_dtype, x, token * in + c * AQLM_BF16_CHUNK)
                                                 : _mm512_setzero_si512();
                _mm512_storeu_si512(rows[t], v);
            }
            uint32_t *tile = (uint32_t *)(xb + (c * blocks + b) * AQLM_BF16_TILE_ELEMENTS);
            for (int p = 0; p < AQLM_BF16_CHUNK / 2; p++)
                for (int t = 0; t < AQLM_BF16_TOKENS; t++) tile[p * AQLM_BF16_TOKENS + t] = rows[t][p];
        }
}

void aqlm_bf16_convert_avx512bf16(aqlm_dtype dtype, const void *src, int64_t count, uint16_t *restrict dst) {
    int64_t i = 0;
    for (; i + 32 <= count; i += 32) _mm512_storeu_si512(dst + i, load32_bf16(dtype, src, i));
    for (; i < count; i++) dst[i] = aqlm_f32_to_bf16(aqlm_load(dtype, src, i));
}

/* Row tile rows [row0, row0 + 16) and token block b: one accumulator per row, in registers (rows
 * from `rows` on repeat the last row; the caller ignores them). IG is ig when a compile-time
 * constant, else 0. */
static inline __attribute__((always_inline)) void tile_dots(const int IG, const aqlm_block_shape *s, int64_t row0,
                                                            int64_t rows, int64_t blocks, int64_t b,
                                                            const void *restrict codes, const uint16_t *restrict cb,
                                                            const uint16_t *restrict xb, float *restrict out) {
    const int64_t ig = IG ? IG : s->ig, pairs = ig / 2, G = s->in_groups, M = s->M, K = s->K;
    int64_t first[AQLM_BF16_ROWS]; /* each row's first code */
    for (int o = 0; o < AQLM_BF16_ROWS; o++) first[o] = (row0 + o < rows ? row0 + o : rows - 1) * G * M;
    __m512 acc[AQLM_BF16_ROWS];
    for (int o = 0; o < AQLM_BF16_ROWS; o++) acc[o] = _mm512_setzero_ps();
    for (int64_t j = 0; j < G; j++) {
        const int64_t input = j * ig, c = input / AQLM_BF16_CHUNK, p0 = input % AQLM_BF16_CHUNK / 2;
        const uint16_t *tile = xb + (c * blocks + b) * AQLM_BF16_TILE_ELEMENTS + p0 * 2 * AQLM_BF16_TOKENS;
        for (int64_t m = 0; m < M; m++) {
            const uint16_t *codebook = cb + m * K * ig;
#pragma GCC unroll 16
            for (int o = 0; o < AQLM_BF16_ROWS; o++) {
                const uint32_t code = aqlm_code_at(s->code_bits, codes, first[o] + j * M + m, s->code_mask);
                const uint32_t *word = (const uint32_t *)(codebook + code * ig);
                for (int64_t p = 0; p < pairs; p++)
                    acc[o] = _mm512_dpbf16_ps(acc[o], (__m512bh)_mm512_set1_epi32((int)word[p]),
                                              (__m512bh)_mm512_load_si512(tile + p * 2 * AQLM_BF16_TOKENS));
            }
        }
    }
    for (int o = 0; o < AQLM_BF16_ROWS; o++) _mm512_storeu_ps(out + o * AQLM_BF16_TOKENS, acc[o]);
}

static void rows_avx512bf16(const aqlm_block_shape *s, int64_t row0, int64_t rows, int R, int T, int64_t blocks,
                            const void *restrict codes, const uint16_t *restrict cb, const uint16_t *restrict xb,
                            uint16_t *restrict strip, float *restrict acc) {
    for (int64_t b = 0; b < blocks; b++)
        for (int r = 0; r < R; r++) {
            float *out = acc + (((b / T) * R + r) * T + b % T) * AQLM_BF16_ROWS * AQLM_BF16_TOKENS;
            const int64_t first = row0 + r * AQLM_BF16_ROWS;
            if (s->ig == 8) tile_dots(8, s, first, rows, blocks, b, codes, cb, xb, out);
            else tile_dots(0, s, first, rows, blocks, b, codes, cb, xb, out);
        }
}

const aqlm_bf16_kernels aqlm_bf16_kernels_avx512bf16 = {"avx512bf16", aqlm_bf16_pack_avx512bf16,
                                                        aqlm_bf16_convert_avx512bf16, rows_avx512bf16};
#else
int aqlm_bf16_cpu_has_avx512bf16(void) { return 0; }
const aqlm_bf16_kernels aqlm_bf16_kernels_avx512bf16 = {NULL, NULL, NULL, NULL};
#endif
