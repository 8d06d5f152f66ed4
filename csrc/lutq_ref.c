/*
 * lutq_ref.c - scalar reference of the quantized-table kernels (definitions in lutq.h).
 *
 * Built without SIMD flags. lrintf (round to nearest even) is what the SIMD versions' float-to-int
 * conversion computes, lane by lane, fmaf what their FMA does, and integer sums are exact in any
 * order, so all versions agree bit for bit.
 */
#include <math.h>

#include "lutq.h"

/* E from integer products (lutq.h, "Integer table entries"), held to [-ENTRY_OFFSET, LEVELS],
 * split into high and low bytes: hi = floor((E + 128) / 256), lo = E - 256 * hi (lutq.h). */
void aqlm_lutq_tables_ref(const aqlm_block_shape *s, int64_t j0, int64_t j1, const float *restrict x,
                          const float *restrict prepared, const float *restrict inverse, int8_t *restrict qhi,
                          int8_t *restrict qlo) {
    const int64_t ig = s->ig, M = s->M, K = s->K, KS = aqlm_lutq_table_stride(K), pairs = aqlm_lutq_pairs(ig);
    const int shift = aqlm_lutq_entry_shift(ig);
    const int16_t *cq = (const int16_t *)prepared;
    const float *step = prepared + aqlm_lutq_prepared_step(s);
    int32_t xq[2 * AQLM_LUTQ_MAX_PAIRS];
    for (int64_t j = j0; j < j1; j++)
        for (int64_t m = 0; m < M; m++) {
            for (int64_t i = 0; i < 2 * pairs; i++)
                xq[i] = i < ig ? aqlm_lutq_round_input(x[j * ig + i], step[m * ig + i], inverse[m], shift) : 0;
            int8_t *high = qhi + ((j - j0) * M + m) * KS, *low = qlo + ((j - j0) * M + m) * KS;
            for (int64_t c = 0; c < K; c++) {
                int32_t total = 0;
                for (int64_t p = 0; p < pairs; p++) {
                    const int16_t *pair = cq + ((m * pairs + p) * K + c) * 2;
                    total += xq[2 * p] * pair[0] + xq[2 * p + 1] * pair[1];
                }
                int32_t entry = aqlm_lutq_entry(total, shift);
                entry = entry < -AQLM_LUTQ_ENTRY_OFFSET ? -AQLM_LUTQ_ENTRY_OFFSET : entry > AQLM_LUTQ_LEVELS ? AQLM_LUTQ_LEVELS : entry;
                /* entry + ENTRY_OFFSET >= 0, so this division is the floor of (entry + 128) / 256 */
                const int32_t hi = (entry + AQLM_LUTQ_ENTRY_OFFSET) / AQLM_LUTQ_LOW_RADIX - 128;
                high[c] = (int8_t)hi;
                low[c] = (int8_t)(entry - AQLM_LUTQ_LOW_RADIX * hi);
            }
            for (int64_t c = K; c < KS; c++) high[c] = low[c] = 0;
        }
}

void aqlm_lutq_accumulate_ref(const aqlm_block_shape *s, int64_t group, int64_t j0, int64_t j1, int64_t tiles,
                              const uint8_t *restrict packed, int64_t n, const int8_t *restrict qhi,
                              const int8_t *restrict qlo, int32_t *restrict partials, int64_t stride) {
    const int64_t M = s->M, G = s->in_groups, KS = aqlm_lutq_table_stride(s->K);
    const uint32_t mask = s->code_mask;
    const int nibbles = aqlm_lutq_nibbles(s);
    for (int64_t tile = 0; tile < tiles; tile++) {
        const uint8_t *codes = packed + tile * (nibbles ? G * M / 2 : G * M) * AQLM_LUTQ_TILE;
        for (int64_t b = j0 / group; b * group < j1; b++) {
            const int64_t piece = b - j0 / group;
            int64_t from, to;
            aqlm_lutq_piece_bounds(b, group, j0, j1, &from, &to);
            for (int64_t t = 0; t < n; t++) {
                const int8_t *high = qhi + t * G * M * KS, *low = qlo + t * G * M * KS;
                for (int64_t m = 0; m < M; m++)
                    for (int64_t lane = 0; lane < AQLM_LUTQ_TILE; lane++) {
                        int32_t high_total = 0, low_total = 0;
                        for (int64_t j = from; j < to; j++) {
                            const int64_t slot = j * M + m;
                            const uint32_t code = (nibbles ? codes[slot / 2 * AQLM_LUTQ_TILE + lane] >> (4 * (slot % 2))
                                                           : codes[slot * AQLM_LUTQ_TILE + lane]) & mask;
                            high_total += high[(j * M + m) * KS + code];
                            low_total += low[(j * M + m) * KS + code];
                        }
                        partials[((piece * n + t) * M + m) * stride + tile * AQLM_LUTQ_TILE + lane] =
                            AQLM_LUTQ_LOW_RADIX * high_total + low_total;
                    }
            }
        }
    }
}

void aqlm_lutq_finish_ref(int64_t M, int64_t chunks, const int64_t *restrict first, int64_t n,
                          const int32_t *restrict partials, int64_t stride, int64_t row0, int64_t row1,
                          const float *restrict qscale, float *restrict acc) {
    for (int64_t t = 0; t < n; t++)
        for (int64_t row = row0; row < row1; row++) {
            float sum = 0.0f;
            for (int64_t b = 0; b < chunks; b++)
                for (int64_t m = 0; m < M; m++) {
                    int32_t total = 0; /* exact: the pieces of a chunk add up to |I| < 2**24 */
                    for (int64_t k = first[b]; k < first[b + 1]; k++) total += partials[((k * n + t) * M + m) * stride + row];
                    sum = fmaf(qscale[(t * chunks + b) * M + m], (float)total, sum);
                }
            acc[t * stride + row] = sum;
        }
}

const aqlm_lutq_kernels aqlm_lutq_kernels_scalar = {
    .name = "scalar",
    .tables = aqlm_lutq_tables_ref,
    .accumulate = aqlm_lutq_accumulate_ref,
    .finish = aqlm_lutq_finish_ref,
};
