/*
 * lutq.h - quantized lookup tables for few-token matmul (internal; shared by lutq_*.c and cpu.c).
 *
 * For every token t, input group j and codebook m the exact table is
 *     T[t, j, m, c] = sum_i x[t, j*ig + i] * codebooks[m, c, 0, i]            (c < K <= 256).
 * Groups are taken `group` at a time (a "chunk" b); each (t, b, m) gets one fp32 step from a
 * bound on its entries that x and the codebooks give without building the tables:
 *     B[t, j, m] = min(sum_i |x[t, j*ig + i]| * cmax[m, i],  ||x[t, group j]|| * nmax[m])
 *     cmax[m, i] = max_c |codebooks[m, c, 0, i]|,  nmax[m] = max_c ||codebooks[m, c, 0, :]||
 *     bound[t, b, m] = max over j in b of B[t, j, m] >= every |T[t, j, m, c]| of the chunk,
 *     s[t, b, m] = bound / LEVELS,   LEVELS = 127 * 256 + 127 = 32639,
 * (on SmolLM2's real inputs the bound is 1.48x the largest |entry| on average: steps that much
 * coarser than the exact maximum would give, but each thread knows every chunk's step at once,
 * before and without the tables, so it quantizes each table as it computes it; chunk_bound in
 * lutq_matmul.c)
 * and every entry becomes an integer E close to T * (LEVELS / bound), computed from int16
 * inputs and codebooks by exact integer products ("Integer table entries" below), held to
 * -ENTRY_OFFSET <= E <= LEVELS (the roundings can take E a few steps past the bound; the SIMD
 * kernels' unsigned 16-bit saturation does just this), stored as two int8 tables ("high" and
 * "low" bytes, 16 bits in all):
 *     hi = floor((E + 128) / 256),  lo = E - 256 * hi,  so -128 <= hi <= 127 and -128 <= lo <= 127
 * (LEVELS = 127 * 256 + 127 keeps hi within int8). Offset by 128, these are the two bytes of the
 * uint16 E + ENTRY_OFFSET (ENTRY_OFFSET = 128 * 256 + 128): hi + 128 its high byte, lo + 128 its
 * low one, which is how the SIMD kernels split an entry (two instructions, no division).
 * A kernel set's tables writes its tables in the byte form its own accumulate reads: the
 * scalar reference stores hi and lo as they are, the AVX2 and AVX-512 VBMI kernels offset by 128.
 * An output row o sums
 *     acc[t, o] = sum over b (in order), m (in order) of  fma(s[t, b, m], (float)I[t, b, m, o], acc)
 *     I = 256 * Hi + Lo,  Hi/Lo[t, b, m, o] = sum_{j in b} hi/lo[t, j, m, code(o, j, m)]   (exact integers)
 * and y[t, o] = acc * scale[o] + bias[o]. -128 * group <= Hi, Lo <= 127 * group, within int16
 * for group <= 256 (hence that limit), whatever the codes, and |I| <= 256 * 32768 + 32768 < 2**24
 * converts to fp32 exactly. Every entry is off by at most e[t, j, m] (below: s times 1/2 plus
 * ig halves of Q / 2**R, plus sum_i |x_i| cmax[m, i] / (2 Q)), so |y - y_exact| <= |scale[o]| *
 * sum_{j,m} e[t,j,m] plus float rounding. (Entries computed in fp32 and rounded once were off by
 * at most s/2; on SmolLM2 2x8g8's real inputs the layer outputs' relative error went from median
 * 0.020%, max 0.10% to median 0.030%, max 0.13%, and token-by-token perplexity stayed within
 * 0.03% of the exact tables'.) All versions compute the same integers and the same fp32
 * operations in the same order, so every SIMD level gives the scalar reference's bits.
 *
 * Threads split the input groups ("split-K"): thread p of P takes groups [G p / P, G (p + 1) / P)
 * for every output row, so each pulls its share of every row's codes. A chunk may straddle two
 * (or more) threads' ranges; the part of chunk b in one thread's range is a "piece", and pieces
 * are numbered in order of thread then chunk, which is also the order of chunk (ranges are
 * contiguous and increasing), so the pieces of chunk b are pieces [first[b], first[b + 1]).
 * Each thread computes the bound of every chunk it meets over the whole chunk (the same float on
 * every thread), builds and quantizes the tables of its own groups, and writes, for its pieces k
 * and every row, the exact int32 partial
 *     partials[((k * n + t) * M + m) * stride + o] = 256 * Hi + Lo over the groups of piece k
 * (stride = tiles * 64 rows; rows past out hold sums of code 0 and are never stored). After one
 * barrier the rows are split between threads: I[t, b, m, o] is the (exact) sum of its pieces'
 * partials, and acc and y follow as above. Results do not depend on the thread count.
 * In nibble mode (below) M is even, so every range starts at an even slot and never splits a
 * packed byte.
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

#include <math.h>

#include "internal.h"

enum {
    AQLM_LUTQ_TILE = 64,        /* output rows per packed tile */
    AQLM_LUTQ_TILE_STEP = 4,    /* tiles sharing each table load in the SIMD lookups */
    AQLM_LUTQ_MAX_GROUP = 256,  /* input groups per scale: keeps int16 sums exact */
    AQLM_LUTQ_MAX_CODEBOOKS = 256, /* as aqlm_format_check allows */
    AQLM_LUTQ_PAD = 256,
    AQLM_LUTQ_SLAB_BYTES = 1 << 19, /* one thread's tables (all tokens) swept at a time: stay in L2 */
    AQLM_LUTQ_ROW_BLOCK = 16,  /* rows of the final sums: a unit of the threads' row split */
    AQLM_LUTQ_LOW_RADIX = 256,               /* E = 256 * hi + lo */
    AQLM_LUTQ_LEVELS = 127 * 256 + 127,      /* |E| <= this */
    AQLM_LUTQ_ENTRY_OFFSET = 128 * 256 + 128, /* E + this: hi + 128 and lo + 128 as the two bytes of a uint16 */
};

