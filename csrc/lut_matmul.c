/*
 * lut_matmul.c - y = x W^T + b for codebooks of at most 256 codewords, by lookup tables.
 *
 * Per block of tokens (1, or 8 side by side), build the table of dot products between each
 * activation slice and every codeword, then sum table entries selected by the codes. Tables are
 * built for a chunk of input groups at a time (bounded memory); the gather-accumulate walks the
 * chunk in cache-sized slabs, each thread keeping the same output rows for every slab so its
 * accumulators stay in cache. Each output sums its entries in input-group order whatever the
 * chunk, slab or thread split, so results do not depend on the thread count.
 */
#include <stdlib.h>

#include "internal.h"

enum {
    LUT_T8_MIN_TOKENS = 4,            /* fewer tokens: one table per token */
    LUT_ROW_BLOCK = 16,               /* output groups per parallel work item */
};
static const size_t LUT_CHUNK_BYTES = (size_t)16 << 20; /* table memory bound */
static const size_t LUT_SLAB_BYTES_T1 = (size_t)32 << 10; /* L1 */
static const size_t LUT_SLAB_BYTES_T8 = (size_t)256 << 10; /* L2 */

static void *aligned_buffer(size_t bytes) {
    const size_t rounded = (bytes + 63) / 64 * 64;
    return aligned_alloc(64, rounded ? rounded : 64);
}

/* Codebooks in fp32, [M, K, og, ig] (for 8-token tables) or transposed to [M, og, ig, K]. Both
 * walk their output in order (the transposed one reads with a stride instead of writing with one). */
static void convert_codebooks(const aqlm_block_shape *s, aqlm_dtype dtype, const void *cb,
                              int transposed, float *out) {
    const int64_t row = s->og * s->ig, count = s->M * s->K * row;
    if (!transposed) {
        for (int64_t at = 0; at < count; at++) out[at] = aqlm_load(dtype, cb, at);
        return;
    }
    for (int64_t m = 0; m < s->M; m++)
        for (int64_t e = 0; e < row; e++)
            for (int64_t c = 0; c < s->K; c++) *out++ = aqlm_load(dtype, cb, (m * s->K + c) * row + e);
}

/* Tokens [t0, t0 + tokens) in fp32: one row for T = 1, transposed to [in, 8] zero-padded for T = 8. */
static void load_tokens(aqlm_dtype dtype, const void *x, int64_t in, int64_t t0, int64_t tokens,
                        int64_t T, float *out) {
    if (T == 1) {
        for (int64_t i = 0; i < in; i++) out[i] = aqlm_load(dtype, x, t0 * in + i);
        return;
    }
    for (int64_t i = 0; i < in; i++)
        for (int64_t t = 0; t < 8; t++) out[i * 8 + t] = t < tokens ? aqlm_load(dtype, x, (t0 + t) * in + i) : 0.0f;
}

/* y[t0 + t, o*og + r] = acc * scale + bias for output groups [o0, o1); resets their accumulators. */
static void write_outputs(const aqlm_block_shape *s, int64_t o0, int64_t o1, int64_t t0, int64_t tokens, int64_t T,
                          int64_t out, aqlm_dtype x_dtype, aqlm_dtype param_dtype, const void *scales,
                          const void *bias, float *acc, void *y) {
    for (int64_t o = o0; o < o1; o++) {
        const float scale = aqlm_load(param_dtype, scales, o);
        for (int64_t r = 0; r < s->og; r++) {
            const int64_t column = o * s->og + r;
            const float shift = bias ? aqlm_load(param_dtype, bias, column) : 0.0f;
            float *sums = acc + column * T;
            for (int64_t t = 0; t < tokens; t++) aqlm_store(x_dtype, y, (t0 + t) * out + column, sums[t] * scale + shift);
            for (int64_t t = 0; t < T; t++) sums[t] = 0.0f;
        }
    }
}

