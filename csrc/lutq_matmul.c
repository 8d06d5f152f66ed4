/*
 * lutq_matmul.c - y = x W^T + b for few tokens by quantized lookup tables (see lutq.h).
 *
 * The exact fp32 gather of lut_matmul.c does one table load per code and stalls on the load
 * ports. Here each table is two int8 tables (the high and low bytes of 15-bit entries) with one
 * fp32 step per chunk of input groups and codebook, small enough to sit in vector registers: one
 * in-register permute looks up 64 (AVX-512 VBMI) or 32 (AVX2) output rows at once, summed exactly
 * in int16 and scaled to fp32 once per chunk.
 * Codes must first be repacked (aqlm_lutq_pack_codes) so the rows of a tile lie side by side.
 *
 * Per pass of up to 8 tokens: build every table (parallel over token and chunk), then the
 * lookups (parallel over tiles of 64 rows) one slab of chunks at a time, summing into each
 * tile's accumulators, then the outputs of each thread's own rows.
 */
#include <omp.h>
#include <stdlib.h>

#include "lutq.h"

static void *aligned_buffer(size_t bytes) {
    const size_t rounded = (bytes + 63) / 64 * 64;
    return aligned_alloc(64, rounded ? rounded : 64);
}

static aqlm_status check_lutq_format(const aqlm_format *f, aqlm_error *err) {
    aqlm_status status = aqlm_format_check(f, err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, f->nbits <= 8,
               "quantized lookup tables need codebooks of at most 256 codewords (nbits_per_codebook <= 8), "
               "got nbits_per_codebook=%d", f->nbits);
    AQLM_CHECK(err, f->out_group_size == 1, "quantized lookup tables need out_group_size=1, got %lld",
               (long long)f->out_group_size);
    return AQLM_OK;
}

size_t aqlm_lutq_packed_size(const aqlm_format *f) {
    const aqlm_block_shape s = aqlm_block_shape_of(f);
    const int64_t tiles = (f->out_features + AQLM_LUTQ_TILE - 1) / AQLM_LUTQ_TILE;
    const int64_t slots = s.in_groups * s.M;
    return (size_t)(tiles * (aqlm_lutq_nibbles(&s) ? slots / 2 : slots) * AQLM_LUTQ_TILE);
}

aqlm_status aqlm_lutq_pack_codes(const aqlm_format *f, const void *codes, uint8_t *packed, aqlm_error *err) {
    aqlm_status status = check_lutq_format(f, err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, codes != NULL && packed != NULL, "codes and packed must not be NULL");
    const aqlm_block_shape s = aqlm_block_shape_of(f);
    const int64_t out = f->out_features, slots = s.in_groups * s.M;
    const uint8_t mask = (uint8_t)s.code_mask;
    const int nibbles = aqlm_lutq_nibbles(&s);
    const int64_t tiles = (out + AQLM_LUTQ_TILE - 1) / AQLM_LUTQ_TILE;
    memset(packed, 0, aqlm_lutq_packed_size(f));
    for (int64_t tile = 0; tile < tiles; tile++)
        for (int64_t slot = 0; slot < slots; slot++)
            for (int64_t lane = 0; lane < AQLM_LUTQ_TILE; lane++) {
                const int64_t row = tile * AQLM_LUTQ_TILE + lane;
                if (row >= out) continue;
                const uint8_t code = ((const uint8_t *)codes)[row * slots + slot] & mask;
                if (nibbles) packed[((tile * slots + slot) / 2) * AQLM_LUTQ_TILE + lane] |= (uint8_t)(code << (4 * (slot % 2)));
                else packed[(tile * slots + slot) * AQLM_LUTQ_TILE + lane] = code;
            }
    return AQLM_OK;
}

aqlm_status aqlm_lutq_transpose_codebooks(const aqlm_format *f, aqlm_dtype param_dtype, const void *codebooks,
                                          float *codebooks_t, aqlm_error *err) {
    aqlm_status status = check_lutq_format(f, err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, codebooks != NULL && codebooks_t != NULL, "codebooks and codebooks_t must not be NULL");
    const aqlm_block_shape s = aqlm_block_shape_of(f);
    for (int64_t m = 0; m < s.M; m++)
        for (int64_t c = 0; c < s.K; c++)
            for (int64_t i = 0; i < s.ig; i++)
                codebooks_t[(m * s.ig + i) * s.K + c] = aqlm_load(param_dtype, codebooks, (m * s.K + c) * s.ig + i);
    return AQLM_OK;
}