static inline int64_t aqlm_lutq_table_stride(int64_t K) { return K < 16 ? 16 : K; }

/* ---- Integer table entries (the "tables" functions) ----
 * The prepared codebooks (aqlm_lutq_prepare_codebooks) hold, as floats unless said:
 *     pairs [M, PAIRS, K, 2] int16 (PAIRS = ceil(ig / 2), in the space of M * PAIRS * K floats):
 *         cq[m, c, i] = round_to_nearest_even(codebooks[m, c, 0, i] / step[m, i]), |cq| <= Q,
 *         inputs 2p and 2p + 1 of codeword c side by side (0 past ig);
 *     column_max [M, ig], norm_max [M] (for the bounds), step [M, ig] = column_max / Q,
 * with Q = 2**R - 1 and R = aqlm_lutq_entry_shift(ig). A table of group j, codebook m takes
 *     w_i = (step[m, i] * inverse[m]) * 2**R,  xq_i = round_to_nearest_even(x_i * w_i), |xq_i| <= X,
 *     I[c] = sum_i xq_i * cq[m, c, i]   (exact int32),   E[c] = floor((I[c] + 2**(R-1)) / 2**R)
 * (X = 32767; a product outside the int32 range, NaN or infinite, gives xq = -X, as the SIMD
 * conversion's "indefinite" value clamped does). Since |x_i| column_max[m, i] <= the chunk's bound,
 * |x_i w_i| <= LEVELS * 2**R / Q < X + 1; and |I| <= PAIRS * 2 * X * Q + 2**(R-1) < 2**31 by the
 * choice of R. Against T * inverse (the exact entry in steps), E is off by at most
 *     1/2 + sum_i (1/2 * Q / 2**R + |x_i| column_max[m, i] * inverse[m] / (2 Q))   (+ float rounding)
 * (rounding of E, of each xq_i, of each cq; the layer outputs' errors, above, grew 1.5x). In
 * exchange a table takes integer multiplies of pairs (AVX-512 VNNI vpdpwssd: 32 per instruction,
 * twice fp32 FMA's 16; AVX2 vpmaddwd) and a shift: the fp32 FMA chain had bound the table builds,
 * which took most of a SmolLM2 linear's time (a 64x1536 2x8g8 product at one thread: 27.7 ->
 * 20.0 us, AVX2 20.2 -> 15.2 us for 64x576). */
enum {
    AQLM_LUTQ_X_LEVELS = 32767,
    AQLM_LUTQ_MAX_PAIRS = 64, /* in_group_size <= 128 (check_lutq_format in lutq_matmul.c) */
};

static inline int64_t aqlm_lutq_pairs(int64_t ig) { return (ig + 1) / 2; }

/* R: the largest of 13, 12, ... with 2 * PAIRS * X * (2**R - 1) + 2**(R-1) < 2**31. */
static inline int aqlm_lutq_entry_shift(int64_t ig) {
    int shift = 13;
    while (shift > 1 && (double)(2 * aqlm_lutq_pairs(ig)) * AQLM_LUTQ_X_LEVELS * (double)((1 << shift) - 1) + (double)(1 << (shift - 1)) >= 2147483648.0)
        shift--;
    return shift;
}

