/*
 * int8_matmul.c - y = x W^T + b for a weight stored as int8 rows with one fp32 scale per row
 * (aqlm.h), and the quantizer that makes such rows. Checks arguments, rounds each pass of tokens
 * to int16 (one buffer per call), splits the rows over threads and calls the kernels of int8.h.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "int8.h"

enum {
    INT8_PASS_X_BYTES = 1 << 18,  /* tokens per pass: their rounded activations stay in L2 */
    INT8_MIN_PASS_TOKENS = 8,
};

/* xq and steps of `tokens` tokens of x (x_dtype; int8.h): step = max |x| / X_LEVELS and xq = x / step
 * rounded to nearest even. A token with a NaN or infinity gets step NaN (all its outputs NaN)
 * and one that is all zeros step 0, both with xq = 0. Shared with decodeq_matmul.c. */
void aqlm_round_activations(int64_t tokens, int64_t in, aqlm_dtype x_dtype, const void *x, int16_t *restrict xq,
                            float *restrict steps) {
    for (int64_t t = 0; t < tokens; t++) {
        int16_t *rounded = xq + t * in;
        float largest = 0.0f;
        int finite = 1;
        for (int64_t i = 0; i < in; i++) {
            const float value = aqlm_load(x_dtype, x, t * in + i);
            finite &= isfinite(value) != 0;
            largest = fmaxf(largest, fabsf(value));
        }
        if (!finite || largest == 0.0f) {
            steps[t] = finite ? 0.0f : NAN;
            memset(rounded, 0, (size_t)in * sizeof(int16_t));
            continue;
        }
        const float levels = (float)AQLM_INT8_X_LEVELS, inverse = levels / largest;
        steps[t] = largest / levels;
        for (int64_t i = 0; i < in; i++)
            rounded[i] = (int16_t)fminf(fmaxf(rintf(aqlm_load(x_dtype, x, t * in + i) * inverse), -levels), levels);
    }
}

static aqlm_status check_sizes(int64_t n, int64_t in, int64_t out, aqlm_error *err) {
    AQLM_CHECK(err, n >= 0, "number of tokens must be >= 0, got %lld", (long long)n);
    AQLM_CHECK(err, in >= 1 && out >= 1, "in_features and out_features must be >= 1, got in=%lld, out=%lld",
               (long long)in, (long long)out);
    AQLM_CHECK(err, in <= INT64_MAX / out && (n == 0 || (in <= INT64_MAX / n && out <= INT64_MAX / n)),
               "sizes too large: n=%lld, in=%lld, out=%lld overflow an index", (long long)n, (long long)in,
               (long long)out);
    return AQLM_OK;
}

aqlm_status aqlm_int8_matmul(int64_t n, int64_t in, int64_t out, const float *x, const int8_t *w,
                             const float *scales, const float *bias, float *y, aqlm_simd simd,
                             int num_threads, aqlm_error *err) {
    aqlm_status status = check_sizes(n, in, out, err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, w != NULL && scales != NULL, "weight and scales must not be NULL");
    AQLM_CHECK(err, n == 0 || (x != NULL && y != NULL), "x and y must not be NULL");
    AQLM_CHECK(err, simd >= AQLM_SIMD_SCALAR && simd <= AQLM_SIMD_AVX512, "unknown SIMD level %d", (int)simd);
    AQLM_CHECK(err, num_threads >= 1, "num_threads must be >= 1, got %d", num_threads);
    if (n == 0) return AQLM_OK;

    const aqlm_int8_kernels *kernels = aqlm_int8_kernels_for(simd);
    const int64_t fitting = INT8_PASS_X_BYTES / (in * (int64_t)sizeof(int16_t));
    const int64_t most = fitting > INT8_MIN_PASS_TOKENS ? fitting : INT8_MIN_PASS_TOKENS;
    const int64_t pass = n < most ? n : most;
    const size_t xq_bytes = (size_t)(pass * in) * sizeof(int16_t), bytes = xq_bytes + (size_t)pass * sizeof(float);
    int16_t *xq = malloc(bytes);
    if (!xq) return aqlm_nomem(err, bytes);
    float *steps = (float *)((char *)xq + xq_bytes);
    const int threads = aqlm_threads_for(num_threads, (double)n * (double)out * (double)in);
    for (int64_t t0 = 0; t0 < n; t0 += pass) {
        const int64_t tokens = n - t0 < pass ? n - t0 : pass;
        aqlm_round_activations(tokens, in, AQLM_F32, x + t0 * in, xq, steps);
        /* One contiguous range of rows per thread: a thread streams its part of the weight front
         * to back, prefetching ahead across the whole range. */
#pragma omp parallel num_threads(threads)
        {
            const int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
            const int64_t share = out / parts, extra = out % parts;
            const int64_t o0 = part * share + (part < extra ? part : extra);
            const int64_t o1 = o0 + share + (part < extra);
            if (o0 < o1) kernels->rows(o0, o1, tokens, in, out, xq, steps, w, scales, bias, y + t0 * out);
        }
    }
    free(xq);
    return AQLM_OK;
}

aqlm_status aqlm_int8_quantize_rows(int64_t out, int64_t in, const float *w, int8_t *q, float *scales,
                                    int num_threads, aqlm_error *err) {
    aqlm_status status = check_sizes(0, in, out, err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, w != NULL && q != NULL && scales != NULL, "weight, q and scales must not be NULL");
    AQLM_CHECK(err, num_threads >= 1, "num_threads must be >= 1, got %d", num_threads);
    const int64_t bad = aqlm_find_nonfinite(w, out * in);
    if (bad >= 0) {
        aqlm_set_error(err, "weight has a non-finite value at row %lld, column %lld", (long long)(bad / in),
                       (long long)(bad % in));
        return AQLM_ERR_NUMERIC;
    }
    const int threads = aqlm_threads_for(num_threads, (double)out * (double)in);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const float *row = w + o * in;
        float amax = 0.0f;
        for (int64_t i = 0; i < in; i++) amax = fmaxf(amax, fabsf(row[i]));
        const float scale = amax / 127.0f;
        scales[o] = scale;
        for (int64_t i = 0; i < in; i++) {
            const float level = scale > 0.0f ? rintf(row[i] / scale) : 0.0f;
            q[o * in + i] = (int8_t)fminf(fmaxf(level, -127.0f), 127.0f);
        }
    }
    return AQLM_OK;
}
