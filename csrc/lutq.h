/*
 * lutq.h - quantized lookup tables for few-token matmul (internal; shared by lutq_*.c and cpu.c).
 *
 * For every token t, input group j and codebook m the exact table is
 *     T[t, j, m, c] = sum_i x[t, j*ig + i] * codebooks[m, c, 0, i]            (c < K <= 256).
 * Groups are taken `group` at a time (a "chunk" b); each (t, b, m) gets one fp32 step
 *     s[t, b, m] = max over j in b, c of |T[t, j, m, c]| / LEVELS,   LEVELS = 254 * 127 = 32258,
 * and every entry becomes the integer E = round_to_nearest_even(T * (LEVELS / amax)), |E| <= LEVELS,
 * stored as two int8 tables ("high" and "low" bytes, 15 bits in all):
 *     hi = round_to_nearest_even((float)E * (1 / 254)),  lo = E - 254 * hi,  |hi|, |lo| <= 127
 * (hi is E / 254 correctly rounded except at ties, where either neighbour leaves |lo| = 127).
 * An output row o sums
 *     acc[t, o] = sum over b (in order), m (in order) of  fma(s[t, b, m], (float)I[t, b, m, o], acc)
 *     I = 254 * Hi + Lo,  Hi/Lo[t, b, m, o] = sum_{j in b} hi/lo[t, j, m, code(o, j, m)]   (exact integers)
 * and y[t, o] = acc * scale[o] + bias[o]. |Hi|, |Lo| <= 127 * group <= 32512 < 2**15, so each fits
 * the int16 lanes the SIMD kernels accumulate in, whatever the codes (hence group <= 256), and
 * |I| <= 255 * 32512 < 2**24 converts to fp32 exactly. Every entry is off by at most s/2 (plus the
 * float rounding of T * (LEVELS / amax)), so |y - y_exact| <= |scale[o]| * sum_{b,m} |b| s[t,b,m] / 2
 * plus float rounding: 254x finer than one int8 table at the same chunking. All versions compute
 * the same integers and the same fp32 operations in the same order, so every SIMD level gives the
 * scalar reference's bits.
 *
 * Codes are repacked once per weight (out_group_size 1 only) for lane-parallel lookups: tiles
 * of 64 consecutive output rows, and within a tile, per input group j and codebook m, the 64
 * rows' codes side by side:
 *     packed[((tile * G + j) * M + m) * 64 + lane] = code(tile * 64 + lane, j, m)   (0 past out)
 * except for codebooks of at most 16 codewords and an even number of codebooks (4x4g8, 2x4g4,
 * 6x4g8), whose codes take half the bytes: the "slots" s = j * M + m pair up (m even, m + 1),
 *     packed[((tile * G * M + s) / 2) * 64 + lane] = code(slot s) | code(slot s + 1) << 4.
 * Tables are stored with stride KS = max(K, 16) bytes, high and low bytes apart:
 *     qhi[((t * G + j) * M + m) * KS + c], qlo[same],  qscale[(t * chunks + b) * M + m]
 * and each table buffer has AQLM_LUTQ_PAD spare bytes at its end (wide loads of the last table).
 */
#ifndef AQLM_LUTQ_H
#define AQLM_LUTQ_H

#include "internal.h"

enum {
    AQLM_LUTQ_TILE = 64,        /* output rows per packed tile */
    AQLM_LUTQ_TILE_BLOCK = 4,   /* tiles per parallel work item (and per accumulate call) */
    AQLM_LUTQ_MAX_GROUP = 256,  /* input groups per scale: keeps int16 sums exact */
    AQLM_LUTQ_MAX_TOKENS = 8,   /* tokens per pass (tables of all of them stay in L2) */
    AQLM_LUTQ_PAD = 256,
    AQLM_LUTQ_SLAB_BYTES = 1 << 19, /* tables (all tokens) the lookups sweep at a time: stay in L2 */
    AQLM_LUTQ_LOW_RADIX = 254,               /* E = 254 * hi + lo */
    AQLM_LUTQ_LEVELS = 254 * 127,            /* |E| <= this */
};

static inline int64_t aqlm_lutq_table_stride(int64_t K) { return K < 16 ? 16 : K; }

/* Whether two codes share each packed byte (K <= 16 and M even). */
static inline int aqlm_lutq_nibbles(const aqlm_block_shape *s) { return s->K <= 16 && s->M % 2 == 0; }

/* Tables of one token for input groups [j0, j1) (one chunk): fills qhi and qlo (the tables of
 * group j0 onward, layout above), qscale[m] for m < M. x: the token [in] fp32; cbt: the
 * codebooks transposed to [M, ig, K] fp32; work: (j1 - j0) * M * K floats. */
typedef void (*aqlm_lutq_build_fn)(const aqlm_block_shape *s, int64_t j0, int64_t j1,
                                   const float *restrict x, const float *restrict cbt,
                                   float *restrict work, int8_t *restrict qhi, int8_t *restrict qlo,
                                   float *restrict qscale);

/* For `tiles` tiles of packed codes (from the first given) and n <= AQLM_LUTQ_MAX_TOKENS tokens,
 * the terms of chunks b0 <= b < b1 (in order) of the sum defined above, added to what acc holds:
 *     acc[(tile * n + t) * 64 + lane] for row tile * 64 + lane
 * (so chunks [0, c) then [c, chunks) give the bits of one call over all chunks).
 * qhi, qlo, qscale: the tables and steps of all n tokens (layout above). */
typedef void (*aqlm_lutq_accumulate_fn)(const aqlm_block_shape *s, int64_t group, int64_t b0, int64_t b1, int64_t tiles,
                                        const uint8_t *restrict packed, int64_t n,
                                        const int8_t *restrict qhi, const int8_t *restrict qlo,
                                        const float *restrict qscale, float *restrict acc);

typedef struct {
    const char *name; /* "scalar", "avx2", "avx512vbmi" */
    aqlm_lutq_build_fn build;
    aqlm_lutq_accumulate_fn accumulate;
} aqlm_lutq_kernels;

/* The fastest table this CPU and build support at or below `level` (cpu.c). */
const aqlm_lutq_kernels *aqlm_lutq_kernels_for(aqlm_simd level);

void aqlm_lutq_build_ref(const aqlm_block_shape *s, int64_t j0, int64_t j1, const float *restrict x,
                         const float *restrict cbt, float *restrict work, int8_t *restrict qhi,
                         int8_t *restrict qlo, float *restrict qscale);
void aqlm_lutq_accumulate_ref(const aqlm_block_shape *s, int64_t group, int64_t b0, int64_t b1, int64_t tiles,
                              const uint8_t *restrict packed, int64_t n, const int8_t *restrict qhi,
                              const int8_t *restrict qlo, const float *restrict qscale, float *restrict acc);
void aqlm_lutq_build_avx2(const aqlm_block_shape *s, int64_t j0, int64_t j1, const float *restrict x,
                          const float *restrict cbt, float *restrict work, int8_t *restrict qhi,
                          int8_t *restrict qlo, float *restrict qscale);

extern const aqlm_lutq_kernels aqlm_lutq_kernels_scalar;
extern const aqlm_lutq_kernels aqlm_lutq_kernels_avx2;       /* name NULL when built without AVX2 */
extern const aqlm_lutq_kernels aqlm_lutq_kernels_avx512vbmi; /* name NULL when built without VBMI */

#endif /* AQLM_LUTQ_H */
