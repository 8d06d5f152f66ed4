/*
 * lutw.h - exact fp32 lookup tables W tokens wide, for 2..64 tokens (internal; shared by
 * lutw_*.c and cpu.c).
 *
 * For a pass of up to W tokens t0 .. t0 + W - 1 (W = 16, or 8 for a last pass of at most 8
 * tokens; tokens past the pass are zeros), input group j, codebook m and codeword c the table
 * entry holds the W tokens side by side:
 *     T[j][m][c][t] = sum_{i < ig} cb[m, c, i] * x[t0 + t, j * ig + i]      (t < W)
 * as fmaf in order i = 0, 1, ..., ig - 1 from 0. One lookup is thus one 64-byte load (W = 16:
 * one zmm or two ymm) that serves every token of the pass. Each output row o sums each codebook
 * over the groups in order, then the codebooks in order:
 *     S[m][o][t] = ((0 + T[0][m][code(o, 0, m)][t]) + T[1][m][code(o, 1, m)][t]) + ...
 *     y[t0 + t, o] = ((S[0][o][t] + S[1][o][t]) + ... + S[M - 1][o][t]) * scale[o] + bias[o]
 * whatever the thread count and SIMD level, so all give the scalar reference's bits. (Codebooks
 * of 16 codewords in nibble packing enter these formulas as pairs: aqlm_lutw_paired below.)
 *
 * The codes are read in lutq's packed layout (lutq.h, aqlm_lutq_pack_codes): tiles of 64 rows,
 * and per tile, input group j and codebook m the 64 rows' codes side by side,
 *     packed[((tile * G + j) * M + m) * 64 + lane] = code(tile * 64 + lane, j, m)
 * or, for K <= 16 and even M, two slots s = j * M + m per byte,
 *     packed[((tile * G * M + s) / 2) * 64 + lane] = code(s) | code(s + 1) << 4,
 * so codebook m's codes for consecutive groups of a tile lie M (or M / 2) lines apart.
 *
 * The threads split the (codebook, tile) pairs, m-major, in contiguous ranges: at 2x8g8 and 2
 * threads each takes one codebook for every row, and so builds only that codebook's tables.
 * For each of its codebooks m, a thread takes blocks of consecutive groups (AQLM_LUTW_BLOCK_BYTES
 * of tables), builds their tables into its own buffer
 *     tables[((j - j0) * K + c) * W + t]
 * and sweeps its tiles' rows over them into S[m] (sums in registers, then in L2 from block to
 * block). After a barrier each thread adds up the codebooks' sums of its share of the rows.
 * Codes are shifted and masked with the code mask before they index a table.
 * History (4096x4096 2x8g8, 16 tokens, 2 threads, AVX-512): splitting rows only, each thread
 * built every codebook's tables (0.7 ms): 2.4-2.6 ms, 576x576 0.151 ms; split by codebook:
 * 1.84-2.2 ms and 0.100 ms. Building the tables once, a share per thread, with a barrier per
 * 512 KiB chunk, was slower (3.2-3.4 ms): every thread then read half the tables from the other
 * core.
 */
#ifndef AQLM_LUTW_H
#define AQLM_LUTW_H

#include "lutq.h"

enum {
    AQLM_LUTW_TILE = AQLM_LUTQ_TILE, /* rows per packed tile */
    AQLM_LUTW_WIDE = 16,             /* tokens per pass */
    AQLM_LUTW_NARROW = 8,            /* tokens per pass when at most 8 remain */
    /* One block's tables (16 tokens), swept together. 48 KiB (L1) reloaded each row's sums every
     * group at 2x8g8 (tables of both codebooks, before the codebook split); at 128 KiB (in L2) the
     * table loads miss L1 more often but the sums come and go 4x less: 4096x4096 2x8g8, 16 tokens, 1 thread AVX-512: 32 KiB 4.13 ms, 48 KiB 3.89,
     * 64 KiB 3.43, 96 KiB 3.25, 128 KiB 3.27, 256 KiB 3.24 (minimum of 13 interleaved runs). */
    AQLM_LUTW_BLOCK_BYTES = 128 << 10,
    AQLM_LUTW_PREFETCH = 2,           /* tiles ahead whose codes the sweep prefetches */
};

/* Tables of codebook m for groups [j0, j1) and a pass of W tokens (lutw.h layout): xt the
 * pass's tokens transposed to [in][W] fp32 (zeros past the pass), cb the codebooks [M, K, ig] fp32. */
typedef void (*aqlm_lutw_tables_fn)(const aqlm_block_shape *s, int64_t W, int64_t m, int64_t j0, int64_t j1,
                                    const float *restrict xt, const float *restrict cb, float *restrict tables);

