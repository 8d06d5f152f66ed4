/*
 * decodeq_matmul.c - y = x W^T + b by decoding codes from int8 codebooks (decodeq.h): checks
 * arguments, rounds the codebooks once (aqlm_decodeq_prepare) and each pass of tokens to int16 at
 * each call, splits the rows over threads and calls the kernels of decodeq.h.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "decodeq.h"
#include "int8.h"

/* Whether this format is one decodeq serves (aqlm.h), with a message naming why not. */
static aqlm_status check_decodeq_format(const aqlm_format *f, aqlm_error *err) {
    aqlm_status status = aqlm_format_check(f, err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, f->out_group_size == 1 && f->in_group_size == AQLM_DECODEQ_GROUP && f->code_bits == 16,
               "int8-codebook decoding needs out_group_size 1, in_group_size %d and codebooks of more than 256 "
               "codewords (int16 codes), got out_group_size %lld, in_group_size %lld, nbits %d",
               AQLM_DECODEQ_GROUP, (long long)f->out_group_size, (long long)f->in_group_size, f->nbits);
    return AQLM_OK;
}

size_t aqlm_decodeq_prepared_size(const aqlm_format *f) {
    const int64_t K = (int64_t)1 << f->nbits;
    return (size_t)(aqlm_decodeq_header_bytes(f->num_codebooks) + f->num_codebooks * K * AQLM_DECODEQ_GROUP);
}

aqlm_status aqlm_decodeq_prepare(const aqlm_format *f, aqlm_dtype param_dtype, const void *codebooks,
                                 int8_t *prepared, aqlm_error *err) {
    aqlm_status status = check_decodeq_format(f, err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, codebooks != NULL && prepared != NULL, "codebooks and prepared must not be NULL");
    const int64_t M = f->num_codebooks, entries = ((int64_t)1 << f->nbits) * AQLM_DECODEQ_GROUP;
    float *steps = (float *)prepared;
    int8_t *cq = prepared + aqlm_decodeq_header_bytes(M);
    for (int64_t m = 0; m < M; m++) {
        float largest = 0.0f;
        for (int64_t e = 0; e < entries; e++) {
            const float value = aqlm_load(param_dtype, codebooks, m * entries + e);
            if (!isfinite(value)) {
                aqlm_set_error(err, "codebook %lld has a non-finite value at codeword %lld, input %lld", (long long)m,
                               (long long)(e / AQLM_DECODEQ_GROUP), (long long)(e % AQLM_DECODEQ_GROUP));
                return AQLM_ERR_NUMERIC;
            }
            largest = fmaxf(largest, fabsf(value));
        }
        const float levels = (float)AQLM_DECODEQ_C_LEVELS, inverse = largest > 0.0f ? levels / largest : 0.0f;
        steps[m] = largest / levels;
        for (int64_t e = 0; e < entries; e++) {
            const float level = rintf(aqlm_load(param_dtype, codebooks, m * entries + e) * inverse);
            cq[m * entries + e] = (int8_t)fminf(fmaxf(level, -levels), levels);
        }
    }
    return AQLM_OK;
}

aqlm_status aqlm_decodeq_matmul(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype, const void *x,
                                const void *codes, const int8_t *prepared, aqlm_dtype param_dtype,
                                const void *scales, const void *bias, void *y, aqlm_simd simd, int num_threads,
                                aqlm_error *err) {
    aqlm_status status = check_decodeq_format(f, err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, prepared != NULL, "prepared must not be NULL");
    AQLM_CHECK(err, simd >= AQLM_SIMD_SCALAR && simd <= AQLM_SIMD_AVX512, "unknown SIMD level %d", (int)simd);
    /* The codebooks are read only through `prepared`: any non-NULL pointer passes their check. */
    status = aqlm_check_matmul_args(f, n, x_dtype, x, codes, param_dtype, prepared, scales, y, num_threads, err);
    if (status != AQLM_OK || n == 0) return status;

    const aqlm_decodeq_kernels *kernels = aqlm_decodeq_kernels_for(simd, n);
    const int64_t in = f->in_features, out = f->out_features, M = f->num_codebooks;
    const aqlm_decodeq_shape s = {.G = in / AQLM_DECODEQ_GROUP, .M = M, .K = (int64_t)1 << f->nbits,
                                  .code_mask = (uint32_t)(((int64_t)1 << f->nbits) - 1)};
    const float *codebook_steps = (const float *)prepared;
    const int8_t *cq = prepared + aqlm_decodeq_header_bytes(M);
    const size_t xq_bytes = (size_t)(n * in) * sizeof(int16_t);
    const size_t steps_bytes = (size_t)n * (size_t)(M + 1) * sizeof(float);
    const size_t planes_bytes = kernels->byte_planes ? (size_t)n * sizeof(int64_t) + 2 * (size_t)(n * in) : 0;
    const size_t bytes = xq_bytes + steps_bytes + planes_bytes;
    int16_t *xq = malloc(bytes);
    if (!xq) return aqlm_nomem(err, bytes);
    float *x_steps = (float *)((char *)xq + xq_bytes), *steps = x_steps + n;
    aqlm_round_activations(n, in, x_dtype, x, xq, x_steps);
    aqlm_decodeq_planes planes = {NULL, NULL, NULL};
    if (kernels->byte_planes) { /* xq = 256 hi + lo: hi its signed top byte, lo its unsigned low byte */
        int64_t *hi_sum = (int64_t *)((char *)xq + xq_bytes + steps_bytes);
        uint8_t *lo = (uint8_t *)(hi_sum + n);
        int8_t *hi = (int8_t *)(lo + n * in);
        for (int64_t t = 0; t < n; t++) {
            int64_t sum = 0;
            for (int64_t i = 0; i < in; i++) {
                const int32_t value = xq[t * in + i];
                lo[t * in + i] = (uint8_t)(value & 0xff);
                hi[t * in + i] = (int8_t)((value - (value & 0xff)) / 256);
                sum += hi[t * in + i];
            }
            hi_sum[t] = sum;
        }
        planes = (aqlm_decodeq_planes){lo, hi, hi_sum};
    }
    for (int64_t t = 0; t < n; t++)
        for (int64_t m = 0; m < M; m++) steps[t * M + m] = x_steps[t] * codebook_steps[m];
    const int threads = aqlm_threads_for(num_threads, (double)n * (double)out * (double)in * (double)M / 8);
    /* One contiguous range of rows per thread: a thread streams its part of the codes front to back. */
#pragma omp parallel num_threads(threads)
    {
        const int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
        const int64_t share = out / parts, extra = out % parts;
        const int64_t o0 = part * share + (part < extra ? part : extra);
        const int64_t o1 = o0 + share + (part < extra);
        if (o0 < o1)
            kernels->rows(&s, o0, o1, n, out, xq, kernels->byte_planes ? &planes : NULL, steps, codes, cq,
                          param_dtype, scales, bias, x_dtype, y);
    }
    free(xq);
    return AQLM_OK;
}