/* Where the prepared parts lie (floats from the start of the prepared buffer). */
static inline int64_t aqlm_lutq_prepared_column_max(const aqlm_block_shape *s) { return s->M * aqlm_lutq_pairs(s->ig) * s->K; }
static inline int64_t aqlm_lutq_prepared_step(const aqlm_block_shape *s) {
    return aqlm_lutq_prepared_column_max(s) + s->M * s->ig + s->M;
}

/* xq of one input x (above): x * ((step * inverse) * 2**shift) rounded to nearest even and held
 * to [-X, X], with what the SIMD conversion gives outside the int32 range (NaN included):
 * INT32_MIN, so -X. The SIMD versions compute the same product in the same order. */
static inline int32_t aqlm_lutq_round_input(float x, float step, float inverse, int shift) {
    const float product = x * ((step * inverse) * (float)(1 << shift));
    if (!(product >= -2147483648.0f && product < 2147483648.0f)) return -AQLM_LUTQ_X_LEVELS;
    const long rounded = lrintf(product);
    return rounded < -AQLM_LUTQ_X_LEVELS ? -AQLM_LUTQ_X_LEVELS : rounded > AQLM_LUTQ_X_LEVELS ? AQLM_LUTQ_X_LEVELS : (int32_t)rounded;
}

/* E (above) from I: the arithmetic shift is the floor division (gcc and clang define >> so on
 * negative numbers). */
static inline int32_t aqlm_lutq_entry(int32_t total, int shift) { return (total + (1 << (shift - 1))) >> shift; }

/* The input groups of chunk b (`group` groups each) that lie in [j0, j1): [*from, *to). */
static inline void aqlm_lutq_piece_bounds(int64_t b, int64_t group, int64_t j0, int64_t j1, int64_t *from, int64_t *to) {
    *from = b * group > j0 ? b * group : j0;
    *to = (b + 1) * group < j1 ? (b + 1) * group : j1;
}

/* How many chunks of `group` groups meet [j0, j1), j0 < j1: that range's pieces. */
static inline int64_t aqlm_lutq_pieces(int64_t j0, int64_t j1, int64_t group) { return (j1 - 1) / group - j0 / group + 1; }

/* How many bytes past a code of piece [from, to) the accumulate kernels find the code at the same
 * place of the next piece they will read: the next chunk's of the same tiles, or, past the last
 * piece of [j0, j1), the first piece of the next `tiles` tiles (line: the bytes of one input
 * group's codes in a tile, tile_stride: of a whole tile). The kernels prefetch it as they read
 * each code, so that the codes stream in from memory while the lookups work, instead of one
 * miss at a time when a weight's codes have left the caches (a model's other layers evict them). */
static inline int64_t aqlm_lutq_next_piece_offset(int64_t tiles, int64_t from, int64_t to, int64_t j0, int64_t j1,
                                                  int64_t line, int64_t tile_stride) {
    return to < j1 ? (to - from) * line : tiles * tile_stride - (from - j0) * line;
}

/* Prefetches into L2 the byte `ahead` bytes past `code`. Past the last tiles that lies beyond the
 * codes: the address is formed as an integer (no out-of-bounds pointer) and a prefetch never faults. */
static inline void aqlm_lutq_prefetch(const uint8_t *code, int64_t ahead) {
    __builtin_prefetch((const void *)((uintptr_t)code + (uintptr_t)ahead), 0, 2);
}

/* The next `bytes` of one allocation, from *offset, 64-byte aligned (the packed-code drivers make
 * one aligned_alloc per call and carve it up). */
static inline size_t aqlm_carve(size_t *offset, size_t bytes) {
    const size_t at = *offset;
    *offset += (bytes + 63) / 64 * 64;
    return at;
}

/* A format the packed-code kernels serve (lutq, lutw: codebooks of <= 256 codewords, out_group_size
 * 1); `tables` names the kernel in the error ("quantized lookup tables", "wide lookup tables"). */
aqlm_status aqlm_check_packed_format(const aqlm_format *f, const char *tables, aqlm_error *err);

/* Whether two codes share each packed byte (K <= 16 and M even). */
static inline int aqlm_lutq_nibbles(const aqlm_block_shape *s) { return s->K <= 16 && s->M % 2 == 0; }

/* The tables of one token for input groups [j0, j1) (x: the token [in] fp32; prepared: the
 * prepared codebooks, "Integer table entries" above), with inverse[m] = LEVELS / bound of the
 * chunk, into qhi and qlo (the tables of group j0 first), in the byte form of the same kernel
 * set's accumulate (above). */
