/*
 * lutw_matmul.c - y = x W^T + b for a few to some tens of tokens by exact fp32 lookup tables
 * 16 tokens wide (see lutw.h).
 *
 * lut_matmul.c builds per-token tables and gathers one 4-byte entry per code and token: the
 * load ports bound it. Here an entry holds the 16 tokens of a pass side by side, so one 64-byte
 * load per code serves them all, and the codes are read in lutq's packed layout (64 rows of one
 * group and codebook per cache line) rather than one cache line per row and group.
 *
 * Per pass the threads split the tiles of 64 rows. Each builds the tables of a block of groups
 * (sized to stay in L1) in its own buffer and sweeps its rows over them, the rows' sums staying
 * in its accumulators (L2) from block to block; after the last block it scales and stores them.
 * The tables are thus built once per thread (the price of not synchronising the threads).
 */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "lutw.h"


/* xt[i * W + t] = x[t, i] for the pass's tokens t < tokens and inputs [i0, i1), 0 for t >= tokens. */
static void transpose_tokens(aqlm_dtype x_dtype, const void *x, int64_t in, int64_t t0, int64_t tokens, int64_t W,
                             int64_t i0, int64_t i1, float *restrict xt) {
    for (int64_t i = i0; i < i1; i++)
        for (int64_t t = tokens; t < W; t++) xt[i * W + t] = 0.0f;
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t i = i0; i < i1; i++) xt[i * W + t] = aqlm_load(x_dtype, x, (t0 + t) * in + i);
}