aqlm_status aqlm_lut_matmul(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype, const void *x,
                            const void *codes, aqlm_dtype param_dtype, const void *codebooks,
                            const void *scales, const void *bias, void *y, aqlm_simd simd,
                            int num_threads, aqlm_error *err) {
    aqlm_status status = aqlm_check_matmul_args(f, n, x_dtype, x, codes, param_dtype, codebooks,
                                                scales, y, num_threads, err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, f->nbits <= 8,
               "lookup-table matmul needs codebooks of at most 256 codewords (nbits_per_codebook <= 8), "
               "got nbits_per_codebook=%d", f->nbits);
    if (n == 0) return AQLM_OK;

    const aqlm_block_shape s = aqlm_block_shape_of(f);
    const aqlm_kernels *kernels = aqlm_kernels_for(simd);
    const int64_t in = f->in_features, out = f->out_features, og = s.og, M = s.M, K = s.K;
    const int64_t G = s.in_groups, out_groups = out / og;
    const int64_t T = n >= LUT_T8_MIN_TOKENS ? 8 : 1;
    const int64_t group_floats = M * og * K * T; /* table size of one input group */
    const int64_t chunk_max = (int64_t)(LUT_CHUNK_BYTES / sizeof(float)) / group_floats;
    const int64_t chunk_groups = chunk_max < 1 ? 1 : (chunk_max < G ? chunk_max : G);
    const int64_t slab_max = (int64_t)((T == 1 ? LUT_SLAB_BYTES_T1 : LUT_SLAB_BYTES_T8) / sizeof(float)) / group_floats;
    const int64_t slab_groups = slab_max < 1 ? 1 : (slab_max < chunk_groups ? slab_max : chunk_groups);

    const size_t cb_bytes = (size_t)(M * K * og * s.ig) * sizeof(float);
    const size_t lut_bytes = (size_t)(chunk_groups * group_floats) * sizeof(float);
    const size_t x_bytes = (size_t)(in * T) * sizeof(float);
    const size_t acc_bytes = (size_t)(out * T) * sizeof(float);
    float *cb32 = aligned_buffer(cb_bytes), *lut = aligned_buffer(lut_bytes);
    float *xbuf = aligned_buffer(x_bytes), *acc = aligned_buffer(acc_bytes);
    if (!cb32 || !lut || !xbuf || !acc) {
        free(cb32), free(lut), free(xbuf), free(acc);
        return aqlm_nomem(err, cb_bytes + lut_bytes + x_bytes + acc_bytes);
    }
    convert_codebooks(&s, param_dtype, codebooks, T == 1, cb32);
    memset(acc, 0, acc_bytes);

    const aqlm_lut_accumulate_fn accumulate = T == 1 ? kernels->lut_accumulate_t1 : kernels->lut_accumulate_t8;
    const int64_t row_blocks = (out_groups + LUT_ROW_BLOCK - 1) / LUT_ROW_BLOCK;
    const double work = (double)n * ((double)out_groups * G * M * og + (double)G * M * og * K * s.ig);
    const int threads = aqlm_threads_for(num_threads, work);

    for (int64_t t0 = 0; t0 < n; t0 += T) {
        const int64_t tokens = n - t0 < T ? n - t0 : T;
        load_tokens(x_dtype, x, in, t0, tokens, T, xbuf);
        /* One barrier per chunk of tables: build, then accumulate. Every thread keeps the same
         * rows in every slab (same iteration space, static schedule), so it also writes their
         * outputs after the last slab without waiting for the others. */
#pragma omp parallel num_threads(threads)
        for (int64_t c0 = 0; c0 < G; c0 += chunk_groups) {
            const int64_t c1 = c0 + chunk_groups < G ? c0 + chunk_groups : G;
            if (c0 > 0) {
#pragma omp barrier
            }
#pragma omp for schedule(static)
            for (int64_t j = c0; j < c1; j++) {
                float *table = lut + (j - c0) * group_floats;
                if (T == 1) kernels->lut_build_t1(&s, j, j + 1, xbuf, cb32, table);
                else kernels->lut_build_t8(&s, j, j + 1, xbuf, cb32, table);
            }
            for (int64_t j0 = c0; j0 < c1; j0 += slab_groups) {
                const int64_t j1 = j0 + slab_groups < c1 ? j0 + slab_groups : c1;
                const int last = j1 == G;
#pragma omp for schedule(static) nowait
                for (int64_t block = 0; block < row_blocks; block++) {
                    const int64_t o0 = block * LUT_ROW_BLOCK;
                    const int64_t rows = o0 + LUT_ROW_BLOCK < out_groups ? LUT_ROW_BLOCK : out_groups - o0;
                    accumulate(&s, rows, j0, j1, (const int8_t *)codes + o0 * G * M, lut + (j0 - c0) * group_floats,
                               acc + o0 * og * T);
                    if (last) write_outputs(&s, o0, o0 + rows, t0, tokens, T, out, x_dtype, param_dtype, scales, bias, acc, y);
                }
            }
        }
    }
    free(cb32), free(lut), free(xbuf), free(acc);
    return AQLM_OK;
}
