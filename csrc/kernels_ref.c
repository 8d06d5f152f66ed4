/*
 * kernels_ref.c - scalar reference versions of every inner loop.
 *
 * Built without SIMD flags. These are the definitions the SIMD versions are tested against and
 * the fallback for shapes the SIMD versions do not specialise.
 */
#include <math.h>

#include "internal.h"

void aqlm_lut_build_t1_ref(const aqlm_block_shape *s, int64_t j0, int64_t j1,
                           const float *restrict x, const float *restrict cbt, float *restrict lut) {
    const int64_t og = s->og, ig = s->ig, M = s->M, K = s->K;
    for (int64_t j = j0; j < j1; j++) {
        const float *xj = x + j * ig;
        for (int64_t m = 0; m < M; m++) {
            for (int64_t r = 0; r < og; r++) {
                float *out = lut + (((j - j0) * M + m) * og + r) * K;
                const float *columns = cbt + (m * og + r) * ig * K;
                for (int64_t c = 0; c < K; c++) out[c] = 0.0f;
                for (int64_t i = 0; i < ig; i++) {
                    const float xi = xj[i];
                    const float *column = columns + i * K;
                    for (int64_t c = 0; c < K; c++) out[c] += xi * column[c];
                }
            }
        }
    }
}

void aqlm_lut_build_t8_ref(const aqlm_block_shape *s, int64_t j0, int64_t j1,
                           const float *restrict xt, const float *restrict cb, float *restrict lut) {
    const int64_t og = s->og, ig = s->ig, M = s->M, K = s->K;
    for (int64_t j = j0; j < j1; j++) {
        for (int64_t m = 0; m < M; m++) {
            for (int64_t r = 0; r < og; r++) {
                for (int64_t c = 0; c < K; c++) {
                    float *out = lut + ((((j - j0) * M + m) * og + r) * K + c) * 8;
                    const float *word = cb + ((m * K + c) * og + r) * ig;
                    for (int t = 0; t < 8; t++) out[t] = 0.0f;
                    for (int64_t i = 0; i < ig; i++) {
                        const float w = word[i];
                        const float *xi = xt + (j * ig + i) * 8;
                        for (int t = 0; t < 8; t++) out[t] += w * xi[t];
                    }
                }
            }
        }
    }
}

void aqlm_lut_accumulate_t1_ref(const aqlm_block_shape *s, int64_t rows, int64_t j0, int64_t j1,
                                const int8_t *restrict codes, const float *restrict lut,
                                float *restrict acc) {
    const int64_t og = s->og, M = s->M, K = s->K, stride = s->in_groups * M;
    const uint32_t mask = s->code_mask;
    for (int64_t row = 0; row < rows; row++) {
        const uint8_t *row_codes = (const uint8_t *)codes + row * stride;
        for (int64_t r = 0; r < og; r++) {
            float sum = acc[row * og + r];
            for (int64_t j = j0; j < j1; j++) {
                for (int64_t m = 0; m < M; m++) {
                    const uint32_t code = row_codes[j * M + m] & mask;
                    sum += lut[(((j - j0) * M + m) * og + r) * K + code];
                }
            }
            acc[row * og + r] = sum;
        }
    }
}

void aqlm_lut_accumulate_t8_ref(const aqlm_block_shape *s, int64_t rows, int64_t j0, int64_t j1,
                                const int8_t *restrict codes, const float *restrict lut,
                                float *restrict acc) {
    const int64_t og = s->og, M = s->M, K = s->K, stride = s->in_groups * M;
    const uint32_t mask = s->code_mask;
    for (int64_t row = 0; row < rows; row++) {
        const uint8_t *row_codes = (const uint8_t *)codes + row * stride;
        for (int64_t r = 0; r < og; r++) {
            float *sum = acc + (row * og + r) * 8;
            for (int64_t j = j0; j < j1; j++) {
                for (int64_t m = 0; m < M; m++) {
                    const uint32_t code = row_codes[j * M + m] & mask;
                    const float *entry = lut + ((((j - j0) * M + m) * og + r) * K + code) * 8;
                    for (int t = 0; t < 8; t++) sum[t] += entry[t];
                }
            }
        }
    }
}

