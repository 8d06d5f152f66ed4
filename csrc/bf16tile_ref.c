/*
 * bf16tile_ref.c - the scalar reference of the bfloat16 tile kernels (bf16tile.h): the same
 * roundings to bfloat16, the sums in fp32 in the order codebook, input.
 */
#include "bf16tile.h"

void aqlm_bf16_pack_ref(aqlm_dtype x_dtype, const void *x, int64_t in, int64_t tokens, int64_t blocks, int64_t c0,
                        int64_t c1, uint16_t *restrict xb) {
    for (int64_t c = c0; c < c1; c++)
        for (int64_t b = 0; b < blocks; b++) {
            uint16_t *tile = xb + (c * blocks + b) * AQLM_BF16_TILE_ELEMENTS;
            for (int64_t p = 0; p < AQLM_BF16_CHUNK / 2; p++)
                for (int64_t t = 0; t < AQLM_BF16_TOKENS; t++)
                    for (int64_t e = 0; e < 2; e++) {
                        const int64_t token = b * AQLM_BF16_TOKENS + t, input = c * AQLM_BF16_CHUNK + 2 * p + e;
                        tile[p * 2 * AQLM_BF16_TOKENS + t * 2 + e] =
                            token < tokens ? aqlm_f32_to_bf16(aqlm_load(x_dtype, x, token * in + input)) : 0;
                    }
        }
}

static void convert_ref(aqlm_dtype dtype, const void *src, int64_t count, uint16_t *restrict dst) {
    for (int64_t i = 0; i < count; i++) dst[i] = aqlm_f32_to_bf16(aqlm_load(dtype, src, i));
}

static void rows_ref(const aqlm_block_shape *s, int64_t row0, int64_t rows, int R, int T, int64_t blocks,
                     const void *restrict codes, const uint16_t *restrict cb, const uint16_t *restrict xb,
                     uint16_t *restrict strip, float *restrict acc) {
    const int64_t ig = s->ig, M = s->M, K = s->K, G = s->in_groups, chunks = G * ig / AQLM_BF16_CHUNK;
    for (int r = 0; r < R; r++)
        for (int64_t o = 0; o < AQLM_BF16_ROWS; o++) {
            const int64_t row = row0 + r * AQLM_BF16_ROWS + o;
            for (int64_t b = 0; b < blocks; b++)
                for (int64_t t = 0; t < AQLM_BF16_TOKENS; t++) {
                    float sum = 0.0f;
                    for (int64_t m = 0; row < rows && m < M; m++)
                        for (int64_t c = 0; c < chunks; c++) {
                            const uint16_t *tile = xb + (c * blocks + b) * AQLM_BF16_TILE_ELEMENTS;
                            for (int64_t k = 0; k < AQLM_BF16_CHUNK; k++) {
                                const int64_t input = c * AQLM_BF16_CHUNK + k, j = input / ig;
                                const uint32_t code = aqlm_code_at(s->code_bits, codes, (row * G + j) * M + m, s->code_mask);
                                const float w = aqlm_bf16_to_f32(cb[(m * K + code) * ig + input % ig]);
                                sum += w * aqlm_bf16_to_f32(tile[k / 2 * 2 * AQLM_BF16_TOKENS + t * 2 + k % 2]);
                            }
                        }
                    acc[(((b / T) * R + r) * T + b % T) * AQLM_BF16_ROWS * AQLM_BF16_TOKENS + o * AQLM_BF16_TOKENS + t] = sum;
                }
        }
}

const aqlm_bf16_kernels aqlm_bf16_kernels_scalar = {"scalar", aqlm_bf16_pack_ref, convert_ref, rows_ref};
