/*
 * lutw_avx512.c - AVX-512 wide-token table kernels (definitions in lutw.h).
 *
 * A 16-token entry is one zmm: each table entry is ig fmas of a broadcast codeword value with
 * the 16 tokens' inputs (in order i, as the reference), and each lookup one 64-byte load added
 * to a row's sums. ROWS rows are summed together so their add chains overlap. Passes of 8 tokens
 * use the AVX2 kernels (one ymm per entry).
 */
#include "lutw.h"

#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

enum { ROWS = 8 }; /* rows summed together, one zmm each */

static void build16(const aqlm_block_shape *s, int64_t j0, int64_t j1, const float *restrict xt,
                    const float *restrict cb, float *restrict tables) {
    const int64_t ig = s->ig, M = s->M, K = s->K;
    for (int64_t j = j0; j < j1; j++)
        for (int64_t m = 0; m < M; m++)
            for (int64_t c = 0; c < K; c++) {
                __m512 value = _mm512_setzero_ps();
                const float *word = cb + (m * K + c) * ig;
                for (int64_t i = 0; i < ig; i++)
                    value = _mm512_fmadd_ps(_mm512_set1_ps(word[i]), _mm512_loadu_ps(xt + (j * ig + i) * 16), value);
                _mm512_storeu_ps(tables + (((j - j0) * M + m) * K + c) * 16, value);
            }
}

static void sweep16(const aqlm_block_shape *s, int64_t j0, int64_t j1, int64_t tile0, int64_t tile1,
                    const uint8_t *restrict packed, const float *restrict tables, float *restrict acc) {
    const int64_t M = s->M, K = s->K, slots = (j1 - j0) * M;
    const uint32_t mask = s->code_mask;
    const int nibbles = aqlm_lutq_nibbles(s);
    for (int64_t tile = tile0; tile < tile1; tile++) {
        const uint8_t *codes = aqlm_lutw_codes(s, packed, tile, j0);
        for (int64_t lane0 = 0; lane0 < AQLM_LUTW_TILE; lane0 += ROWS) {
            float *sums = acc + ((tile - tile0) * AQLM_LUTW_TILE + lane0) * 16;
            __m512 r[ROWS];
            for (int k = 0; k < ROWS; k++) r[k] = _mm512_loadu_ps(sums + k * 16);
            if (nibbles) {
                for (int64_t pair = 0; pair < slots / 2; pair++) {
                    const uint8_t *code = codes + pair * AQLM_LUTW_TILE + lane0;
                    const float *low = tables + 2 * pair * K * 16, *high = low + K * 16;
                    for (int k = 0; k < ROWS; k++) r[k] = _mm512_add_ps(r[k], _mm512_loadu_ps(low + (int64_t)(code[k] & mask) * 16));
                    for (int k = 0; k < ROWS; k++) r[k] = _mm512_add_ps(r[k], _mm512_loadu_ps(high + (int64_t)((code[k] >> 4) & mask) * 16));
                }
            } else {
                for (int64_t slot = 0; slot < slots; slot++) {
                    const uint8_t *code = codes + slot * AQLM_LUTW_TILE + lane0;
                    const float *table = tables + slot * K * 16;
                    for (int k = 0; k < ROWS; k++) r[k] = _mm512_add_ps(r[k], _mm512_loadu_ps(table + (int64_t)(code[k] & mask) * 16));
                }
            }
            for (int k = 0; k < ROWS; k++) _mm512_storeu_ps(sums + k * 16, r[k]);
        }
    }
}

static void tables_avx512(const aqlm_block_shape *s, int64_t W, int64_t j0, int64_t j1, const float *restrict xt,
                          const float *restrict cb, float *restrict tables) {
    if (W == 16) build16(s, j0, j1, xt, cb, tables);
    else aqlm_lutw_tables_avx2(s, W, j0, j1, xt, cb, tables);
}

static void sweep_avx512(const aqlm_block_shape *s, int64_t W, int64_t j0, int64_t j1, int64_t tile0, int64_t tile1,
                         const uint8_t *restrict packed, const float *restrict tables, float *restrict acc) {
    if (W == 16) sweep16(s, j0, j1, tile0, tile1, packed, tables, acc);
    else aqlm_lutw_sweep_avx2(s, W, j0, j1, tile0, tile1, packed, tables, acc);
}

const aqlm_lutw_kernels aqlm_lutw_kernels_avx512 = {
    .name = "avx512",
    .tables = tables_avx512,
    .sweep = sweep_avx512,
};
#else
const aqlm_lutw_kernels aqlm_lutw_kernels_avx512 = {0};
#endif