void aqlm_decode_dot_ref(const aqlm_block_shape *s, int64_t o0, int64_t o1, int64_t n,
                         const float *restrict x, const void *restrict codes, aqlm_dtype cb_dtype,
                         const void *restrict cb, float *restrict acc) {
    const int64_t og = s->og, ig = s->ig, M = s->M, K = s->K, G = s->in_groups;
    const int64_t in = G * ig;
    float word[64]; /* one decoded slice of a group row; wider groups are done 64 at a time */
    for (int64_t o = o0; o < o1; o++) {
        for (int64_t r = 0; r < og; r++) {
            float *out = acc + ((o - o0) * og + r) * n;
            for (int64_t t = 0; t < n; t++) out[t] = 0.0f;
            for (int64_t j = 0; j < G; j++) {
                for (int64_t i0 = 0; i0 < ig; i0 += 64) {
                    const int64_t width = ig - i0 < 64 ? ig - i0 : 64;
                    for (int64_t i = 0; i < width; i++) word[i] = 0.0f;
                    for (int64_t m = 0; m < M; m++) {
                        const uint32_t code = aqlm_code_at(s->code_bits, codes, (o * G + j) * M + m, s->code_mask);
                        const int64_t base = ((m * K + code) * og + r) * ig + i0;
                        for (int64_t i = 0; i < width; i++) word[i] += aqlm_load(cb_dtype, cb, base + i);
                    }
                    for (int64_t t = 0; t < n; t++) {
                        const float *xt = x + t * in + j * ig + i0;
                        float dot = 0.0f;
                        for (int64_t i = 0; i < width; i++) dot += xt[i] * word[i];
                        out[t] += dot;
                    }
                }
            }
        }
    }
}

void aqlm_dequant_rows_ref(const aqlm_block_shape *s, int64_t o0, int64_t o1,
                           const void *restrict codes, aqlm_dtype param_dtype,
                           const void *restrict cb, const void *restrict scales,
                           aqlm_dtype w_dtype, void *restrict w) {
    const int64_t og = s->og, ig = s->ig, M = s->M, K = s->K, G = s->in_groups;
    const int64_t in = G * ig;
    for (int64_t o = o0; o < o1; o++) {
        const float scale = aqlm_load(param_dtype, scales, o);
        for (int64_t j = 0; j < G; j++) {
            for (int64_t r = 0; r < og; r++) {
                const int64_t out_base = (o * og + r) * in + j * ig;
                for (int64_t i = 0; i < ig; i++) {
                    float sum = 0.0f;
                    for (int64_t m = 0; m < M; m++) {
                        const uint32_t code = aqlm_code_at(s->code_bits, codes, (o * G + j) * M + m, s->code_mask);
                        sum += aqlm_load(param_dtype, cb, ((m * K + code) * og + r) * ig + i);
                    }
                    aqlm_store(w_dtype, w, out_base + i, sum * scale);
                }
            }
        }
    }
}

void aqlm_topk_scores_ref(int64_t n, int64_t D, int64_t K, int64_t k, const float *restrict q,
                          const float *restrict ct, const float *restrict bias, float *restrict values,
                          int32_t *restrict indices) {
    for (int64_t row = 0; row < n; row++) {
        float *best = values + row * k;
        int32_t *best_index = indices + row * k;
        for (int64_t t = 0; t < k; t++) best[t] = INFINITY, best_index[t] = -1;
        const float *query = q + row * D;
        for (int64_t c = 0; c < K; c++) {
            float value = bias[c];
            for (int64_t d = 0; d < D; d++) value = fmaf(query[d], ct[d * K + c], value);
            aqlm_topk_insert(k, best, best_index, value, (int32_t)c);
        }
    }
}

void aqlm_gradient_update_ref(int64_t n, int64_t ig, int64_t width, const float *restrict delta,
                              const float *restrict h, float *const *restrict g_rows) {
    for (int64_t row = 0; row < n; row++) {
        float *g = g_rows[row];
        for (int64_t col = 0; col < width; col++) {
            float value = g[col];
            for (int64_t i = 0; i < ig; i++) value = fmaf(-delta[row * ig + i], h[i * width + col], value);
            g[col] = value;
        }
    }
}

void aqlm_codeword_norms_ref(int64_t c0, int64_t c1, int64_t ct_stride, int64_t og, int64_t ig,
                             const float *restrict ct, const float *restrict h, int64_t h_stride,
                             float *restrict norms) {
    for (int64_t c = c0; c < c1; c++) {
        double norm = 0.0;
        for (int64_t r = 0; r < og; r++) {
            const float *w = ct + r * ig * ct_stride + c; /* w[i * ct_stride] = w_c[r, i] */
            for (int64_t i = 0; i < ig; i++) {
                const double wi = w[i * ct_stride];
                if (h == NULL) {
                    norm += wi * wi;
                    continue;
                }
                double hw = 0.0;
                for (int64_t t = 0; t < ig; t++) hw += (double)h[i * h_stride + t] * w[t * ct_stride];
                norm += wi * hw;
            }
        }
        norms[c - c0] = (float)norm;
    }
}

const aqlm_kernels aqlm_kernels_scalar = {
    .level = AQLM_SIMD_SCALAR,
    .lut_build_t1 = aqlm_lut_build_t1_ref,
    .lut_build_t8 = aqlm_lut_build_t8_ref,
    .lut_accumulate_t1 = aqlm_lut_accumulate_t1_ref,
    .lut_accumulate_t8 = aqlm_lut_accumulate_t8_ref,
    .decode_dot = aqlm_decode_dot_ref,
    .dequant_rows = aqlm_dequant_rows_ref,
    .topk_scores = aqlm_topk_scores_ref,
    .gradient_update = aqlm_gradient_update_ref,
    .codeword_norms = aqlm_codeword_norms_ref,
};
