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

#define ALWAYS_INLINE static inline __attribute__((always_inline))

enum { ROWS = 8, WORDS = 8 }; /* rows summed together, one zmm each; codewords whose entries are built together */

/* Entries of `count` <= WORDS codewords from `word` (ig floats each) and the 16 tokens' inputs
 * xr [ig][16]: `count` independent fma chains, each in order i. */
ALWAYS_INLINE void build_words(const int count, int64_t ig, const float *restrict word, const float *restrict xr,
                               float *restrict entry) {
    __m512 value[WORDS];
    for (int w = 0; w < count; w++) value[w] = _mm512_setzero_ps();
    for (int64_t i = 0; i < ig; i++) {
        const __m512 x = _mm512_loadu_ps(xr + i * 16);
        for (int w = 0; w < count; w++) value[w] = _mm512_fmadd_ps(_mm512_set1_ps(word[w * ig + i]), x, value[w]);
    }
    for (int w = 0; w < count; w++) _mm512_storeu_ps(entry + w * 16, value[w]);
}

static void build16(const aqlm_block_shape *s, int64_t m, int64_t j0, int64_t j1, const float *restrict xt,
                    const float *restrict cb, float *restrict tables) {
    const int64_t ig = s->ig, K = s->K;
    for (int64_t j = j0; j < j1; j++) {
        const float *xr = xt + j * ig * 16;
        float *entry = tables + (j - j0) * K * 16;
        int64_t c = 0;
        for (; c + WORDS <= K; c += WORDS) build_words(WORDS, ig, cb + (m * K + c) * ig, xr, entry + c * 16);
        for (; c < K; c++) build_words(1, ig, cb + (m * K + c) * ig, xr, entry + c * 16);
    }
}

/* Sweep of 16-token entries; `masked`: whether codes need shifting and masking (all but one code
 * per byte of 256 codewords), known at compile time in each copy. */
ALWAYS_INLINE void sweep16_rows(const int masked, const aqlm_block_shape *s, int64_t m, int64_t j0, int64_t j1,
                                int64_t tile0, int64_t tile1, const uint8_t *restrict packed,
                                const float *restrict tables, float *restrict acc) {
    const int64_t K = s->K, groups = j1 - j0;
    const uint32_t mask = s->code_mask;
    for (int64_t tile = tile0; tile < tile1; tile++) {
        int64_t stride;
        int shift;
        const uint8_t *codes = aqlm_lutw_codes(s, packed, tile, j0, m, &stride, &shift);
        aqlm_lutw_prefetch_ahead(s, packed, tile, tile1, j0, j1, m);
        for (int64_t lane0 = 0; lane0 < AQLM_LUTW_TILE; lane0 += ROWS) {
            float *sums = acc + ((tile - tile0) * AQLM_LUTW_TILE + lane0) * 16;
            __m512 r[ROWS];
            for (int k = 0; k < ROWS; k++) r[k] = _mm512_loadu_ps(sums + k * 16);
            for (int64_t j = 0; j < groups; j++) {
                const uint8_t *code = codes + j * stride + lane0;
                const float *table = tables + j * K * 16;
                for (int k = 0; k < ROWS; k++) {
                    const size_t c = masked ? (size_t)((uint32_t)(code[k] >> shift) & mask) : (size_t)code[k];
                    r[k] = _mm512_add_ps(r[k], _mm512_loadu_ps(table + (c << 4)));
                }
            }
            for (int k = 0; k < ROWS; k++) _mm512_storeu_ps(sums + k * 16, r[k]);
        }
    }
}

static void sweep16(const aqlm_block_shape *s, int64_t m, int64_t j0, int64_t j1, int64_t tile0, int64_t tile1,
                    const uint8_t *restrict packed, const float *restrict tables, float *restrict acc) {
    if (s->K == 256) sweep16_rows(0, s, m, j0, j1, tile0, tile1, packed, tables, acc);
    else sweep16_rows(1, s, m, j0, j1, tile0, tile1, packed, tables, acc);
}

static void tables_avx512(const aqlm_block_shape *s, int64_t W, int64_t m, int64_t j0, int64_t j1,
                          const float *restrict xt, const float *restrict cb, float *restrict tables) {
    if (W == 16) build16(s, m, j0, j1, xt, cb, tables);
    else aqlm_lutw_tables_avx2(s, W, m, j0, j1, xt, cb, tables);
}

static void sweep_avx512(const aqlm_block_shape *s, int64_t W, int64_t m, int64_t j0, int64_t j1, int64_t tile0,
                         int64_t tile1, const uint8_t *restrict packed, const float *restrict tables,
                         float *restrict acc) {
    if (W == 16) sweep16(s, m, j0, j1, tile0, tile1, packed, tables, acc);
    else aqlm_lutw_sweep_avx2(s, W, m, j0, j1, tile0, tile1, packed, tables, acc);
}

const aqlm_lutw_kernels aqlm_lutw_kernels_avx512 = {
    .name = "avx512",
    .tables = tables_avx512,
    .sweep = sweep_avx512,
};
#else
const aqlm_lutw_kernels aqlm_lutw_kernels_avx512 = {0};
#endif
