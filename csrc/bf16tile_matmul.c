/*
 * bf16tile_matmul.c - y = x W^T + b in bfloat16 tiles (bf16tile.h): AMX from a few tokens on,
 * without dequantizing the weight.
 *
 * Per call: the codebooks are converted to bfloat16 once (unless they are bfloat16 or come
 * prepared so) and the tokens packed into the tile layout, the threads sharing the work; then the
 * threads split the output rows in groups of R x 16 rows, and each group's sums are scaled, biased
 * and stored in y.
 */
#include <omp.h>
#include <stdlib.h>

#include "bf16tile.h"
#include "lutq.h" /* aqlm_carve */

size_t aqlm_bf16_prepared_size(const aqlm_format *f) {
    return (size_t)f->num_codebooks * ((size_t)1 << f->nbits) * (size_t)f->out_group_size *
           (size_t)f->in_group_size;
}

aqlm_status aqlm_bf16_prepare(const aqlm_format *f, aqlm_dtype param_dtype, const void *codebooks,
                              uint16_t *prepared, aqlm_error *err) {
    aqlm_status status = aqlm_format_check(f, err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, codebooks != NULL && prepared != NULL, "codebooks and prepared must not be NULL");
    const int64_t count = (int64_t)aqlm_bf16_prepared_size(f);
    /* the scalar rounding, which every level's conversion matches (tests/test_bf16tile.py) */
    for (int64_t i = 0; i < count; i++) prepared[i] = aqlm_f32_to_bf16(aqlm_load(param_dtype, codebooks, i));
    return AQLM_OK;
}

aqlm_status aqlm_bf16_matmul(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype, const void *x, const void *codes,
                             aqlm_dtype param_dtype, const void *codebooks, const void *scales, const void *bias,
                             void *y, aqlm_simd simd, int num_threads, aqlm_error *err) {
    return aqlm_bf16_matmul_prepared(f, n, x_dtype, x, codes, param_dtype, codebooks, NULL, scales, bias, y, simd,
                                     num_threads, err);
}

