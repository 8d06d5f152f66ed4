/*
 * bf16tile.h - y = x W^T + b in bfloat16 tiles, from a few tokens on, on CPUs with AMX (or,
 * without the panels below, AVX-512 BF16: bf16tile_avx512bf16.c) (internal; shared by
 * bf16tile_*.c and cpu.c).
 *
 * The weight is never dequantized whole. A panel of 16 output rows x 32 inputs of one codebook's
 * codewords (og 1, 32 / ig codewords per row) is copied, already in bfloat16, into a 1 KiB
 * buffer, and one AMX instruction (TDPBF16PS) multiplies it with the activations' 32 inputs x 16
 * tokens, accumulating 16 rows x 16 tokens in fp32. The codebooks enter one at a time (each its
 * own panel, summed in the same accumulator), so each codeword is rounded to bfloat16 on its own:
 *     acc[o, t] = sum_m sum_i bf16(cb[m, code(o, i / ig, m), i % ig]) * bf16(x[t, i])     (fp32 sums)
 *     y[t, o] = acc[o, t] * scale[o] + bias[o]
 * The products of two bfloat16 values are exact in fp32; only the order and rounding of the sums
 * differ between the AMX unit, VDPBF16PS and the scalar reference, so all agree to fp32 summation
 * error:
 *     |acc - exact| <= gamma(M * in) * sum_m sum_i |bf16(w)| |bf16(x)|,  gamma(n) = n u / (1 - n u),
 * u = 2^-24 (AMX and VDPBF16PS flush denormal inputs and results to zero; each flush adds at
 * most 2^-126).
 *
 * The tokens are packed once per call into the tile layout of TDPBF16PS's second operand
 * (aqlm_bf16_pack_fn below), which every thread reads. The threads split the output rows in
 * groups of R x 16 rows. For each group a thread builds the panels of a block of chunks of 32
 * inputs (a strip of panels kept in cache), and multiplies each with the tokens in passes of T
 * blocks of 16, R_acc x T <= AQLM_BF16_ACC_TILES accumulator tiles at a time. With at most 6
 * blocks of tokens there is one pass, R = R_acc, and the sums stay in the tiles. With more, a
 * group has AQLM_BF16_SPILL_ROW_TILES row tiles and its sums of each pass and R_acc row tiles are
 * loaded before a block of chunks and stored after it: each panel is built once per call
 * whatever the number of tokens. (4096x4096 1x16g8 at 512 tokens, 2 threads: 21-25 ms rebuilding
 * the panels for each pass of 64 tokens; 14-17 ms thus, with 6 to 24 row tiles per group, 1 to
 * 3 token blocks per pass and strips of 32 to 384 KiB all within that range.)
 */
#ifndef AQLM_BF16TILE_H
#define AQLM_BF16TILE_H

#include "internal.h"

enum {
    AQLM_BF16_ROWS = 16,       /* output rows per tile */
    AQLM_BF16_CHUNK = 32,      /* inputs per tile */
    AQLM_BF16_TOKENS = 16,     /* tokens per tile */
    AQLM_BF16_ACC_TILES = 6,   /* accumulator tiles (the other two hold the operands) */
    AQLM_BF16_PASS_BLOCKS = 2, /* token blocks per pass when there are more than AQLM_BF16_ACC_TILES */
    AQLM_BF16_TILE_ELEMENTS = 512, /* bfloat16 values in one operand tile (1 KiB) */
    AQLM_BF16_STRIP_TILES = 32,    /* codeword panels built at a time with one pass (32 KiB, L1) */
    AQLM_BF16_SPILL_ROW_TILES = 12,     /* row tiles per group with several passes */
    AQLM_BF16_SPILL_STRIP_TILES = 48,   /* codeword panels built at a time then (48 KiB) */
};

/* A group of several passes holds whole sets of R_acc = 6 / AQLM_BF16_PASS_BLOCKS row tiles, and
 * at least as many rows as a one-pass group (the driver sizes its per-row arrays so). */
_Static_assert(AQLM_BF16_SPILL_ROW_TILES % (AQLM_BF16_ACC_TILES / AQLM_BF16_PASS_BLOCKS) == 0 &&
                   AQLM_BF16_SPILL_ROW_TILES >= AQLM_BF16_ACC_TILES,
               "AQLM_BF16_SPILL_ROW_TILES must be a multiple of the accumulator row tiles per pass");

