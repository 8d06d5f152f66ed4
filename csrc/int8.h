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

enum { AQLM_INT8_PREFETCH_BYTES = 2048 };

/* Asks for the weight bytes AQLM_INT8_PREFETCH_BYTES past rows [o, o + rows) (not past row o1):
 * with the weight coming from DRAM, this keeps enough cache-line reads in flight across page
 * boundaries, where the hardware prefetchers stop (49152x576 at one thread, cold caches:
 * 6.0 -> 4.9 ms median; distances 2-6 KiB measured alike). */
static inline void aqlm_int8_prefetch_ahead(const int8_t *q, int64_t in, int64_t o, int64_t rows, int64_t o1) {
    const int64_t end = o1 * in < (o + rows) * in + AQLM_INT8_PREFETCH_BYTES ? o1 * in : (o + rows) * in + AQLM_INT8_PREFETCH_BYTES;
    for (int64_t at = o * in + AQLM_INT8_PREFETCH_BYTES; at < end; at += 64) __builtin_prefetch(q + at, 0, 3);
}

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
