/*
 * decodeq.h - decoding from int8 codebooks for few tokens (internal; shared by decodeq_*.c and cpu.c).
 *
 * For codebooks too large for lookup tables (nbits 9..16, codes stored as int16), out_group_size 1
 * and in_group_size 8 (1x16g8, 2x16g8): exact decoding (aqlm_codebook_matmul) reads a 32-byte
 * float32 (or 16-byte float16) codeword per code at random from a 2 MiB (1 MiB) codebook, which
 * misses the 1 MiB L2 of the CPUs we measure. Here each codebook m is rounded once to int8 with
 * one fp32 step (aqlm_decodeq_prepare):
 *     cstep[m] = max_{c,i} |codebooks[m, c, 0, i]| / 127,  cq[m, c, i] = codebooks / cstep rounded
 *     to nearest even, |cq| <= 127,
 * so a codeword is 8 bytes and a 2**16-entry codebook 512 KiB: it stays in L2. Each token's
 * activations are rounded to int16 with one fp32 step, as the int8 head's are (int8.h,
 * aqlm_round_activations):
 *     xstep[t] = max_i |x[t, i]| / 32767,  xq[t, i] = x / xstep rounded to nearest even.
 * Every version computes, for rows [o0, o1), codebooks m and tokens t, the exact integer
 *     dot[t, o, m] = sum_j sum_i xq[t, 8 j + i] * cq[m, code(o, j, m), i]          (int64)
 * and then, in the same fp32 operations, in order of m,
 *     v = sum_m step[t, m] * (float)dot[t, o, m],   step[t, m] = xstep[t] * cstep[m] (the driver's)
 *     y[t, o] = scales[o] * v + (bias ? bias[o] : 0)
 * so every SIMD level gives the scalar reference's bits, for any thread count.
 * Error: each codebook value is off by at most cstep[m] / 2 and each activation by xstep[t] / 2, so
 *     |y - exact| <= |scales[o]| * sum_{j,m} sum_i (|x_i| cstep[m] / 2 + |c_i| xstep / 2
 *                                                   + cstep[m] xstep / 4)  (+ float rounding)
 * with c = codebooks[m, code(o, j, m)] (tests/test_decodeq.py checks this bound).
 * The SIMD versions sign-extend 4 (AVX-512) or 2 (AVX2) codewords to int16 side by side and
 * multiply them into int32 lanes by vpmaddwd (two products per lane); every CHUNK_GROUPS input
 * groups the lanes are added into int64 totals. A step of 2 groups (AVX2: 16 products, 8 lanes)
 * or 4 (AVX-512: 32 products, 16 lanes) gives each lane 2 products, so a lane holds at most
 * CHUNK_GROUPS products of |xq| <= 32767 and |cq| <= 128 (any int8): 512 * 128 * 32767 =
 * 2147418112 < 2**31.
 *
 * prepared (aqlm_decodeq_prepared_size(f) bytes): cstep [M] float32 at offset 0, then from byte
 * aqlm_decodeq_header_bytes(M) the int8 codebooks cq [M, K, 8].
 */
#ifndef AQLM_DECODEQ_H
#define AQLM_DECODEQ_H

#include "internal.h"

enum {
    AQLM_DECODEQ_GROUP = 8,            /* in_group_size served */
    AQLM_DECODEQ_C_LEVELS = 127,       /* |cq| <= this */
    AQLM_DECODEQ_CHUNK_GROUPS = 512,   /* input groups summed in int32 lanes before they widen (header) */
    AQLM_DECODEQ_MAX_TOKENS = 8,       /* tokens per pass: one gathered codeword serves all of them */
    /* Rows of codes asked for ahead of the block being summed: with the prefetches a call took
     * 1.03-1.23 ms against 1.23-1.30 without (20 layers of 4096x4096 round robin, AVX-512, two
     * builds side by side); 0 to 32 rows ahead measured alike. */
    AQLM_DECODEQ_PREFETCH_ROWS = 4,
    /* Tokens up to which the gather kernel serves (decodeq_avx512vnni.c). Two builds side by side,
     * 4096x4096 1x16g8, 2 threads, AMX Xeon, ms gather / current AVX-512: 1 token 1.24 / 1.44,
     * 2: 1.61 / 1.74, 4: 2.49 / 2.28, 8: 4.63 / 3.62 (one gathered row serves fewer tokens than
     * the current kernel's two rows do). */
    AQLM_DECODEQ_GATHER_MAX_TOKENS = 2,
};