/* The tokens' tile layout: for chunk c (inputs [32c, 32c + 32)) and token block b (of `blocks`),
 * 16 rows of input pairs p, each holding the 16 tokens' pairs side by side:
 *     xb[((c * blocks + b) * 16 + p) * 32 + t * 2 + e] = bf16(x[b * 16 + t, 32c + 2p + e])
 * (zero for tokens from `tokens` on), for chunks [c0, c1). x is [tokens, in] in x_dtype. */
typedef void (*aqlm_bf16_pack_fn)(aqlm_dtype x_dtype, const void *x, int64_t in, int64_t tokens, int64_t blocks,
                                  int64_t c0, int64_t c1, uint16_t *restrict xb);

/* dst[i] = bf16(src[i]) (round to nearest even) for i in [0, count). */
typedef void (*aqlm_bf16_convert_fn)(aqlm_dtype dtype, const void *src, int64_t count, uint16_t *restrict dst);

/* One group of rows: output rows [row0, row0 + R * 16) (rows from `rows` on: any values, unused), all
 * inputs, all `blocks` token blocks (a multiple of T) in passes of T:
 *     acc[(((b / T) * R + r) * T + b % T) * 256 + o * 16 + t] = the sum above for row
 *     row0 + r * 16 + o and token b * 16 + t
 * cb: the codebooks in bfloat16 [M, K, ig]; xb: the packed tokens; strip: scratch of
 * aqlm_bf16_strip_tiles(R, M, blocks / T) * AQLM_BF16_TILE_ELEMENTS values. R is a multiple of
 * R_acc = AQLM_BF16_ACC_TILES / T. */
typedef void (*aqlm_bf16_rows_fn)(const aqlm_block_shape *s, int64_t row0, int64_t rows, int R, int T, int64_t blocks,
                                  const void *restrict codes, const uint16_t *restrict cb, const uint16_t *restrict xb,
                                  uint16_t *restrict strip, float *restrict acc);

/* Chunks per block of a group of R row tiles, M codebooks and `passes` passes, and the panels
 * of a block (at least one chunk's). */
static inline int64_t aqlm_bf16_block_chunks(int64_t R, int64_t M, int64_t passes) {
    const int64_t budget = passes > 1 || R > AQLM_BF16_ACC_TILES ? AQLM_BF16_SPILL_STRIP_TILES : AQLM_BF16_STRIP_TILES;
    return R * M < budget ? budget / (R * M) : 1;
}
static inline int64_t aqlm_bf16_strip_tiles(int64_t R, int64_t M, int64_t passes) {
    return aqlm_bf16_block_chunks(R, M, passes) * R * M;
}

typedef struct {
    const char *name; /* "scalar" or "amx"; NULL when built without AMX */
    aqlm_bf16_pack_fn pack;
    aqlm_bf16_convert_fn convert;
    aqlm_bf16_rows_fn rows;
} aqlm_bf16_kernels;

/* The AMX kernels where this CPU, OS and build allow them and level >= AVX-512, else the
 * scalar reference (cpu.c). */
const aqlm_bf16_kernels *aqlm_bf16_kernels_for(aqlm_simd level);

/* Whether the AMX kernels can run in this process: the CPU has AMX-BF16 and the OS grants the
 * tile state (Linux arch_prctl ARCH_REQ_XCOMP_PERM, asked here; granting twice is harmless). */
int aqlm_bf16_amx_usable(void);

/* Whether this CPU has AVX-512 BF16 (VDPBF16PS); 0 when built without it. */
int aqlm_bf16_cpu_has_avx512bf16(void);
/* The AVX-512 BF16 token packing and codebook conversion (the AMX kernels use them too). */
void aqlm_bf16_pack_avx512bf16(aqlm_dtype x_dtype, const void *x, int64_t in, int64_t tokens, int64_t blocks,
                               int64_t c0, int64_t c1, uint16_t *restrict xb);
void aqlm_bf16_convert_avx512bf16(aqlm_dtype dtype, const void *src, int64_t count, uint16_t *restrict dst);
void aqlm_bf16_pack_ref(aqlm_dtype x_dtype, const void *x, int64_t in, int64_t tokens, int64_t blocks, int64_t c0,
                        int64_t c1, uint16_t *restrict xb);

extern const aqlm_bf16_kernels aqlm_bf16_kernels_scalar;
extern const aqlm_bf16_kernels aqlm_bf16_kernels_amx;        /* name NULL when built without AMX */
extern const aqlm_bf16_kernels aqlm_bf16_kernels_avx512bf16; /* name NULL when built without AVX-512 BF16 */

#endif /* AQLM_BF16TILE_H */
