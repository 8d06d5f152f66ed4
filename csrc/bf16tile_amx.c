/*
 * bf16tile_amx.c - the bfloat16 tile kernels (bf16tile.h) on AMX: TDPBF16PS multiplies a
 * 16 x 32 panel of codewords with 32 inputs x 16 tokens; the AVX-512 BF16 file's functions pack
 * the tokens and convert the codebooks.
 */
#define _GNU_SOURCE /* syscall() */
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "bf16tile.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__F16C__)
#include <immintrin.h>

enum { ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };

int aqlm_bf16_amx_usable(void) {
    const char *setting = getenv("AQLM_AMX"); /* "0" turns the AMX kernels off */
    if (setting != NULL && strcmp(setting, "0") == 0) return 0;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("avx512bf16")) return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Tiles 0-5: accumulators (16 rows x 16 fp32); 6: the codeword panel (16 rows x 32 bf16);
 * 7: the tokens (16 input pairs x 16 tokens x 2 bf16). All 16 rows of 64 bytes. */
static void configure_tiles(void) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int i = 0; i < 8; i++) config.colsb[i] = 64, config.rows[i] = 16;
    _tile_loadconfig(&config);
}

#define TILE_CASES(X) X(0) X(1) X(2) X(3) X(4) X(5)
static inline void accumulate(int tile) {
    switch (tile) {
#define DP(i) case i: _tile_dpbf16ps(i, 6, 7); break;
        TILE_CASES(DP)
#undef DP
    }
}
static inline void store_tile(int tile, float *out) {
    switch (tile) {
#define ST(i) case i: _tile_stored(i, out, 64); break;
        TILE_CASES(ST)
#undef ST
    }
}
static inline void load_tile(int tile, const float *in) {
    switch (tile) {
#define LT(i) case i: _tile_loadd(i, in, 64); break;
        TILE_CASES(LT)
#undef LT
    }
}
static inline void zero_tile(int tile) {
    switch (tile) {
#define ZT(i) case i: _tile_zero(i); break;
        TILE_CASES(ZT)
#undef ZT
    }
}

/* The panel of codebook m, rows [row0, row0 + 16) and chunk c: row o holds the 32 / ig
 * codewords of groups 32c / ig ... (zeros for rows from `rows` on). IG is ig and CODE_BITS the
 * codes' width when they are compile-time constants (the common cases), else 0. */
static inline __attribute__((always_inline)) void build_panel(const int IG, const int CODE_BITS,
                                                              const aqlm_block_shape *s, int64_t row0, int64_t rows,
                                                              int64_t c, int64_t m, const void *restrict codes,
                                                              const uint16_t *restrict cb, uint16_t *restrict panel) {
    const int64_t ig = IG ? IG : s->ig, per = AQLM_BF16_CHUNK / ig, M = s->M, G = s->in_groups;
    const int code_bits = CODE_BITS ? CODE_BITS : s->code_bits;
    const uint16_t *codebook = cb + m * s->K * ig;
    for (int64_t o = 0; o < AQLM_BF16_ROWS; o++) {
        uint16_t *dst = panel + o * AQLM_BF16_CHUNK;
        const int64_t row = row0 + o;
        if (row >= rows) {
            memset(dst, 0, AQLM_BF16_CHUNK * sizeof *dst);
            continue;
        }
        const int64_t first = (row * G + c * per) * M + m;
        for (int64_t g = 0; g < per; g++) {
            const uint32_t code = aqlm_code_at(code_bits, codes, first + g * M, s->code_mask);
            memcpy(dst + g * ig, codebook + code * ig, (size_t)ig * sizeof *dst);
        }
    }
}

/* Blocks of chunks: their R x M panels are built into the strip first (strip tile
 * (c * M + m) * R + r), then multiplied with every pass of T token blocks, R_acc row tiles at a
 * time; with several passes or row subgroups the accumulators go to acc between blocks. */