static inline int64_t aqlm_decodeq_header_bytes(int64_t M) { return (M * (int64_t)sizeof(float) + 63) / 64 * 64; }

/* The shape the kernels see: G input groups, M codebooks, codes [out, G, M] as uint16 (masked). */
typedef struct {
    int64_t G, M, K;
    uint32_t code_mask;
} aqlm_decodeq_shape;

/* The int16 activations as two byte planes, xq = 256 hi + lo (hi signed, lo unsigned), for the
 * kernels that multiply bytes (aqlm_decodeq_kernels.byte_planes), with each token's sum of hi. */
typedef struct {
    const uint8_t *lo;     /* [n, 8 G] */
    const int8_t *hi;      /* [n, 8 G] */
    const int64_t *hi_sum; /* [n] */
} aqlm_decodeq_planes;

/* dots[r * tokens + t] = dot[t, row r, m] (header) for r < rows, t < tokens: codes of row r from
 * codes + r * G * M, xq of token t from xq + t * 8 * G (and its byte planes, where the kernel
 * reads them, from planes->lo + t * 8 * G, ...), cq_m the int8 codebook m [K, 8]. */
typedef void (*aqlm_decodeq_dots_fn)(const aqlm_decodeq_shape *s, int rows, int tokens, int64_t m,
                                     const int16_t *restrict xq, const aqlm_decodeq_planes *planes,
                                     const uint16_t *restrict codes, const int8_t *restrict cq_m,
                                     int64_t *restrict dots);

enum { AQLM_DECODEQ_MAX_ROWS = 2 }; /* rows of the largest block a SIMD file uses */

/* The SIMD files' rows kernel (signature of aqlm_decodeq_rows_fn): rows [o0, o1) in blocks of
 * block_rows, prefetching the codes of the rows ahead; per block, tokens in passes of at most
 * AQLM_DECODEQ_MAX_TOKENS, codebooks in order by `dots`, then the header's output formula. Always
 * inlined into each file, so `dots` is a direct call there. */
