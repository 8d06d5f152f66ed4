/*
 * int8.h - weight-only int8 matrix-vector kernels (internal; shared by int8_*.c and cpu.c).
 *
 * A weight W [out, in] is stored as int8 rows q [out, in] with one fp32 scale per row
 * (W[o, i] ~ scales[o] * q[o, i]). The driver rounds each token's activations to int16 with one
 * fp32 step per token (round_activations in int8_matmul.c):
 *     step[t] = max_i |x[t, i]| / X_LEVELS,  xq[t, i] = x[t, i] / step[t] rounded to nearest even,
 * |xq| <= X_LEVELS = 32767, so |x - step * xq| <= step / 2: 2**-16 of the token's largest value,
 * 256 times finer than the weight's own rounding (scales / 2 = 2**-8 of the row's largest value).
 * Every version computes, for rows [o0, o1) and tokens [0, n), the exact integer
 *     dot[t, o] = sum_i xq[t, i] * q[o, i]                                     (int64)
 * and then, in the same fp32 operations,
 *     y[t * out + o] = scales[o] * (step[t] * (float)dot[t, o]) + (bias ? bias[o] : 0)
 * so every SIMD level gives the scalar reference's bits. The SIMD versions multiply pairs of
 * int16 (vpmaddwd: two products per int32 lane) and add them in int32 lanes for at most CHUNK
 * inputs before widening to int64: a lane then holds at most CHUNK / 8 products (AVX2: 8 lanes
 * take 16 inputs per step) of |xq| <= 32767 and |q| <= 128 (any int8 weight), 512 * 128 * 32767 =
 * 2147418112 < 2**31. They convert each block of a weight row once and use it for a block of
 * tokens, so the weight is read from memory once per call when n is at most a pass.
 * (SmolLM2's 49152 x 576 head, 2 threads, best of 30 back to back: with x in fp32, 3 vector
 * instructions per 16 weights, 0.67-0.70 ms; int16, 0.44-0.61 ms.)
 */
#ifndef AQLM_INT8_H
#define AQLM_INT8_H

#include "internal.h"

enum {
    AQLM_INT8_PREFETCH_BYTES = 2048,
    AQLM_INT8_X_LEVELS = 32767, /* |xq| <= this */
    AQLM_INT8_CHUNK = 4096,     /* inputs summed in int32 lanes before they widen (header) */
};

/* Asks for the weight bytes AQLM_INT8_PREFETCH_BYTES past rows [o, o + rows) (not past row o1):
 * with the weight coming from DRAM, this keeps enough cache-line reads in flight across page
 * boundaries, where the hardware prefetchers stop (49152x576 at one thread, cold caches:
 * 6.0 -> 4.9 ms median; distances 2-6 KiB measured alike). */
static inline void aqlm_int8_prefetch_ahead(const int8_t *q, int64_t in, int64_t o, int64_t rows, int64_t o1) {
    const int64_t end = o1 * in < (o + rows) * in + AQLM_INT8_PREFETCH_BYTES ? o1 * in : (o + rows) * in + AQLM_INT8_PREFETCH_BYTES;
    for (int64_t at = o * in + AQLM_INT8_PREFETCH_BYTES; at < end; at += 64) __builtin_prefetch(q + at, 0, 3);
}

/* dots[r * tokens + t] = sum_i xq[t * in + i] * q[r * in + i] (exact) for r < rows, t < tokens
 * (a SIMD file's block of rows and tokens, at most its own block sizes). */
typedef void (*aqlm_int8_dots_fn)(int rows, int tokens, int64_t in, const int16_t *restrict xq,
                                  const int8_t *restrict q, int64_t *restrict dots);

enum { AQLM_INT8_MAX_DOTS = 16 }; /* rows x tokens of the largest block a SIMD file uses */

/* y[t * out + o] from dot[t, o] (header): the one formula of every version. */
static inline float aqlm_int8_output(int64_t dot, float step, float scale, const float *bias, int64_t o) {
    return scale * (step * (float)dot) + (bias ? bias[o] : 0.0f);
}

/* The SIMD files' rows kernel (signature of aqlm_int8_rows_fn): rows [o0, o1) in blocks of
 * block_rows, prefetching ahead, each block's tokens in blocks of block_tokens by `dots`, then
 * scaled and biased into y. Always inlined into each SIMD file, so `dots` is a direct call there. */
static inline __attribute__((always_inline)) void aqlm_int8_rows_blocked(
    int block_rows, int block_tokens, aqlm_int8_dots_fn dots_fn, int64_t o0, int64_t o1, int64_t n, int64_t in,
    int64_t out, const int16_t *restrict xq, const float *restrict steps, const int8_t *restrict q,
    const float *restrict scales, const float *restrict bias, float *restrict y) {
    int64_t dots[AQLM_INT8_MAX_DOTS];
    for (int64_t o = o0; o < o1; o += block_rows) {
        const int rows = o1 - o < block_rows ? (int)(o1 - o) : block_rows;
        aqlm_int8_prefetch_ahead(q, in, o, rows, o1);
        for (int64_t t0 = 0; t0 < n; t0 += block_tokens) {
            const int tokens = n - t0 < block_tokens ? (int)(n - t0) : block_tokens;
            dots_fn(rows, tokens, in, xq + t0 * in, q + o * in, dots);
            for (int r = 0; r < rows; r++)
                for (int t = 0; t < tokens; t++)
                    y[(t0 + t) * out + o + r] = aqlm_int8_output(dots[r * tokens + t], steps[t0 + t], scales[o + r], bias, o + r);
        }
    }
}

typedef void (*aqlm_int8_rows_fn)(int64_t o0, int64_t o1, int64_t n, int64_t in, int64_t out,
                                  const int16_t *restrict xq, const float *restrict steps,
                                  const int8_t *restrict q, const float *restrict scales,
                                  const float *restrict bias, float *restrict y);

typedef struct {
    aqlm_simd level; /* SCALAR for a table built without its instruction set */
    aqlm_int8_rows_fn rows;
} aqlm_int8_kernels;

/* xq [tokens, in] and steps [tokens] of x [tokens, in] in x_dtype, rounded as the header says (a
 * token with a NaN or infinity: step NaN; all zeros: step 0; xq 0 in both). */
void aqlm_round_activations(int64_t tokens, int64_t in, aqlm_dtype x_dtype, const void *x, int16_t *restrict xq,
                            float *restrict steps);

/* The table for `level`, or for the best level below it that this build has (cpu.c). */
const aqlm_int8_kernels *aqlm_int8_kernels_for(aqlm_simd level);

void aqlm_int8_rows_ref(int64_t o0, int64_t o1, int64_t n, int64_t in, int64_t out,
                        const int16_t *restrict xq, const float *restrict steps, const int8_t *restrict q,
                        const float *restrict scales, const float *restrict bias, float *restrict y);

extern const aqlm_int8_kernels aqlm_int8_kernels_scalar;
extern const aqlm_int8_kernels aqlm_int8_kernels_avx2;
extern const aqlm_int8_kernels aqlm_int8_kernels_avx512;

#endif /* AQLM_INT8_H */
