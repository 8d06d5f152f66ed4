/*
 * bf16tile.h - y = x W^T + b in bfloat16 tiles, for a few to some tens of tokens on CPUs with
 * AMX (internal; shared by bf16tile_*.c and cpu.c).
 *
 * The weight is never dequantized whole. A panel of 16 output rows x 32 inputs of one codebook's
 * codewords (og 1, 32 / ig codewords per row) is copied, already in bfloat16, into a 1 KiB
 * buffer, and one AMX instruction (TDPBF16PS) multiplies it with the activations' 32 inputs x 16
 * tokens, accumulating 16 rows x 16 tokens in fp32. The codebooks enter one at a time (each its
 * own panel, summed in the same accumulator), so each codeword is rounded to bfloat16 on its own:
 *     acc[o, t] = sum_m sum_i bf16(cb[m, code(o, i / ig, m), i % ig]) * bf16(x[t, i])     (fp32 sums)
 *     y[t, o] = acc[o, t] * scale[o] + bias[o]
 * The products of two bfloat16 values are exact in fp32; only the order and rounding of the sums
 * differ between the AMX unit and the scalar reference, so they agree to fp32 summation error:
 *     |acc - exact| <= gamma(M * in) * sum_m sum_i |bf16(w)| |bf16(x)|,  gamma(n) = n u / (1 - n u),
 * u = 2^-24 (AMX flushes denormal inputs and results to zero; each flush adds at most 2^-126).
 *
 * Per pass of up to AQLM_BF16_MAX_TOKENS tokens, the tokens are packed once into the tile layout
 * of TDPBF16PS's second operand (aqlm_bf16_pack_fn below), every thread reads them, and the
 * threads split the output rows in panels of R x 16 rows, R x T <= AQLM_BF16_ACC_TILES
 * (T = token blocks of 16 in the pass): each chunk of 32 inputs is built once per panel and
 * multiplied with the T token blocks.
 */
#ifndef AQLM_BF16TILE_H
#define AQLM_BF16TILE_H

#include "internal.h"

enum {
    AQLM_BF16_ROWS = 16,       /* output rows per tile */
    AQLM_BF16_CHUNK = 32,      /* inputs per tile */
    AQLM_BF16_TOKENS = 16,     /* tokens per tile */
    AQLM_BF16_MAX_BLOCKS = 4,  /* token blocks per pass */
    AQLM_BF16_MAX_TOKENS = AQLM_BF16_TOKENS * AQLM_BF16_MAX_BLOCKS,
    AQLM_BF16_ACC_TILES = 6,   /* accumulator tiles (the other two hold the operands) */
    AQLM_BF16_TILE_ELEMENTS = 512, /* bfloat16 values in one operand tile (1 KiB) */
    AQLM_BF16_PANELS = 8,      /* codeword panels built at a time (8 KiB) */
};

/* The tokens' tile layout: for chunk c (inputs [32c, 32c + 32)) and token block b, 16 rows of
 * input pairs p, each holding the 16 tokens' pairs side by side:
 *     xb[((c * T + b) * 16 + p) * 32 + t * 2 + e] = bf16(x[t0 + b * 16 + t, 32c + 2p + e])
 * (zero for tokens past the pass), for chunks [c0, c1). x is [n, in] in x_dtype. */
typedef void (*aqlm_bf16_pack_fn)(aqlm_dtype x_dtype, const void *x, int64_t in, int64_t t0, int64_t tokens,
                                  int64_t T, int64_t c0, int64_t c1, uint16_t *restrict xb);

/* dst[i] = bf16(src[i]) (round to nearest even) for i in [0, count). */
typedef void (*aqlm_bf16_convert_fn)(aqlm_dtype dtype, const void *src, int64_t count, uint16_t *restrict dst);

/* One panel: output rows [row0, row0 + R * 16) (rows from `rows` on are zero), all inputs, the
 * pass's T token blocks:
 *     acc[((r * T + b) * 16 + o) * 16 + t] = sum over codebooks and inputs as above, row
 *     row0 + r * 16 + o and token b * 16 + t of the pass
 * cb: the codebooks in bfloat16 [M, K, ig]; xb: the packed tokens; panel: scratch of
 * AQLM_BF16_PANELS * AQLM_BF16_TILE_ELEMENTS values. R * T <= AQLM_BF16_ACC_TILES. */
typedef void (*aqlm_bf16_panel_fn)(const aqlm_block_shape *s, int64_t row0, int64_t rows, int R, int T,
                                   const void *restrict codes, const uint16_t *restrict cb,
                                   const uint16_t *restrict xb, uint16_t *restrict panel, float *restrict acc);

typedef struct {
    const char *name; /* "scalar" or "amx"; NULL when built without AMX */
    aqlm_bf16_pack_fn pack;
    aqlm_bf16_convert_fn convert;
    aqlm_bf16_panel_fn panel;
} aqlm_bf16_kernels;

/* The AMX kernels where this CPU, OS and build allow them and level >= AVX-512, else the
 * scalar reference (cpu.c). */
const aqlm_bf16_kernels *aqlm_bf16_kernels_for(aqlm_simd level);

/* Whether the AMX kernels can run in this process: the CPU has AMX-BF16 and the OS grants the
 * tile state (Linux arch_prctl ARCH_REQ_XCOMP_PERM, asked here; granting twice is harmless). */
int aqlm_bf16_amx_usable(void);

void aqlm_bf16_pack_ref(aqlm_dtype x_dtype, const void *x, int64_t in, int64_t t0, int64_t tokens, int64_t T,
                        int64_t c0, int64_t c1, uint16_t *restrict xb);

extern const aqlm_bf16_kernels aqlm_bf16_kernels_scalar;
extern const aqlm_bf16_kernels aqlm_bf16_kernels_amx;

#endif /* AQLM_BF16TILE_H */
