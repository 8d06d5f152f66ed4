/*
 * lutw_avx2.c - AVX2 wide-token table kernels (definitions in lutw.h).
 *
 * An entry of W tokens is W / 8 ymm registers. The tables are fmas of a broadcast codeword
 * value with the W tokens' inputs, in order i (as the reference); the sweep adds several rows'
 * entries at a time, so their independent add chains overlap. Also used by the AVX-512 kernels
 * for passes of 8 tokens.
 */
#include "lutw.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Rows summed together: ROWS_PER_V / V, so ROWS_PER_V accumulators (8-token entries: 4 rows took
 * 4.3 ms at 4096x4096 2x8g8, 8 tokens, 1 thread, AVX-512 level; 8 rows 2.7-3.2 ms); codewords
 * whose entries are built together. */
enum { ROWS_PER_V = 8, WORDS = 4 };

/* Entries of `count` <= WORDS codewords from `word` (ig floats each) and the W = 8 V tokens'
 * inputs xr [ig][W]: independent fma chains, each in order i. */
ALWAYS_INLINE void build_words(const int V, const int count, int64_t ig, const float *restrict word,
                               const float *restrict xr, float *restrict entry) {
    __m256 value[WORDS][2];
    for (int w = 0; w < count; w++)
        for (int v = 0; v < V; v++) value[w][v] = _mm256_setzero_ps();
    for (int64_t i = 0; i < ig; i++)
        for (int v = 0; v < V; v++) {
            const __m256 x = _mm256_loadu_ps(xr + i * 8 * V + 8 * v);
            for (int w = 0; w < count; w++) value[w][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(word + w * ig + i), x, value[w][v]);
        }
    for (int w = 0; w < count; w++)
        for (int v = 0; v < V; v++) _mm256_storeu_ps(entry + w * 8 * V + 8 * v, value[w][v]);
}

ALWAYS_INLINE void build(const int V, const aqlm_block_shape *s, int64_t m, int64_t j0, int64_t j1,
                         const float *restrict xt, const float *restrict cb, float *restrict tables) {
    const int64_t ig = s->ig, K = s->K, W = 8 * V;
    for (int64_t j = j0; j < j1; j++) {
        const float *xr = xt + j * ig * W;
        float *entry = tables + (j - j0) * K * W;
        int64_t c = 0;
        for (; c + WORDS <= K; c += WORDS) build_words(V, WORDS, ig, cb + (m * K + c) * ig, xr, entry + c * W);
        for (; c < K; c++) build_words(V, 1, ig, cb + (m * K + c) * ig, xr, entry + c * W);
    }
}

/* `masked`: whether codes need shifting and masking (all but one code per byte of 256
 * codewords), fixed per copy. */
ALWAYS_INLINE void sweep(const int V, const int masked, const aqlm_block_shape *s, int64_t m, int64_t j0, int64_t j1,
                         int64_t tile0, int64_t tile1, const uint8_t *restrict packed, const float *restrict tables,
                         float *restrict acc) {
    const int64_t K = s->K, W = 8 * V, groups = j1 - j0;
    const uint32_t mask = s->code_mask;
    const int ROWS = ROWS_PER_V / V;
    for (int64_t tile = tile0; tile < tile1; tile++) {
        int64_t stride;
        int shift;
        const uint8_t *codes = aqlm_lutw_codes(s, packed, tile, j0, m, &stride, &shift);
        aqlm_lutw_prefetch_ahead(s, packed, tile, tile1, j0, j1, m);
        for (int64_t lane0 = 0; lane0 < AQLM_LUTW_TILE; lane0 += ROWS) {
            float *sums = acc + ((tile - tile0) * AQLM_LUTW_TILE + lane0) * W;
            __m256 r[ROWS_PER_V][2];
            for (int k = 0; k < ROWS; k++)
                for (int v = 0; v < V; v++) r[k][v] = _mm256_loadu_ps(sums + k * W + 8 * v);
            for (int64_t j = 0; j < groups; j++) {
                const uint8_t *code = codes + j * stride + lane0;
                const float *table = tables + j * K * W;
                for (int k = 0; k < ROWS; k++) {
                    const size_t c = masked ? (size_t)((uint32_t)(code[k] >> shift) & mask) : (size_t)code[k];
                    const float *entry = table + c * (size_t)(8 * V);
                    for (int v = 0; v < V; v++) r[k][v] = _mm256_add_ps(r[k][v], _mm256_loadu_ps(entry + 8 * v));
                }
            }
            for (int k = 0; k < ROWS; k++)
                for (int v = 0; v < V; v++) _mm256_storeu_ps(sums + k * W + 8 * v, r[k][v]);
        }
    }
}

void aqlm_lutw_tables_avx2(const aqlm_block_shape *s, int64_t W, int64_t m, int64_t j0, int64_t j1,
                           const float *restrict xt, const float *restrict cb, float *restrict tables) {
    if (W == 16) build(2, s, m, j0, j1, xt, cb, tables);
    else if (W == 8) build(1, s, m, j0, j1, xt, cb, tables);
    else aqlm_lutw_tables_ref(s, W, m, j0, j1, xt, cb, tables);
}

void aqlm_lutw_sweep_avx2(const aqlm_block_shape *s, int64_t W, int64_t m, int64_t j0, int64_t j1, int64_t tile0,
                          int64_t tile1, const uint8_t *restrict packed, const float *restrict tables,
                          float *restrict acc) {
    const int masked = s->K != 256;
    if (W == 16 && masked) sweep(2, 1, s, m, j0, j1, tile0, tile1, packed, tables, acc);
    else if (W == 16) sweep(2, 0, s, m, j0, j1, tile0, tile1, packed, tables, acc);
    else if (W == 8 && masked) sweep(1, 1, s, m, j0, j1, tile0, tile1, packed, tables, acc);
    else if (W == 8) sweep(1, 0, s, m, j0, j1, tile0, tile1, packed, tables, acc);
    else aqlm_lutw_sweep_ref(s, W, m, j0, j1, tile0, tile1, packed, tables, acc);
}

const aqlm_lutw_kernels aqlm_lutw_kernels_avx2 = {
    .name = "avx2",
    .tables = aqlm_lutw_tables_avx2,
    .sweep = aqlm_lutw_sweep_avx2,
};
#else
const aqlm_lutw_kernels aqlm_lutw_kernels_avx2 = {0};
#endif
