/*
 * lutw_ref.c - scalar reference of the wide-token table kernels (definitions in lutw.h).
 *
 * Built without SIMD flags: fmaf for the tables and plain adds in order (j, m) for the sums are
 * what the SIMD versions compute lane by lane, so all versions agree bit for bit.
 */
#include <math.h>

#include "lutw.h"

void aqlm_lutw_tables_ref(const aqlm_block_shape *s, int64_t W, int64_t j0, int64_t j1, const float *restrict xt,
                          const float *restrict cb, float *restrict tables) {
    const int64_t ig = s->ig, M = s->M, K = s->K;
    for (int64_t j = j0; j < j1; j++)
        for (int64_t m = 0; m < M; m++)
            for (int64_t c = 0; c < K; c++)
                for (int64_t t = 0; t < W; t++) {
                    float value = 0.0f;
                    for (int64_t i = 0; i < ig; i++) value = fmaf(cb[(m * K + c) * ig + i], xt[(j * ig + i) * W + t], value);
                    tables[(((j - j0) * M + m) * K + c) * W + t] = value;
                }
}

void aqlm_lutw_sweep_ref(const aqlm_block_shape *s, int64_t W, int64_t j0, int64_t j1, int64_t tile0, int64_t tile1,
                         const uint8_t *restrict packed, const float *restrict tables, float *restrict acc) {
    const int64_t M = s->M, K = s->K;
    const uint32_t mask = s->code_mask;
    const int nibbles = aqlm_lutq_nibbles(s);
    for (int64_t tile = tile0; tile < tile1; tile++) {
        const uint8_t *codes = aqlm_lutw_codes(s, packed, tile, j0);
        for (int64_t lane = 0; lane < AQLM_LUTW_TILE; lane++) {
            float *sum = acc + ((tile - tile0) * AQLM_LUTW_TILE + lane) * W;
            for (int64_t slot = 0; slot < (j1 - j0) * M; slot++) { /* slot = (j - j0) * M + m */
                const uint32_t code = (nibbles ? codes[slot / 2 * AQLM_LUTW_TILE + lane] >> (4 * (slot % 2))
                                               : codes[slot * AQLM_LUTW_TILE + lane]) & mask;
                const float *entry = tables + (slot * K + code) * W;
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
