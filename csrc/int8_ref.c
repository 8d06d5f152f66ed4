/*
 * int8_ref.c - the scalar int8 matrix-vector kernel (definition in int8.h): one exact int64 dot
 * product per row and token.
 */
#include "int8.h"

void aqlm_int8_rows_ref(int64_t o0, int64_t o1, int64_t n, int64_t in, int64_t out,
                        const int16_t *restrict xq, const float *restrict steps, const int8_t *restrict q,
                        const float *restrict scales, const float *restrict bias, float *restrict y) {
    for (int64_t o = o0; o < o1; o++) {
        const int8_t *row = q + o * in;
        for (int64_t t = 0; t < n; t++) {
            const int16_t *token = xq + t * in;
            int64_t dot = 0;
            for (int64_t i = 0; i < in; i++) dot += (int32_t)token[i] * (int32_t)row[i];
            y[t * out + o] = aqlm_int8_output(dot, steps[t], scales[o], bias, o);
        }
    }
}

const aqlm_int8_kernels aqlm_int8_kernels_scalar = {.level = AQLM_SIMD_SCALAR, .rows = aqlm_int8_rows_ref};