/* For tiles [tile0, tile1) of packed codes, codebook m and groups [j0, j1) whose tables start at
 * `tables`: acc[((tile - tile0) * 64 + lane) * W + t] += T[j][m][code][t] for j in order. */
typedef void (*aqlm_lutw_sweep_fn)(const aqlm_block_shape *s, int64_t W, int64_t m, int64_t j0, int64_t j1,
                                   int64_t tile0, int64_t tile1, const uint8_t *restrict packed,
                                   const float *restrict tables, float *restrict acc);

typedef struct {
    const char *name; /* "scalar", "avx2", "avx512" */
    aqlm_lutw_tables_fn tables;
    aqlm_lutw_sweep_fn sweep;
} aqlm_lutw_kernels;

/* The fastest table this CPU and build support at or below `level` (cpu.c). */
const aqlm_lutw_kernels *aqlm_lutw_kernels_for(aqlm_simd level);

void aqlm_lutw_tables_ref(const aqlm_block_shape *s, int64_t W, int64_t m, int64_t j0, int64_t j1,
                          const float *restrict xt, const float *restrict cb, float *restrict tables);
void aqlm_lutw_sweep_ref(const aqlm_block_shape *s, int64_t W, int64_t m, int64_t j0, int64_t j1, int64_t tile0,
                         int64_t tile1, const uint8_t *restrict packed, const float *restrict tables,
                         float *restrict acc);
/* The AVX2 versions, which the AVX-512 kernels use for passes of 8 tokens. */
void aqlm_lutw_tables_avx2(const aqlm_block_shape *s, int64_t W, int64_t m, int64_t j0, int64_t j1,
                           const float *restrict xt, const float *restrict cb, float *restrict tables);
void aqlm_lutw_sweep_avx2(const aqlm_block_shape *s, int64_t W, int64_t m, int64_t j0, int64_t j1, int64_t tile0,
                          int64_t tile1, const uint8_t *restrict packed, const float *restrict tables,
                          float *restrict acc);

extern const aqlm_lutw_kernels aqlm_lutw_kernels_scalar;
extern const aqlm_lutw_kernels aqlm_lutw_kernels_avx2;   /* name NULL when built without AVX2 */
extern const aqlm_lutw_kernels aqlm_lutw_kernels_avx512; /* name NULL when built without AVX-512 */

/* Whether the codebooks are looked up a pair at a time: 16 codewords each, two codes per packed
 * byte (lutq.h's nibble mode). Codebooks 2p and 2p + 1 then act as one codebook of 256 "pair
 * codewords", summed once per call in fp32,
 *     pair[p][c0 | c1 << 4][i] = cb[2p][c0][i] + cb[2p + 1][c1][i],
 * whose code is the packed byte itself: the driver runs with M / 2 codebooks of 256 codewords,
 * and everything above holds with those (half the lookups; no shift or mask per byte). */
static inline int aqlm_lutw_paired(const aqlm_block_shape *s) { return s->K == 16 && aqlm_lutq_nibbles(s); }

/* Where the codes of a tile, group j0 and codebook m start, how far apart the next groups' lie
 * (*stride bytes), and the shift that brings the code down to the low bits of its byte. */
static inline const uint8_t *aqlm_lutw_codes(const aqlm_block_shape *s, const uint8_t *packed, int64_t tile, int64_t j0,
                                             int64_t m, int64_t *stride, int *shift) {
    const int64_t M = s->M, slot = tile * s->in_groups * M + j0 * M + m;
    if (aqlm_lutq_nibbles(s)) { /* M even: slot s and s + 1 share a byte, s even low */
        *stride = M / 2 * AQLM_LUTW_TILE, *shift = 4 * (int)(m % 2);
        return packed + slot / 2 * AQLM_LUTW_TILE;
    }
    *stride = M * AQLM_LUTW_TILE, *shift = 0;
    return packed + slot * AQLM_LUTW_TILE;
}

/* Prefetches (into L1) the codes the sweep will read for tile + AQLM_LUTW_PREFETCH, if that tile
 * is still in [.., tile1): tiles lie far apart, so no hardware prefetcher follows them. */
static inline void aqlm_lutw_prefetch_ahead(const aqlm_block_shape *s, const uint8_t *packed, int64_t tile,
                                            int64_t tile1, int64_t j0, int64_t j1, int64_t m) {
    if (tile + AQLM_LUTW_PREFETCH >= tile1) return;
    int64_t stride;
    int shift;
    const uint8_t *ahead = aqlm_lutw_codes(s, packed, tile + AQLM_LUTW_PREFETCH, j0, m, &stride, &shift);
    for (int64_t j = 0; j < j1 - j0; j++) __builtin_prefetch(ahead + j * stride, 0, 3);
}

#endif /* AQLM_LUTW_H */