typedef void (*aqlm_lutq_tables_fn)(const aqlm_block_shape *s, int64_t j0, int64_t j1, const float *restrict x,
                                    const float *restrict prepared, const float *restrict inverse, int8_t *restrict qhi,
                                    int8_t *restrict qlo);

/* For `tiles` tiles of packed codes (from the first given), n <= AQLM_LUTQ_MAX_TOKENS tokens and
 * input groups [j0, j1): for every chunk b meeting [j0, j1) (piece k = b - j0 / group), writes
 *     partials[((k * n + t) * M + m) * stride + tile * 64 + lane] = 256 * Hi + Lo
 * summed over the groups of b within [j0, j1) (layout above; qhi, qlo: the tables of all n tokens). */
typedef void (*aqlm_lutq_accumulate_fn)(const aqlm_block_shape *s, int64_t group, int64_t j0, int64_t j1, int64_t tiles,
                                        const uint8_t *restrict packed, int64_t n, const int8_t *restrict qhi,
                                        const int8_t *restrict qlo, int32_t *restrict partials, int64_t stride);

/* For rows [row0, row1) (multiples of 16) and n tokens: acc[t * stride + o] = the fma chain of
 * the layout comment over chunks b < chunks and codebooks m < M, I summed over pieces
 * [first[b], first[b + 1]) of partials; qscale[(t * chunks + b) * M + m] the steps. */
typedef void (*aqlm_lutq_finish_fn)(int64_t M, int64_t chunks, const int64_t *restrict first, int64_t n,
                                    const int32_t *restrict partials, int64_t stride, int64_t row0, int64_t row1,
                                    const float *restrict qscale, float *restrict acc);

typedef struct {
    const char *name; /* "scalar", "avx2", "avx512vbmi" */
    aqlm_lutq_tables_fn tables;
    aqlm_lutq_accumulate_fn accumulate;
    aqlm_lutq_finish_fn finish;
} aqlm_lutq_kernels;

/* The fastest table this CPU and build support at or below `level` (cpu.c). */
const aqlm_lutq_kernels *aqlm_lutq_kernels_for(aqlm_simd level);

/* The scalar reference (lutq_ref.c), and the AVX2 versions the AVX-512 file falls back to. */
void aqlm_lutq_tables_ref(const aqlm_block_shape *s, int64_t j0, int64_t j1, const float *restrict x,
                          const float *restrict prepared, const float *restrict inverse, int8_t *restrict qhi,
                          int8_t *restrict qlo);
void aqlm_lutq_accumulate_ref(const aqlm_block_shape *s, int64_t group, int64_t j0, int64_t j1, int64_t tiles,
                              const uint8_t *restrict packed, int64_t n, const int8_t *restrict qhi,
                              const int8_t *restrict qlo, int32_t *restrict partials, int64_t stride);
void aqlm_lutq_finish_ref(int64_t M, int64_t chunks, const int64_t *restrict first, int64_t n,
                          const int32_t *restrict partials, int64_t stride, int64_t row0, int64_t row1,
                          const float *restrict qscale, float *restrict acc);
/* The tables in the offset byte form of the AVX2 and AVX-512 VBMI kernels (any K). */
void aqlm_lutq_tables_offset_avx2(const aqlm_block_shape *s, int64_t j0, int64_t j1, const float *restrict x,
                                  const float *restrict prepared, const float *restrict inverse, int8_t *restrict qhi,
                                  int8_t *restrict qlo);
/* The xq of one group and codebook (lutq.h) as PAIRS uint32 words, xq[2p] in the low half, of
 * group (ig floats), step (that codebook's ig steps) and inverse: what aqlm_lutq_tables_ref takes. */
void aqlm_lutq_input_pairs_avx2(int64_t ig, const float *restrict group, const float *restrict step, float inverse,
                                int shift, uint32_t *restrict pairs);
void aqlm_lutq_finish_avx2(int64_t M, int64_t chunks, const int64_t *restrict first, int64_t n,
                           const int32_t *restrict partials, int64_t stride, int64_t row0, int64_t row1,
                           const float *restrict qscale, float *restrict acc);

extern const aqlm_lutq_kernels aqlm_lutq_kernels_scalar;
extern const aqlm_lutq_kernels aqlm_lutq_kernels_avx2;       /* name NULL when built without AVX2 */
extern const aqlm_lutq_kernels aqlm_lutq_kernels_avx512vbmi; /* name NULL when built without VBMI */

#endif /* AQLM_LUTQ_H */