aqlm_status aqlm_lutw_matmul(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype, const void *x,
                             const uint8_t *packed, aqlm_dtype param_dtype, const void *codebooks,
                             const void *scales, const void *bias, void *y, aqlm_simd simd, int num_threads,
                             aqlm_error *err) {
    aqlm_status status = aqlm_check_packed_format(f, "wide lookup tables", err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, n >= 0, "number of tokens must be >= 0, got %lld", (long long)n);
    AQLM_CHECK(err, packed != NULL && codebooks != NULL && scales != NULL, "packed codes, codebooks and scales must not be NULL");
    AQLM_CHECK(err, n == 0 || (x != NULL && y != NULL), "x and y must not be NULL");
    AQLM_CHECK(err, num_threads >= 1, "num_threads must be >= 1, got %d", num_threads);
    if (n == 0) return AQLM_OK;

    /* Codebooks of 16 codewords in nibble packing are looked up a pair at a time (lutw.h). */
    aqlm_block_shape s = aqlm_block_shape_of(f);
    const int paired = aqlm_lutw_paired(&s);
    if (paired) s.M /= 2, s.K = 256, s.code_bits = 8, s.code_mask = 255;
    const aqlm_lutw_kernels *kernels = aqlm_lutw_kernels_for(simd);
    const int64_t in = f->in_features, out = f->out_features, ig = s.ig, M = s.M, K = s.K, G = s.in_groups;
    const int64_t tiles = (out + AQLM_LUTW_TILE - 1) / AQLM_LUTW_TILE, items = M * tiles;
    /* one add per code and token, and ig fmas per table entry and token, for every pass */
    const double work = (double)n * ((double)out * G * M + (double)G * M * K * ig);
    int P = aqlm_threads_for(num_threads, work);
    if (P > items) P = (int)items;
    /* groups per block: one codebook's tables of 16 tokens fit AQLM_LUTW_BLOCK_BYTES (at least one group) */
    const int64_t group_bytes = K * AQLM_LUTW_WIDE * (int64_t)sizeof(float);
    int64_t block = AQLM_LUTW_BLOCK_BYTES / group_bytes;
    block = block < 1 ? 1 : block > G ? G : block;
    const size_t tables_floats = (size_t)(block * K * AQLM_LUTW_WIDE);
    const size_t acc_floats = (size_t)(tiles * AQLM_LUTW_TILE * AQLM_LUTW_WIDE); /* one codebook's sums */

    size_t bytes = 0;
    const size_t at_cb = aqlm_carve(&bytes, (size_t)(M * K * ig) * sizeof(float));
    const size_t at_xt = aqlm_carve(&bytes, (size_t)(in * AQLM_LUTW_WIDE) * sizeof(float));
    const size_t at_tables = aqlm_carve(&bytes, (size_t)P * tables_floats * sizeof(float));
    const size_t at_acc = aqlm_carve(&bytes, (size_t)M * acc_floats * sizeof(float));
    char *base = aligned_alloc(64, bytes);
    if (!base) return aqlm_nomem(err, bytes);
    float *cb = (float *)(base + at_cb), *xt = (float *)(base + at_xt);
    float *tables_all = (float *)(base + at_tables), *acc_all = (float *)(base + at_acc);
    if (paired)
        for (int64_t pair = 0; pair < M; pair++)
            for (int64_t c = 0; c < 256; c++)
                for (int64_t i = 0; i < ig; i++)
                    cb[(pair * 256 + c) * ig + i] = aqlm_load(param_dtype, codebooks, ((2 * pair) * 16 + (c & 15)) * ig + i) +
                                                    aqlm_load(param_dtype, codebooks, ((2 * pair + 1) * 16 + (c >> 4)) * ig + i);
    else
        for (int64_t index = 0; index < M * K * ig; index++) cb[index] = aqlm_load(param_dtype, codebooks, index);

    for (int64_t t0 = 0; t0 < n;) {
        const int64_t W = n - t0 <= AQLM_LUTW_NARROW ? AQLM_LUTW_NARROW : AQLM_LUTW_WIDE;
        const int64_t tokens = n - t0 < W ? n - t0 : W;
#pragma omp parallel num_threads(P)
        {
            /* The team may be smaller than asked (OMP_THREAD_LIMIT, nesting): each member then
             * plays several of the P parts, the same work in the same places. */
            const int member = omp_get_thread_num(), team = omp_get_num_threads();
            transpose_tokens(x_dtype, x, in, t0, tokens, W, in * member / team, in * (member + 1) / team, xt);
#pragma omp barrier
            for (int p = member; p < P; p += team) { /* part p: items [q0, q1) of (codebook, tile) */
                const int64_t q0 = items * p / P, q1 = items * (p + 1) / P;
                float *tables = tables_all + (size_t)p * tables_floats;
                for (int64_t m = q0 / tiles; m * tiles < q1; m++) {
                    const int64_t tile0 = q0 > m * tiles ? q0 - m * tiles : 0;
                    const int64_t tile1 = q1 < (m + 1) * tiles ? q1 - m * tiles : tiles;
                    float *acc = acc_all + (size_t)m * acc_floats + (size_t)(tile0 * AQLM_LUTW_TILE * W);
                    memset(acc, 0, (size_t)((tile1 - tile0) * AQLM_LUTW_TILE * W) * sizeof(float));
                    for (int64_t j0 = 0; j0 < G; j0 += block) {
                        const int64_t j1 = j0 + block < G ? j0 + block : G;
                        kernels->tables(&s, W, m, j0, j1, xt, cb, tables);
                        kernels->sweep(&s, W, m, j0, j1, tile0, tile1, packed, tables, acc);
                    }
                }
            }
#pragma omp barrier
            for (int p = member; p < P; p += team) { /* the codebooks' sums of p's share of the rows */
                const int64_t row0 = out * p / P, row1 = out * (p + 1) / P;
                for (int64_t row = row0; row < row1; row++) {
                    const float scale = aqlm_load(param_dtype, scales, row);
                    const float shift = bias ? aqlm_load(param_dtype, bias, row) : 0.0f;
                    for (int64_t t = 0; t < tokens; t++) {
                        float sum = acc_all[row * W + t];
                        for (int64_t m = 1; m < M; m++) sum += acc_all[(size_t)m * acc_floats + (size_t)(row * W + t)];
                        aqlm_store(x_dtype, y, (t0 + t) * out + row, sum * scale + shift);
                    }
                }
            }
        }
        t0 += tokens;
    }
    free(base);
    return AQLM_OK;
}
