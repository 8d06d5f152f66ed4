/*
 * bf16tile_matmul.c - y = x W^T + b in bfloat16 tiles (bf16tile.h): AMX for a few to some tens
 * of tokens, without dequantizing the weight.
 *
 * Per call: the codebooks are converted to bfloat16 once (the threads share the work), then per
 * pass of up to 64 tokens the tokens are packed into the tile layout, and the threads split the
 * output rows in panels of R x 16 rows; each panel's sums are scaled, biased and stored in y.
 */
#include <omp.h>
#include <stdlib.h>

#include "bf16tile.h"
#include "lutq.h" /* aqlm_carve */

aqlm_status aqlm_bf16_matmul(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype, const void *x, const void *codes,
                             aqlm_dtype param_dtype, const void *codebooks, const void *scales, const void *bias,
                             void *y, aqlm_simd simd, int num_threads, aqlm_error *err) {
    aqlm_status status = aqlm_check_matmul_args(f, n, x_dtype, x, codes, param_dtype, codebooks, scales, y,
                                                num_threads, err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, f->out_group_size == 1, "bfloat16 tiles need out_group_size 1, got %lld",
               (long long)f->out_group_size);
    AQLM_CHECK(err, AQLM_BF16_CHUNK % f->in_group_size == 0,
               "bfloat16 tiles need an in_group_size that divides %d, got %lld", AQLM_BF16_CHUNK,
               (long long)f->in_group_size);
    AQLM_CHECK(err, f->in_features % AQLM_BF16_CHUNK == 0, "bfloat16 tiles need in_features divisible by %d, got %lld",
               AQLM_BF16_CHUNK, (long long)f->in_features);
    if (n == 0) return AQLM_OK;
    const aqlm_block_shape s = aqlm_block_shape_of(f);
    const aqlm_bf16_kernels *kernels = aqlm_bf16_kernels_for(simd);
    const int64_t in = f->in_features, out = f->out_features, chunks = in / AQLM_BF16_CHUNK;
    const int64_t cb_values = s.M * s.K * s.ig;
    const int64_t pass_tokens = n < AQLM_BF16_MAX_TOKENS ? n : AQLM_BF16_MAX_TOKENS;
    const int max_blocks = (int)((pass_tokens + AQLM_BF16_TOKENS - 1) / AQLM_BF16_TOKENS);
    /* one product per weight, codebook and token */
    int P = aqlm_threads_for(num_threads, (double)n * out * in * s.M);

    size_t bytes = 0;
    /* bfloat16 codebooks are read in place; others are converted once per call */
    const int convert = param_dtype != AQLM_BF16;
    const size_t at_cb = aqlm_carve(&bytes, convert ? (size_t)cb_values * sizeof(uint16_t) : 0);
    const size_t at_xb = aqlm_carve(&bytes, (size_t)(chunks * max_blocks * AQLM_BF16_TILE_ELEMENTS) * sizeof(uint16_t));
    const size_t per_thread = (size_t)AQLM_BF16_PANELS * AQLM_BF16_TILE_ELEMENTS * sizeof(uint16_t) +
                              (size_t)AQLM_BF16_ACC_TILES * AQLM_BF16_ROWS * AQLM_BF16_TOKENS * sizeof(float);
    const size_t at_scratch = aqlm_carve(&bytes, (size_t)P * per_thread);
    char *base = aligned_alloc(64, bytes);
    if (!base) return aqlm_nomem(err, bytes);
    uint16_t *converted = (uint16_t *)(base + at_cb), *xb = (uint16_t *)(base + at_xb);
    const uint16_t *cb = convert ? converted : (const uint16_t *)codebooks;

#pragma omp parallel num_threads(P)
    {
        /* The team may be smaller than asked: each member then plays several of the P parts. */
        const int member = omp_get_thread_num(), team = omp_get_num_threads();
        const int64_t v0 = cb_values * member / team, v1 = cb_values * (member + 1) / team;
        if (convert)
            kernels->convert(param_dtype, (const char *)codebooks + v0 * (int64_t)aqlm_dtype_size(param_dtype),
                             v1 - v0, converted + v0);
        for (int64_t t0 = 0; t0 < n; t0 += AQLM_BF16_MAX_TOKENS) {
            const int64_t tokens = n - t0 < AQLM_BF16_MAX_TOKENS ? n - t0 : AQLM_BF16_MAX_TOKENS;
            const int T = (int)((tokens + AQLM_BF16_TOKENS - 1) / AQLM_BF16_TOKENS), R = AQLM_BF16_ACC_TILES / T;
            kernels->pack(x_dtype, x, in, t0, tokens, T, chunks * member / team, chunks * (member + 1) / team, xb);
#pragma omp barrier
            const int64_t panel_rows = (int64_t)R * AQLM_BF16_ROWS, panels = (out + panel_rows - 1) / panel_rows;
            for (int p = member; p < P; p += team) {
                char *scratch = base + at_scratch + (size_t)p * per_thread;
                uint16_t *panel = (uint16_t *)scratch;
                float *acc = (float *)(scratch + (size_t)AQLM_BF16_PANELS * AQLM_BF16_TILE_ELEMENTS * sizeof(uint16_t));
                for (int64_t q = panels * p / P; q < panels * (p + 1) / P; q++) {
                    const int64_t row0 = q * panel_rows;
                    kernels->panel(&s, row0, out, R, T, codes, cb, xb, panel, acc);
                    for (int r = 0; r < R; r++)
                        for (int64_t o = 0; o < AQLM_BF16_ROWS; o++) {
                            const int64_t row = row0 + r * AQLM_BF16_ROWS + o;
                            if (row >= out) break;
                            const float scale = aqlm_load(param_dtype, scales, row);
                            const float shift = bias ? aqlm_load(param_dtype, bias, row) : 0.0f;
                            for (int64_t t = 0; t < tokens; t++) {
                                const float sum = acc[((r * T + t / AQLM_BF16_TOKENS) * AQLM_BF16_ROWS + o) *
                                                          AQLM_BF16_TOKENS + t % AQLM_BF16_TOKENS];
                                aqlm_store(x_dtype, y, (t0 + t) * out + row, sum * scale + shift);
                            }
                        }
                }
            }
#pragma omp barrier
        }
    }
    free(base);
    return AQLM_OK;
}