static inline __attribute__((always_inline)) void aqlm_decodeq_rows_blocked(
    int block_rows, aqlm_decodeq_dots_fn dots_fn, const aqlm_decodeq_shape *s, int64_t o0, int64_t o1,
    int64_t n, int64_t out, const int16_t *restrict xq, const aqlm_decodeq_planes *planes,
    const float *restrict steps, const uint16_t *restrict codes,
    const int8_t *restrict cq, aqlm_dtype param_dtype, const void *scales, const void *bias, aqlm_dtype y_dtype,
    void *y) {
    const int64_t G = s->G, M = s->M, in = 8 * G, row_codes = G * M;
    int64_t dots[AQLM_DECODEQ_MAX_ROWS * AQLM_DECODEQ_MAX_TOKENS];
    float v[AQLM_DECODEQ_MAX_ROWS * AQLM_DECODEQ_MAX_TOKENS];
    for (int64_t o = o0; o < o1; o += block_rows) {
        const int rows = o1 - o < block_rows ? (int)(o1 - o) : block_rows;
        const int64_t ahead = o + AQLM_DECODEQ_PREFETCH_ROWS;
        const int64_t ahead_end = ahead + rows < o1 ? ahead + rows : o1;
        for (int64_t at = ahead * row_codes; at < ahead_end * row_codes; at += 32) __builtin_prefetch(codes + at, 0, 3);
        for (int64_t t0 = 0; t0 < n; t0 += AQLM_DECODEQ_MAX_TOKENS) {
            const int tokens = n - t0 < AQLM_DECODEQ_MAX_TOKENS ? (int)(n - t0) : AQLM_DECODEQ_MAX_TOKENS;
            const aqlm_decodeq_planes pass = planes ? (aqlm_decodeq_planes){planes->lo + t0 * in, planes->hi + t0 * in,
                                                                            planes->hi_sum + t0}
                                                    : (aqlm_decodeq_planes){NULL, NULL, NULL};
            for (int64_t m = 0; m < M; m++) {
                dots_fn(s, rows, tokens, m, xq + t0 * in, &pass, codes + o * row_codes, cq + m * s->K * 8, dots);
                for (int r = 0; r < rows; r++)
                    for (int t = 0; t < tokens; t++) {
                        const float term = steps[(t0 + t) * M + m] * (float)dots[r * tokens + t];
                        v[r * tokens + t] = m == 0 ? term : v[r * tokens + t] + term;
                    }
            }
            for (int r = 0; r < rows; r++) {
                const float scale = aqlm_load(param_dtype, scales, o + r);
                const float shift = bias ? aqlm_load(param_dtype, bias, o + r) : 0.0f;
                for (int t = 0; t < tokens; t++)
                    aqlm_store(y_dtype, y, (t0 + t) * out + o + r, scale * v[r * tokens + t] + shift);
            }
        }
    }
}

typedef void (*aqlm_decodeq_rows_fn)(const aqlm_decodeq_shape *s, int64_t o0, int64_t o1, int64_t n, int64_t out,
                                     const int16_t *restrict xq, const aqlm_decodeq_planes *planes,
                                     const float *restrict steps,
                                     const uint16_t *restrict codes, const int8_t *restrict cq,
                                     aqlm_dtype param_dtype, const void *scales, const void *bias,
                                     aqlm_dtype y_dtype, void *y);

typedef struct {
    aqlm_simd level; /* SCALAR for a table built without its instruction set */
    aqlm_decodeq_rows_fn rows;
    const char *name;
    int byte_planes; /* rows reads the activations' byte planes (the driver makes them) */
} aqlm_decodeq_kernels;

/* The table for `level`, or for the best level below it that this build has (cpu.c): at the
 * AVX-512 level, for calls of up to AQLM_DECODEQ_GATHER_MAX_TOKENS tokens, the gather kernel where
 * aqlm_decodeq_gather_usable() says so. */
const aqlm_decodeq_kernels *aqlm_decodeq_kernels_for(aqlm_simd level, int64_t tokens);

/* Whether the AVX-512 level decodes by gathers and byte products (decodeq_avx512vnni.c): an
 * Intel CPU with AVX-512 VNNI, this build has the kernel, and AQLM_DECODEQ_GATHER is not "0".
 * On an AMD EPYC (Zen 4) gathering codewords was slower than loading them one by one. */
int aqlm_decodeq_gather_usable(void);

void aqlm_decodeq_rows_ref(const aqlm_decodeq_shape *s, int64_t o0, int64_t o1, int64_t n, int64_t out,
                           const int16_t *restrict xq, const aqlm_decodeq_planes *planes,
                           const float *restrict steps, const uint16_t *restrict codes,
                           const int8_t *restrict cq, aqlm_dtype param_dtype, const void *scales,
                           const void *bias, aqlm_dtype y_dtype, void *y);

extern const aqlm_decodeq_kernels aqlm_decodeq_kernels_scalar;
extern const aqlm_decodeq_kernels aqlm_decodeq_kernels_avx2;
extern const aqlm_decodeq_kernels aqlm_decodeq_kernels_avx512;
extern const aqlm_decodeq_kernels aqlm_decodeq_kernels_avx512vnni;

#endif /* AQLM_DECODEQ_H */
