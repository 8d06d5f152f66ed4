/*
 * lutw_avx2.c - AVX2 wide-token table kernels (definitions in lutw.h).
 *
 * An entry of W tokens is W / 8 ymm registers. The tables are fmas of a broadcast codeword
 * value with the W tokens' inputs, in order i (as the reference); the sweep adds ROWS rows'
 * entries at a time, so ROWS independent add chains overlap. Also used by the AVX-512 kernels
 * for passes of 8 tokens.
 */
#include "lutw.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

enum { ROWS = 4 }; /* rows summed together: ROWS * W / 8 accumulators */

ALWAYS_INLINE void build(const int V, const aqlm_block_shape *s, int64_t j0, int64_t j1, const float *restrict xt,
                         const float *restrict cb, float *restrict tables) {
    const int64_t ig = s->ig, M = s->M, K = s->K, W = 8 * V;
    for (int64_t j = j0; j < j1; j++)
        for (int64_t m = 0; m < M; m++)
            for (int64_t c = 0; c < K; c++) {
                __m256 value[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
                const float *word = cb + (m * K + c) * ig;
                for (int64_t i = 0; i < ig; i++) {
                    const __m256 w = _mm256_broadcast_ss(word + i);
                    for (int v = 0; v < V; v++) value[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xt + (j * ig + i) * W + 8 * v), value[v]);
                }
                float *entry = tables + (((j - j0) * M + m) * K + c) * W;
                for (int v = 0; v < V; v++) _mm256_storeu_ps(entry + 8 * v, value[v]);
            }
}

/* Adds one entry (V ymm) of `table` at `code` to the row's sums. */
#define ADD_ENTRY(sum, table, code)                                                                \
    do {                                                                                           \
        const float *entry_ = (table) + (int64_t)(code) * (8 * V);                                 \
        for (int v = 0; v < V; v++) (sum)[v] = _mm256_add_ps((sum)[v], _mm256_loadu_ps(entry_ + 8 * v)); \
    } while (0)

ALWAYS_INLINE void sweep(const int V, const aqlm_block_shape *s, int64_t j0, int64_t j1, int64_t tile0, int64_t tile1,
                         const uint8_t *restrict packed, const float *restrict tables, float *restrict acc) {
    const int64_t M = s->M, K = s->K, W = 8 * V, slots = (j1 - j0) * M;
    const uint32_t mask = s->code_mask;
    const int nibbles = aqlm_lutq_nibbles(s);
    for (int64_t tile = tile0; tile < tile1; tile++) {
        const uint8_t *codes = aqlm_lutw_codes(s, packed, tile, j0);
        for (int64_t lane0 = 0; lane0 < AQLM_LUTW_TILE; lane0 += ROWS) {
            float *sums = acc + ((tile - tile0) * AQLM_LUTW_TILE + lane0) * W;
            __m256 r[ROWS][2];
            for (int k = 0; k < ROWS; k++)
                for (int v = 0; v < V; v++) r[k][v] = _mm256_loadu_ps(sums + k * W + 8 * v);
            if (nibbles) {
                for (int64_t pair = 0; pair < slots / 2; pair++) {
                    const uint8_t *code = codes + pair * AQLM_LUTW_TILE + lane0;
                    const float *low = tables + 2 * pair * K * W, *high = low + K * W;
                    for (int k = 0; k < ROWS; k++) ADD_ENTRY(r[k], low, code[k] & mask);
                    for (int k = 0; k < ROWS; k++) ADD_ENTRY(r[k], high, (code[k] >> 4) & mask);
                }
            } else {
                for (int64_t slot = 0; slot < slots; slot++) {
                    const uint8_t *code = codes + slot * AQLM_LUTW_TILE + lane0;
                    const float *table = tables + slot * K * W;
                    for (int k = 0; k < ROWS; k++) ADD_ENTRY(r[k], table, code[k] & mask);
                }
            }
            for (int k = 0; k < ROWS; k++)
                for (int v = 0; v < V; v++) _mm256_storeu_ps(sums + k * W + 8 * v, r[k][v]);
        }
    }
}

void aqlm_lutw_tables_avx2(const aqlm_block_shape *s, int64_t W, int64_t j0, int64_t j1, const float *restrict xt,
                           const float *restrict cb, float *restrict tables) {
    if (W == 16) build(2, s, j0, j1, xt, cb, tables);
    else if (W == 8) build(1, s, j0, j1, xt, cb, tables);
    else aqlm_lutw_tables_ref(s, W, j0, j1, xt, cb, tables);
}

void aqlm_lutw_sweep_avx2(const aqlm_block_shape *s, int64_t W, int64_t j0, int64_t j1, int64_t tile0, int64_t tile1,
                          const uint8_t *restrict packed, const float *restrict tables, float *restrict acc) {
    if (W == 16) sweep(2, s, j0, j1, tile0, tile1, packed, tables, acc);
    else if (W == 8) sweep(1, s, j0, j1, tile0, tile1, packed, tables, acc);
    else aqlm_lutw_sweep_ref(s, W, j0, j1, tile0, tile1, packed, tables, acc);
}

const aqlm_lutw_kernels aqlm_lutw_kernels_avx2 = {
    .name = "avx2",
    .tables = aqlm_lutw_tables_avx2,
    .sweep = aqlm_lutw_sweep_avx2,
};
#else
const aqlm_lutw_kernels aqlm_lutw_kernels_avx2 = {0};
#endif
