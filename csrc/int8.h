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

/* dots[r * tokens + t] = sum_i x[t * in + i] * (float)q[r * in + i] for r < rows, t < tokens
 * (a SIMD file's block of rows and tokens, at most its own block sizes). */
typedef void (*aqlm_int8_dots_fn)(int rows, int tokens, int64_t in, const float *restrict x,
                                  const int8_t *restrict q, float *restrict dots);

enum { AQLM_INT8_MAX_DOTS = 16 }; /* rows x tokens of the largest block a SIMD file uses */

/* The SIMD files' rows kernel (signature of aqlm_int8_rows_fn): rows [o0, o1) in blocks of
 * block_rows, prefetching ahead, each block's tokens in blocks of block_tokens by `dots`, then
 * scaled and biased into y. Always inlined into each SIMD file, so `dots` is a direct call there. */
static inline __attribute__((always_inline)) void aqlm_int8_rows_blocked(
    int block_rows, int block_tokens, aqlm_int8_dots_fn dots_fn, int64_t o0, int64_t o1, int64_t n, int64_t in,
    int64_t out, const float *restrict x, const int8_t *restrict q, const float *restrict scales,
    const float *restrict bias, float *restrict y) {
    float dots[AQLM_INT8_MAX_DOTS];
    for (int64_t o = o0; o < o1; o += block_rows) {
        const int rows = o1 - o < block_rows ? (int)(o1 - o) : block_rows;
        aqlm_int8_prefetch_ahead(q, in, o, rows, o1);
        for (int64_t t0 = 0; t0 < n; t0 += block_tokens) {
            const int tokens = n - t0 < block_tokens ? (int)(n - t0) : block_tokens;
            dots_fn(rows, tokens, in, x + t0 * in, q + o * in, dots);
            for (int r = 0; r < rows; r++)
                for (int t = 0; t < tokens; t++)
                    y[(t0 + t) * out + o + r] = scales[o + r] * dots[r * tokens + t] + (bias ? bias[o + r] : 0.0f);
        }
    }
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
