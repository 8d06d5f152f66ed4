/*
 * codebook_matmul.c - y = x W^T + b by decoding codes straight from the codebooks.
 *
 * For codebooks too large for per-token lookup tables (2**16 codewords) and few tokens: each
 * code selects a codeword, which is summed over codebooks and dotted with the activation slice.
 * Tokens go in passes of at most AQLM_DECODE_DOT_MAX_TOKENS, so one decoded codeword serves
 * every token of the pass.
 */
#include <stdlib.h>

#include "internal.h"

enum { DECODE_ROW_BLOCK = 16 }; /* output groups per parallel work item */

aqlm_status aqlm_codebook_matmul(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype,
                                 const void *x, const void *codes, aqlm_dtype param_dtype,
                                 const void *codebooks, const void *scales, const void *bias,
                                 void *y, aqlm_simd simd, int num_threads, aqlm_error *err) {
    aqlm_status status = aqlm_check_matmul_args(f, n, x_dtype, x, codes, param_dtype, codebooks,
                                                scales, y, num_threads, err);
    if (status != AQLM_OK || n == 0) return status;
    const aqlm_block_shape s = aqlm_block_shape_of(f);
    const aqlm_kernels *kernels = aqlm_kernels_for(simd);
    const int64_t in = f->in_features, out = f->out_features, og = s.og;
    const int64_t out_groups = out / og;
    const int64_t pass_tokens = n < AQLM_DECODE_DOT_MAX_TOKENS ? n : AQLM_DECODE_DOT_MAX_TOKENS;

    const size_t x_bytes = x_dtype == AQLM_F32 ? 0 : (size_t)n * (size_t)in * sizeof(float);
    const size_t acc_bytes = (size_t)out * (size_t)pass_tokens * sizeof(float);
    float *x32 = x_bytes ? malloc(x_bytes) : (float *)x;
    float *acc = malloc(acc_bytes);
    if (x32 == NULL || acc == NULL) {
        if (x_bytes) free(x32);
        free(acc);
        return aqlm_nomem(err, x_bytes + acc_bytes);
    }
    if (x_bytes)
        for (int64_t index = 0; index < n * in; index++) x32[index] = aqlm_load(x_dtype, x, index);

    const int64_t blocks = (out_groups + DECODE_ROW_BLOCK - 1) / DECODE_ROW_BLOCK;
    const int threads = aqlm_threads_for(num_threads, (double)n * out * in * s.M / 8);
#pragma omp parallel num_threads(threads)
    for (int64_t t0 = 0; t0 < n; t0 += pass_tokens) {
        const int64_t tokens = n - t0 < pass_tokens ? n - t0 : pass_tokens;
#pragma omp for schedule(static)
        for (int64_t block = 0; block < blocks; block++) {
            const int64_t o0 = block * DECODE_ROW_BLOCK;
            const int64_t o1 = o0 + DECODE_ROW_BLOCK < out_groups ? o0 + DECODE_ROW_BLOCK : out_groups;
            float *block_acc = acc + o0 * og * tokens;
            kernels->decode_dot(&s, o0, o1, tokens, x32 + t0 * in, codes, param_dtype, codebooks, block_acc);
            for (int64_t o = o0; o < o1; o++) {
                const float scale = aqlm_load(param_dtype, scales, o);
                for (int64_t r = 0; r < og; r++) {
                    const int64_t column = o * og + r;
                    const float shift = bias ? aqlm_load(param_dtype, bias, column) : 0.0f;
                    for (int64_t t = 0; t < tokens; t++) {
                        const float value = block_acc[((o - o0) * og + r) * tokens + t] * scale + shift;
                        aqlm_store(x_dtype, y, (t0 + t) * out + column, value);
                    }
                }
            }
        }
    }
    if (x_bytes) free(x32);
    free(acc);
    return AQLM_OK;
}
