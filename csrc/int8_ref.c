/*
 * int8_ref.c - the scalar int8 matrix-vector kernel (definition in int8.h): one dot product per
 * row and token, summed in order i = 0, 1, ...
 */
#include "int8.h"

void aqlm_int8_rows_ref(int64_t o0, int64_t o1, int64_t n, int64_t in, int64_t out,
                        const float *restrict x, const int8_t *restrict q,
                        const float *restrict scales, const float *restrict bias, float *restrict y) {
    for (int64_t o = o0; o < o1; o++) {
        const int8_t *row = q + o * in;
        for (int64_t t = 0; t < n; t++) {
            const float *token = x + t * in;
            float dot = 0.0f;
            for (int64_t i = 0; i < in; i++) dot += token[i] * (float)row[i];
            y[t * out + o] = scales[o] * dot + (bias ? bias[o] : 0.0f);
        }
    }
}

const aqlm_int8_kernels aqlm_int8_kernels_scalar = {.level = AQLM_SIMD_SCALAR, .rows = aqlm_int8_rows_ref};
