/*
 * lutw_ref.c - scalar reference of the wide-token table kernels (definitions in lutw.h).
 *
 * Built without SIMD flags: fmaf for the tables and plain adds in order (j, m) for the sums are
 * what the SIMD versions compute lane by lane, so all versions agree bit for bit.
 */
#include <math.h>

#include "lutw.h"

void aqlm_lutw_tables_ref(const aqlm_block_shape *s, int64_t W, int64_t m, int64_t j0, int64_t j1,
                          const float *restrict xt, const float *restrict cb, float *restrict tables) {
    const int64_t ig = s->ig, K = s->K;
    for (int64_t j = j0; j < j1; j++)
        for (int64_t c = 0; c < K; c++)
            for (int64_t t = 0; t < W; t++) {
                float value = 0.0f;
                for (int64_t i = 0; i < ig; i++) value = fmaf(cb[(m * K + c) * ig + i], xt[(j * ig + i) * W + t], value);
                tables[((j - j0) * K + c) * W + t] = value;
            }
}

void aqlm_lutw_sweep_ref(const aqlm_block_shape *s, int64_t W, int64_t m, int64_t j0, int64_t j1, int64_t tile0,
                         int64_t tile1, const uint8_t *restrict packed, const float *restrict tables,
                         float *restrict acc) {
    const int64_t K = s->K;
    const uint32_t mask = s->code_mask;
    for (int64_t tile = tile0; tile < tile1; tile++) {
        int64_t stride;
        int shift;
        const uint8_t *codes = aqlm_lutw_codes(s, packed, tile, j0, m, &stride, &shift);
        for (int64_t lane = 0; lane < AQLM_LUTW_TILE; lane++) {
            float *sum = acc + ((tile - tile0) * AQLM_LUTW_TILE + lane) * W;
            for (int64_t j = j0; j < j1; j++) {
                const uint32_t code = (uint32_t)(codes[(j - j0) * stride + lane] >> shift) & mask;
                const float *entry = tables + ((j - j0) * K + code) * W;
                for (int64_t t = 0; t < W; t++) sum[t] += entry[t];
            }
        }
    }
}

const aqlm_lutw_kernels aqlm_lutw_kernels_scalar = {
    .name = "scalar",
    .tables = aqlm_lutw_tables_ref,
    .sweep = aqlm_lutw_sweep_ref,
};