static inline __attribute__((always_inline)) void rows_loop(const int IG, const int CODE_BITS,
                                                            const aqlm_block_shape *s, int64_t row0, int64_t rows,
                                                            int R, int T, int64_t blocks, const void *restrict codes,
                                                            const uint16_t *restrict cb, const uint16_t *restrict xb,
                                                            uint16_t *restrict strip, float *restrict acc) {
    const int64_t chunks = s->in_groups * s->ig / AQLM_BF16_CHUNK, M = s->M, passes = blocks / T;
    const int64_t block = aqlm_bf16_block_chunks(R, M, passes);
    const int R_acc = AQLM_BF16_ACC_TILES / T < R ? AQLM_BF16_ACC_TILES / T : R, tiles = R_acc * T;
    const int spill = passes > 1 || R > R_acc;
    enum { TILE_FLOATS = AQLM_BF16_ROWS * AQLM_BF16_TOKENS };
    for (int i = 0; i < tiles; i++) zero_tile(i);
    for (int64_t c0 = 0; c0 < chunks; c0 += block) {
        const int64_t n = chunks - c0 < block ? chunks - c0 : block;
        for (int64_t c = 0; c < n; c++)
            for (int64_t m = 0; m < M; m++)
                for (int r = 0; r < R; r++)
                    build_panel(IG, CODE_BITS, s, row0 + r * AQLM_BF16_ROWS, rows, c0 + c, m, codes, cb,
                                strip + ((c * M + m) * R + r) * AQLM_BF16_TILE_ELEMENTS);
        for (int64_t p = 0; p < passes; p++)
            for (int r0 = 0; r0 < R; r0 += R_acc) {
                /* accumulator tile r * T + b holds row tile r0 + r, token block p * T + b */
                float *sums = acc + ((p * R + r0) * T) * TILE_FLOATS;
                if (spill)
                    for (int i = 0; i < tiles; i++) {
                        if (c0 > 0) load_tile(i, sums + i * TILE_FLOATS);
                        else zero_tile(i);
                    }
                for (int64_t c = 0; c < n; c++)
                    for (int b = 0; b < T; b++) {
                        _tile_loadd(7, xb + ((c0 + c) * blocks + p * T + b) * AQLM_BF16_TILE_ELEMENTS, 64);
                        for (int64_t m = 0; m < M; m++)
                            for (int r = 0; r < R_acc; r++) {
                                _tile_loadd(6, strip + ((c * M + m) * R + r0 + r) * AQLM_BF16_TILE_ELEMENTS, 64);
                                accumulate(r * T + b);
                            }
                    }
                if (spill)
                    for (int i = 0; i < tiles; i++) store_tile(i, sums + i * TILE_FLOATS);
            }
    }
    if (!spill)
        for (int i = 0; i < tiles; i++) store_tile(i, acc + i * TILE_FLOATS);
}

static void rows_amx(const aqlm_block_shape *s, int64_t row0, int64_t rows, int R, int T, int64_t blocks,
                     const void *restrict codes, const uint16_t *restrict cb, const uint16_t *restrict xb,
                     uint16_t *restrict strip, float *restrict acc) {
    configure_tiles();
    if (s->ig == 8 && s->code_bits == 16) rows_loop(8, 16, s, row0, rows, R, T, blocks, codes, cb, xb, strip, acc);
    else if (s->ig == 8) rows_loop(8, 8, s, row0, rows, R, T, blocks, codes, cb, xb, strip, acc);
    else if (s->ig == 4 && s->code_bits == 8) rows_loop(4, 8, s, row0, rows, R, T, blocks, codes, cb, xb, strip, acc);
    else rows_loop(0, 0, s, row0, rows, R, T, blocks, codes, cb, xb, strip, acc);
    _tile_release();
}

const aqlm_bf16_kernels aqlm_bf16_kernels_amx = {"amx", aqlm_bf16_pack_avx512bf16, aqlm_bf16_convert_avx512bf16, rows_amx};
#else
int aqlm_bf16_amx_usable(void) { return 0; }
const aqlm_bf16_kernels aqlm_bf16_kernels_amx = {NULL, NULL, NULL, NULL};
#endif
