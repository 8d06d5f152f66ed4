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

ALWAYS_INLINE void build(const int V, const aqlm_block_shape *s, int64_t j0, int64_t j1, const float *restrict xt,
                         const float *restrict cb, float *restrict tables) {
    const int64_t ig = s->ig, M = s->M, K = s->K, W = 8 * V;
    for (int64_t j = j0; j < j1; j++)
        for (int64_t m = 0; m < M; m++) {
            const float *xr = xt + j * ig * W;
            float *entry = tables + ((j - j0) * M + m) * K * W;
            int64_t c = 0;
            for (; c + WORDS <= K; c += WORDS) build_words(V, WORDS, ig, cb + (m * K + c) * ig, xr, entry + c * W);
            for (; c < K; c++) build_words(V, 1, ig, cb + (m * K + c) * ig, xr, entry + c * W);
        }
}

/* Adds one entry (V ymm) of `table` at `code` to the row's sums. */
#define ADD_ENTRY(sum, table, code)                                                                \
    do {                                                                                           \
        const float *entry_ = (table) + (size_t)(code) * (8 * V);                           \
        for (int v = 0; v < V; v++) (sum)[v] = _mm256_add_ps((sum)[v], _mm256_loadu_ps(entry_ + 8 * v)); \
    } while (0)

/* `masked`: whether codes need the code mask (K < 256, or K < 16 for nibbles), fixed per copy. */
ALWAYS_INLINE void sweep(const int V, const int masked, const aqlm_block_shape *s, int64_t j0, int64_t j1,
                         int64_t tile0, int64_t tile1, const uint8_t *restrict packed, const float *restrict tables,
                         float *restrict acc) {
    const int64_t M = s->M, K = s->K, W = 8 * V, slots = (j1 - j0) * M;
    const uint32_t mask = masked ? s->code_mask : 0xff;
    const int nibbles = aqlm_lutq_nibbles(s);
    const int64_t code_lines = nibbles ? slots / 2 : slots;
    const int ROWS = ROWS_PER_V / V;
    for (int64_t tile = tile0; tile < tile1; tile++) {
        const uint8_t *codes = aqlm_lutw_codes(s, packed, tile, j0);
        if (tile + AQLM_LUTW_PREFETCH < tile1) { /* tiles lie far apart: no hardware prefetcher follows */
            const uint8_t *ahead = aqlm_lutw_codes(s, packed, tile + AQLM_LUTW_PREFETCH, j0);
            for (int64_t line = 0; line < code_lines; line++) _mm_prefetch((const char *)ahead + line * AQLM_LUTW_TILE, _MM_HINT_T0);
        }
        for (int64_t lane0 = 0; lane0 < AQLM_LUTW_TILE; lane0 += ROWS) {
            float *sums = acc + ((tile - tile0) * AQLM_LUTW_TILE + lane0) * W;
            __m256 r[ROWS_PER_V][2];
            for (int k = 0; k < ROWS; k++)
                for (int v = 0; v < V; v++) r[k][v] = _mm256_loadu_ps(sums + k * W + 8 * v);
            if (nibbles) {
                for (int64_t pair = 0; pair < slots / 2; pair++) {
                    const uint8_t *code = codes + pair * AQLM_LUTW_TILE + lane0;
                    const float *low = tables + 2 * pair * K * W, *high = low + K * W;
                    for (int k = 0; k < ROWS; k++) ADD_ENTRY(r[k], low, masked ? code[k] & mask : code[k] & 15);
                    for (int k = 0; k < ROWS; k++) ADD_ENTRY(r[k], high, masked ? (code[k] >> 4) & mask : code[k] >> 4);
                }
            } else {
                for (int64_t slot = 0; slot < slots; slot++) {
                    const uint8_t *code = codes + slot * AQLM_LUTW_TILE + lane0;
                    const float *table = tables + slot * K * W;
                    for (int k = 0; k < ROWS; k++) ADD_ENTRY(r[k], table, masked ? code[k] & mask : code[k]);
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
    const int masked = s->K != (aqlm_lutq_nibbles(s) ? 16 : 256);
    if (W == 16 && masked) sweep(2, 1, s, j0, j1, tile0, tile1, packed, tables, acc);
    else if (W == 16) sweep(2, 0, s, j0, j1, tile0, tile1, packed, tables, acc);
    else if (W == 8 && masked) sweep(1, 1, s, j0, j1, tile0, tile1, packed, tables, acc);
    else if (W == 8) sweep(1, 0, s, j0, j1, tile0, tile1, packed, tables, acc);
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