aqlm_status aqlm_lutq_matmul(const aqlm_format *f, int64_t group, int64_t n, aqlm_dtype x_dtype,
                             const void *x, const uint8_t *packed, aqlm_dtype param_dtype,
                             const void *codebooks, const float *codebooks_t, const void *scales, const void *bias,
                             void *y, aqlm_simd simd, int num_threads, aqlm_error *err) {
    aqlm_status status = check_lutq_format(f, err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, group >= 1 && group <= AQLM_LUTQ_MAX_GROUP,
               "input groups per table scale must be in [1, %d], got %lld", AQLM_LUTQ_MAX_GROUP, (long long)group);
    AQLM_CHECK(err, n >= 0, "number of tokens must be >= 0, got %lld", (long long)n);
    AQLM_CHECK(err, packed != NULL && codebooks != NULL && scales != NULL, "packed codes, codebooks and scales must not be NULL");
    AQLM_CHECK(err, n == 0 || (x != NULL && y != NULL), "x and y must not be NULL");
    AQLM_CHECK(err, num_threads >= 1, "num_threads must be >= 1, got %d", num_threads);
    if (n == 0) return AQLM_OK;

    const aqlm_block_shape s = aqlm_block_shape_of(f);
    const aqlm_lutq_kernels *kernels = aqlm_lutq_kernels_for(simd);
    const int64_t in = f->in_features, out = f->out_features, ig = s.ig, M = s.M, K = s.K, G = s.in_groups;
    const int64_t KS = aqlm_lutq_table_stride(K), chunks = (G + group - 1) / group;
    const int64_t tiles = (out + AQLM_LUTQ_TILE - 1) / AQLM_LUTQ_TILE;
    const int64_t blocks = (tiles + AQLM_LUTQ_TILE_BLOCK - 1) / AQLM_LUTQ_TILE_BLOCK;
    const int64_t tile_bytes = (aqlm_lutq_nibbles(&s) ? G * M / 2 : G * M) * AQLM_LUTQ_TILE;
    const int64_t T = n < AQLM_LUTQ_MAX_TOKENS ? n : AQLM_LUTQ_MAX_TOKENS;
    /* Lookups are ~8 per vector operation (two tables), table entries ~8 per FMA. */
    const double work = (double)T * ((double)out * G * M / 8 + (double)G * M * K * ig / 8);
    const int threads = aqlm_threads_for(num_threads, work);

    const size_t cbt_bytes = codebooks_t ? 0 : (size_t)(M * ig * K) * sizeof(float);
    const size_t x_bytes = (size_t)(T * in) * sizeof(float);
    const size_t work_bytes = (size_t)threads * (size_t)(group * M * K) * sizeof(float);
    const size_t qtab_bytes = (size_t)(T * G * M * KS) + AQLM_LUTQ_PAD; /* each of qhi, qlo */
    const size_t qscale_bytes = (size_t)(T * chunks * M) * sizeof(float);
    const size_t acc_bytes = (size_t)(blocks * AQLM_LUTQ_TILE_BLOCK * T * AQLM_LUTQ_TILE) * sizeof(float);
    /* Chunks whose tables (high and low, all tokens of a pass) fill a slab: the lookups sweep
     * one slab over all tiles before the next, so the tables they read stay in cache. */
    const int64_t chunk_bytes = 2 * T * group * M * KS;
    const int64_t slab = AQLM_LUTQ_SLAB_BYTES / chunk_bytes > 1 ? AQLM_LUTQ_SLAB_BYTES / chunk_bytes : 1;
    float *cbt_own = aligned_buffer(cbt_bytes), *x32 = aligned_buffer(x_bytes), *work_all = aligned_buffer(work_bytes);
    int8_t *qhi = aligned_buffer(qtab_bytes), *qlo = aligned_buffer(qtab_bytes);
    float *qscale = aligned_buffer(qscale_bytes), *acc_all = aligned_buffer(acc_bytes);
    if (!cbt_own || !x32 || !work_all || !qhi || !qlo || !qscale || !acc_all) {
        free(cbt_own), free(x32), free(work_all), free(qhi), free(qlo), free(qscale), free(acc_all);
        return aqlm_nomem(err, cbt_bytes + x_bytes + work_bytes + 2 * qtab_bytes + qscale_bytes + acc_bytes);
    }
    if (!codebooks_t) aqlm_lutq_transpose_codebooks(f, param_dtype, codebooks, cbt_own, err); /* f checked above */
    const float *cbt = codebooks_t ? codebooks_t : cbt_own;
    memset(qhi + T * G * M * KS, 0, AQLM_LUTQ_PAD);
    memset(qlo + T * G * M * KS, 0, AQLM_LUTQ_PAD);

    for (int64_t t0 = 0; t0 < n; t0 += T) {
        const int64_t tokens = n - t0 < T ? n - t0 : T;
        for (int64_t index = 0; index < tokens * in; index++) x32[index] = aqlm_load(x_dtype, x, t0 * in + index);
#pragma omp parallel num_threads(threads)
        {
            float *work = work_all + (size_t)omp_get_thread_num() * (size_t)(group * M * K);
#pragma omp for schedule(static)
            for (int64_t item = 0; item < tokens * chunks; item++) {
                const int64_t t = item / chunks, b = item % chunks;
                const int64_t j0 = b * group, j1 = j0 + group < G ? j0 + group : G;
                kernels->build(&s, j0, j1, x32 + t * in, cbt, work, qhi + (t * G + j0) * M * KS,
                               qlo + (t * G + j0) * M * KS, qscale + (t * chunks + b) * M);
            }
            for (int64_t b0 = 0; b0 < chunks; b0 += slab) {
                const int64_t b1 = b0 + slab < chunks ? b0 + slab : chunks;
#pragma omp for schedule(static)
                for (int64_t block = 0; block < blocks; block++) {
                    const int64_t tile0 = block * AQLM_LUTQ_TILE_BLOCK;
                    const int64_t count = tiles - tile0 < AQLM_LUTQ_TILE_BLOCK ? tiles - tile0 : AQLM_LUTQ_TILE_BLOCK;
                    float *acc = acc_all + block * AQLM_LUTQ_TILE_BLOCK * tokens * AQLM_LUTQ_TILE;
                    if (b0 == 0) memset(acc, 0, (size_t)(count * tokens * AQLM_LUTQ_TILE) * sizeof(float));
                    kernels->accumulate(&s, group, b0, b1, count, packed + tile0 * tile_bytes, tokens, qhi, qlo, qscale, acc);
                }
            }
#pragma omp for schedule(static)
            for (int64_t block = 0; block < blocks; block++) {
                const int64_t tile0 = block * AQLM_LUTQ_TILE_BLOCK;
                const int64_t count = tiles - tile0 < AQLM_LUTQ_TILE_BLOCK ? tiles - tile0 : AQLM_LUTQ_TILE_BLOCK;
                const float *acc = acc_all + block * AQLM_LUTQ_TILE_BLOCK * tokens * AQLM_LUTQ_TILE;
                const int64_t row0 = tile0 * AQLM_LUTQ_TILE;
                const int64_t row1 = row0 + count * AQLM_LUTQ_TILE < out ? row0 + count * AQLM_LUTQ_TILE : out;
                for (int64_t row = row0; row < row1; row++) {
                    const int64_t tile = (row - row0) / AQLM_LUTQ_TILE, lane = (row - row0) % AQLM_LUTQ_TILE;
                    const float scale = aqlm_load(param_dtype, scales, row);
                    const float shift = bias ? aqlm_load(param_dtype, bias, row) : 0.0f;
                    for (int64_t t = 0; t < tokens; t++)
                        aqlm_store(x_dtype, y, (t0 + t) * out + row, acc[(tile * tokens + t) * AQLM_LUTQ_TILE + lane] * scale + shift);
                }
            }
        }
    }
    free(cbt_own), free(x32), free(work_all), free(qhi), free(qlo), free(qscale), free(acc_all);
    return AQLM_OK;
}
