/*
 * decode_step.c - the small per-token steps of a Llama-family decoder layer, for one token.
 *
 * Between its seven matrix products a decoder layer does a residual add and RMS norm, the rotary
 * embedding, one row of attention over the key/value cache, and the SiLU gate. For one token
 * these are a few thousand flops each; in torch they cost some forty dispatched calls per layer,
 * more time than the quantized products themselves. Here they are three C calls. Plain loops in
 * float32 (the compiler vectorizes them); sums in the order written, exp by expf.
 */
#include <math.h>

#include "internal.h"

aqlm_status aqlm_residual_rms_norm(int64_t n, float *h, const float *delta, const float *weight, float eps, float *out,
                                   aqlm_error *err) {
    AQLM_CHECK(err, n >= 1, "hidden size must be >= 1, got %lld", (long long)n);
    AQLM_CHECK(err, h != NULL && weight != NULL && out != NULL, "h, weight and out must not be NULL");
    AQLM_CHECK(err, eps >= 0.0f, "eps must be >= 0, got %g", (double)eps);
    if (delta != NULL)
        for (int64_t i = 0; i < n; i++) h[i] += delta[i];
    float squares = 0.0f;
    for (int64_t i = 0; i < n; i++) squares += h[i] * h[i];
    const float inverse = 1.0f / sqrtf(squares / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (h[i] * inverse);
    return AQLM_OK;
}

aqlm_status aqlm_silu_mul(int64_t n, float *gate, const float *up, aqlm_error *err) {
    AQLM_CHECK(err, n >= 1, "size must be >= 1, got %lld", (long long)n);
    AQLM_CHECK(err, gate != NULL && up != NULL, "gate and up must not be NULL");
    for (int64_t i = 0; i < n; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    return AQLM_OK;
}

/* x [heads, D] rotated in place: x[i] cos[i] + rotate_half(x)[i] sin[i], rotate_half(x) = (-x2, x1). */
static void rotate(int64_t heads, int64_t D, float *x, const float *cos, const float *sin) {
    const int64_t half = D / 2;
    for (int64_t head = 0; head < heads; head++) {
        float *row = x + head * D;
        for (int64_t i = 0; i < half; i++) {
            const float first = row[i], second = row[i + half];
            row[i] = first * cos[i] + (-second) * sin[i];
            row[i + half] = second * cos[i + half] + first * sin[i + half];
        }
    }
}

aqlm_status aqlm_attend_one(int64_t heads, int64_t kv_heads, int64_t D, int64_t capacity, int64_t position, float *q,
                            float *k, const float *v, const float *cos, const float *sin, float scale, float *keys,
                            float *values, float *scores, float *out, aqlm_error *err) {
    AQLM_CHECK(err, heads >= 1 && kv_heads >= 1 && heads % kv_heads == 0,
               "heads (%lld) must be a positive multiple of kv_heads (%lld)", (long long)heads, (long long)kv_heads);
    AQLM_CHECK(err, D >= 2 && D % 2 == 0, "head_dim must be even and >= 2, got %lld", (long long)D);
    AQLM_CHECK(err, position >= 0 && position < capacity, "position %lld is outside the cache of %lld positions",
               (long long)position, (long long)capacity);
    AQLM_CHECK(err, q && k && v && cos && sin && keys && values && scores && out, "arrays must not be NULL");
    rotate(heads, D, q, cos + position * D, sin + position * D);
    rotate(kv_heads, D, k, cos + position * D, sin + position * D);
    memcpy(keys + position * kv_heads * D, k, (size_t)(kv_heads * D) * sizeof(float));
    memcpy(values + position * kv_heads * D, v, (size_t)(kv_heads * D) * sizeof(float));
    const int64_t length = position + 1, group = heads / kv_heads;
    for (int64_t head = 0; head < heads; head++) {
        const float *query = q + head * D;
        const int64_t kv = head / group;
        float top = -INFINITY;
        for (int64_t t = 0; t < length; t++) {
            const float *key = keys + (t * kv_heads + kv) * D;
            float dot = 0.0f;
            for (int64_t i = 0; i < D; i++) dot += query[i] * key[i];
            scores[t] = dot * scale;
            top = scores[t] > top ? scores[t] : top;
        }
        float total = 0.0f;
        for (int64_t t = 0; t < length; t++) {
            scores[t] = expf(scores[t] - top);
            total += scores[t];
        }
        float *row = out + head * D;
        for (int64_t i = 0; i < D; i++) row[i] = 0.0f;
        for (int64_t t = 0; t < length; t++) {
            const float *value = values + (t * kv_heads + kv) * D, weight = scores[t] / total;
            for (int64_t i = 0; i < D; i++) row[i] += weight * value[i];
        }
    }
    return AQLM_OK;
}
