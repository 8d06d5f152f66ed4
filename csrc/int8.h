/*
 * int8.h - weight-only int8 matrix-vector kernels (internal; shared by int8_*.c and cpu.c).
 *
 * A weight W [out, in] is stored as int8 rows q [out, in] with one fp32 scale per row
 * (W[o, i] ~ scales[o] * q[o, i]). Every version computes, for rows [o0, o1) and tokens [0, n),
 *     y[t * out + o] = scales[o] * sum_i x[t * in + i] * (float)q[o * in + i] + (bias ? bias[o] : 0)
 * in fp32; the versions differ only in the order of the sum (lanes, blocks, tail), so they agree
 * to within fp32 summation error, not bit for bit. The SIMD versions convert each block of a
 * weight row to fp32 once and use it for a block of tokens, so the weight is read from memory
 * once per call when n is at most the pass the driver gives them.
 */
#ifndef AQLM_INT8_H
#define AQLM_INT8_H

#include "internal.h"

typedef void (*aqlm_int8_rows_fn)(int64_t o0, int64_t o1, int64_t n, int64_t in, int64_t out,
                                  const float *restrict x, const int8_t *restrict q,
                                  const float *restrict scales, const float *restrict bias,
                                  float *restrict y);

typedef struct {
    aqlm_simd level; /* SCALAR for a table built without its instruction set */
    aqlm_int8_rows_fn rows;
} aqlm_int8_kernels;

/* The table for `level`, or for the best level below it that this build has (cpu.c). */
const aqlm_int8_kernels *aqlm_int8_kernels_for(aqlm_simd level);

void aqlm_int8_rows_ref(int64_t o0, int64_t o1, int64_t n, int64_t in, int64_t out,
                        const float *restrict x, const int8_t *restrict q,
                        const float *restrict scales, const float *restrict bias, float *restrict y);

extern const aqlm_int8_kernels aqlm_int8_kernels_scalar;
extern const aqlm_int8_kernels aqlm_int8_kernels_avx2;
extern const aqlm_int8_kernels aqlm_int8_kernels_avx512;

#endif /* AQLM_INT8_H */