aqlm_status aqlm_bf16_matmul_prepared(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype, const void *x,
                                      const void *codes, aqlm_dtype param_dtype, const void *codebooks,
                                      const uint16_t *prepared, const void *scales, const void *bias, void *y,
                                      aqlm_simd simd, int num_threads, aqlm_error *err) {
    aqlm_status status = aqlm_check_matmul_args(f, n, x_dtype, x, codes, param_dtype, codebooks, scales, y,
                                                num_threads, err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, f->out_group_size == 1, "bfloat16 tiles need out_group_size 1, got %lld",
               (long long)f->out_group_size);
    AQLM_CHECK(err, AQLM_BF16_CHUNK % f->in_group_size == 0 && f->in_group_size % 2 == 0,
               "bfloat16 tiles need an even in_group_size that divides %d, got %lld", AQLM_BF16_CHUNK,
               (long long)f->in_group_size);
    AQLM_CHECK(err, f->in_features % AQLM_BF16_CHUNK == 0, "bfloat16 tiles need in_features divisible by %d, got %lld",
               AQLM_BF16_CHUNK, (long long)f->in_features);
    if (n == 0) return AQLM_OK;
    const aqlm_block_shape s = aqlm_block_shape_of(f);
    const aqlm_bf16_kernels *kernels = aqlm_bf16_kernels_for(simd);
    const int64_t in = f->in_features, out = f->out_features, chunks = in / AQLM_BF16_CHUNK;
    const int64_t cb_values = s.M * s.K * s.ig;
    /* Up to 6 token blocks: one pass, 6 / T row tiles per group; more: passes of
     * AQLM_BF16_PASS_BLOCKS blocks, AQLM_BF16_SPILL_ROW_TILES row tiles per group. */
    const int64_t needed = (n + AQLM_BF16_TOKENS - 1) / AQLM_BF16_TOKENS;
    const int T = needed <= AQLM_BF16_ACC_TILES ? (int)needed : AQLM_BF16_PASS_BLOCKS;
    const int R = needed <= AQLM_BF16_ACC_TILES ? AQLM_BF16_ACC_TILES / T : AQLM_BF16_SPILL_ROW_TILES;
    const int64_t blocks = (needed + T - 1) / T * T;
    const int64_t group_rows = (int64_t)R * AQLM_BF16_ROWS, groups = (out + group_rows - 1) / group_rows;
    /* one product per weight, codebook and token */
    const int P = aqlm_threads_for(num_threads, (double)n * out * in * s.M);

    /* bfloat16 codebooks are read in place, as are prepared ones; others are converted once per call */
    const int convert = param_dtype != AQLM_BF16 && prepared == NULL;
    size_t bytes = 0;
    const size_t at_cb = aqlm_carve(&bytes, convert ? (size_t)cb_values * sizeof(uint16_t) : 0);
    const size_t at_xb = aqlm_carve(&bytes, (size_t)(chunks * blocks * AQLM_BF16_TILE_ELEMENTS) * sizeof(uint16_t));
    const size_t strip_bytes = (size_t)aqlm_bf16_strip_tiles(R, s.M, blocks / T) * AQLM_BF16_TILE_ELEMENTS * sizeof(uint16_t);
    const size_t per_thread = strip_bytes + (size_t)(R * blocks * AQLM_BF16_ROWS * AQLM_BF16_TOKENS) * sizeof(float);
    const size_t at_scratch = aqlm_carve(&bytes, (size_t)P * per_thread);
    char *base = aligned_alloc(64, bytes);
    if (!base) return aqlm_nomem(err, bytes);
    uint16_t *converted = (uint16_t *)(base + at_cb), *xb = (uint16_t *)(base + at_xb);
    const uint16_t *cb = convert ? converted : prepared != NULL ? prepared : (const uint16_t *)codebooks;

#pragma omp parallel num_threads(P)
    {
        /* The team may be smaller than asked: each member then plays several of the P parts. */
        const int member = omp_get_thread_num(), team = omp_get_num_threads();
        const int64_t v0 = cb_values * member / team, v1 = cb_values * (member + 1) / team;
        if (convert)
            kernels->convert(param_dtype, (const char *)codebooks + v0 * (int64_t)aqlm_dtype_size(param_dtype),
                             v1 - v0, converted + v0);
        kernels->pack(x_dtype, x, in, n, blocks, chunks * member / team, chunks * (member + 1) / team, xb);
#pragma omp barrier
        for (int p = member; p < P; p += team) {
            char *scratch = base + at_scratch + (size_t)p * per_thread;
            uint16_t *strip = (uint16_t *)scratch;
            float *acc = (float *)(scratch + strip_bytes);
            for (int64_t q = groups * p / P; q < groups * (p + 1) / P; q++) {
                const int64_t row0 = q * group_rows;
                kernels->rows(&s, row0, out, R, T, blocks, codes, cb, xb, strip, acc);
                const int64_t count = out - row0 < group_rows ? out - row0 : group_rows;
                float scale[AQLM_BF16_SPILL_ROW_TILES * AQLM_BF16_ROWS], shift[AQLM_BF16_SPILL_ROW_TILES * AQLM_BF16_ROWS];
                for (int64_t i = 0; i < count; i++) {
                    scale[i] = aqlm_load(param_dtype, scales, row0 + i);
                    shift[i] = bias ? aqlm_load(param_dtype, bias, row0 + i) : 0.0f;
                }
                /* token by token, so each token's rows of y are written side by side */
                for (int64_t t = 0; t < n; t++) {
                    const int64_t b = t / AQLM_BF16_TOKENS;
                    const float *sums = acc + ((b / T) * R * T + b % T) * AQLM_BF16_ROWS * AQLM_BF16_TOKENS + t % AQLM_BF16_TOKENS;
                    for (int64_t i = 0; i < count; i++) {
                        const float sum = sums[(i / AQLM_BF16_ROWS) * T * AQLM_BF16_ROWS * AQLM_BF16_TOKENS +
                                               (i % AQLM_BF16_ROWS) * AQLM_BF16_TOKENS];
                        aqlm_store(x_dtype, y, t * out + row0 + i, sum * scale[i] + shift[i]);
                    }
                }
            }
        }
    }
    free(base);
    return AQLM_OK;
}
