/*
 * decodeq_ref.c - the scalar int8-codebook decoding kernel (definition in decodeq.h): one exact
 * int64 dot product per row, codebook and token.
 */
#include "decodeq.h"

static void dots_ref(const aqlm_decodeq_shape *s, int rows, int tokens, int64_t m, const int16_t *restrict xq,
                     const aqlm_decodeq_planes *planes, const uint16_t *restrict codes, const int8_t *restrict cq_m,
                     int64_t *restrict dots) {
    const int64_t G = s->G, M = s->M;
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < tokens; t++) {
            const int16_t *token = xq + t * 8 * G;
            int64_t dot = 0;
            for (int64_t j = 0; j < G; j++) {
                const int8_t *word = cq_m + (int64_t)(codes[(r * G + j) * M + m] & s->code_mask) * 8;
                for (int i = 0; i < 8; i++) dot += (int32_t)token[j * 8 + i] * (int32_t)word[i];
            }
            dots[r * tokens + t] = dot;
        }
}

void aqlm_decodeq_rows_ref(const aqlm_decodeq_shape *s, int64_t o0, int64_t o1, int64_t n, int64_t out,
                           const int16_t *restrict xq, const aqlm_decodeq_planes *planes,
                           const float *restrict steps, const uint16_t *restrict codes,
                           const int8_t *restrict cq, aqlm_dtype param_dtype, const void *scales,
                           const void *bias, aqlm_dtype y_dtype, void *y) {
    aqlm_decodeq_rows_blocked(1, dots_ref, s, o0, o1, n, out, xq, planes, steps, codes, cq, param_dtype, scales, bias,
                              y_dtype, y);
}

const aqlm_decodeq_kernels aqlm_decodeq_kernels_scalar = {.level = AQLM_SIMD_SCALAR, .rows = aqlm_decodeq_rows_ref,
                                                          .name = "scalar"};
