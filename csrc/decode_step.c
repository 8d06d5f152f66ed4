/*
 * decode_step.c - the small per-token steps of a Llama-family decoder layer, for one token.
 *
 * Between its seven matrix products a decoder layer does a residual add and RMS norm, the rotary
 * embedding, one row of attention over the key/value cache, and the SiLU gate. For one token
 * these are a few thousand flops each; in torch they cost some forty dispatched calls per layer,
 * more time than the quantized products themselves. Here they are three C calls. Plain loops in
 * float32 (the compiler vectorizes them); sums in the order written, exp by exp_in_place.
 */
#include <math.h>

#include "internal.h"

/* The 8 partial sums of dot() and dot4() added in their fixed order. */
static inline float lanes_sum(const float lane[8]) {
    return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

/* a . b over n values as 8 interleaved partial sums (lane l takes i = l, l + 8, ...) added in a fixed
 * order, then the tail: independent chains that the compiler vectorizes, where one running sum is a
 * chain of n dependent adds of several cycles each. The order is fixed by this code, so every CPU
 * gives the same bits. (SmolLM2, 2,000 cached positions, one thread: 1.0 -> 0.74 ms per layer.) */
static float dot(int64_t n, const float *restrict a, const float *restrict b) {
    float lane[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) lane[l] += a[i + l] * b[i + l];
    float sum = lanes_sum(lane);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

aqlm_status aqlm_residual_rms_norm(int64_t n, float *h, const float *delta, const float *weight, float eps, float *out,
                                   aqlm_error *err) {
    AQLM_CHECK(err, n >= 1, "hidden size must be >= 1, got %lld", (long long)n);
    AQLM_CHECK(err, h != NULL && weight != NULL && out != NULL, "h, weight and out must not be NULL");
    AQLM_CHECK(err, eps >= 0.0f, "eps must be >= 0, got %g", (double)eps);
    if (delta != NULL)
        for (int64_t i = 0; i < n; i++) h[i] += delta[i];
    /* dot(h, h): where one running sum was a chain of n dependent adds, a call at 576 values from
     * Python, warm, 0.90 -> 0.49 us */
    const float inverse = 1.0f / sqrtf(dot(n, h, h) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (h[i] * inverse);
    return AQLM_OK;
}

/* e**x to within about 2 float ulps (Cephes' expf: x = n ln 2 + r, |r| <= ln(2) / 2, a degree-5
 * polynomial in r, times 2**n built in the exponent bits) for x clamped to [-87, 88], where 2**n
 * stays a normal float (a NaN stays NaN); four at a time in SSE2, which every x86-64 CPU has, so
 * every x86-64 CPU gives the same bits (libm's expf elsewhere). libm's expf does not vectorize; a
 * plain C version of this lets gcc split the clamped values onto a path that computes denormals,
 * slower than libm. (SiLU: 3.8-5.9 -> 1.24 ns a value.) */
#if defined(__SSE2__)
#include <emmintrin.h>

static inline __m128 exp4(__m128 x) {
    /* maxps and minps return their second operand when either is NaN: x second keeps a NaN */
    x = _mm_min_ps(_mm_set1_ps(88.0f), _mm_max_ps(_mm_set1_ps(-87.0f), x));
    const __m128i n = _mm_cvtps_epi32(_mm_mul_ps(x, _mm_set1_ps(1.44269504088896341f))); /* round to nearest */
    const __m128 nf = _mm_cvtepi32_ps(n);
    /* ln 2 in two parts: n * 0.693359375 is exact */
    const __m128 r = _mm_sub_ps(_mm_sub_ps(x, _mm_mul_ps(nf, _mm_set1_ps(0.693359375f))), _mm_mul_ps(nf, _mm_set1_ps(-2.12194440e-4f)));
    __m128 p = _mm_set1_ps(1.9875691500e-4f);
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.3981999507e-3f));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(8.3334519073e-3f));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(4.1665795894e-2f));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.6666665459e-1f));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(5.0000001201e-1f));
    const __m128 y = _mm_add_ps(_mm_add_ps(_mm_mul_ps(_mm_mul_ps(p, r), r), r), _mm_set1_ps(1.0f));
    return _mm_mul_ps(y, _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(n, _mm_set1_epi32(127)), 23)));
}

/* values[i] = e**values[i] for i < n */
static void exp_in_place(int64_t n, float *values) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) _mm_storeu_ps(values + i, exp4(_mm_loadu_ps(values + i)));
    if (i < n) {
        float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        memcpy(tail, values + i, (size_t)(n - i) * sizeof(float));
        _mm_storeu_ps(tail, exp4(_mm_loadu_ps(tail)));
        memcpy(values + i, tail, (size_t)(n - i) * sizeof(float));
    }
}
#else
static void exp_in_place(int64_t n, float *values) {
    for (int64_t i = 0; i < n; i++) values[i] = expf(values[i]);
}
#endif

aqlm_status aqlm_silu_mul(int64_t n, float *gate, const float *up, aqlm_error *err) {
    AQLM_CHECK(err, n >= 1, "size must be >= 1, got %lld", (long long)n);
    AQLM_CHECK(err, gate != NULL && up != NULL, "gate and up must not be NULL");
    /* in blocks on the stack: exp of -gate, then the products (the compiler vectorizes both loops) */
    enum { BLOCK = 256 };
    for (int64_t first = 0; first < n; first += BLOCK) {
        const int64_t count = n - first < BLOCK ? n - first : BLOCK;
        float negated[BLOCK];
        for (int64_t i = 0; i < count; i++) negated[i] = -gate[first + i];
        exp_in_place(count, negated);
        for (int64_t i = 0; i < count; i++) gate[first + i] = gate[first + i] / (1.0f + negated[i]) * up[first + i];
    }
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

/* Each product q.k or weight x value term counts this many elementary operations against the
 * process-wide parallel threshold (aqlm_threads_for): with the default threshold, 2 threads split
 * the heads from 15 cached positions at SmolLM2's 9 heads of 64. Inside a decoding step the cache
 * comes from memory (the step's other layers have streamed their weights through the caches), so
 * two threads pay far sooner than warm timings suggest: SmolLM2 2x8g8 decoding, all 30 layers'
 * attention per token, 2 threads against 1 (paired in one process): 320 -> 202 us at 39 cached
 * positions, 453 -> 269 us at 67 (weight 4 before: 2 threads from 114 positions). */
enum { ATTEND_WORK_WEIGHT = 32 };

/* dot() of a with four rows b[r * stride] at once (out[r]), each by exactly dot's operations:
 * four independent chains of adds, where one dot at a time waits on its own chain. In SSE2 (lanes
 * 0-3 and 4-7 of dot as two registers a row), as gcc keeps a plain C version's lanes in memory. */
static void dot4(int64_t n, const float *restrict a, const float *restrict b, int64_t stride, float *restrict out) {
    int64_t i = 0;
#if defined(__SSE2__)
    __m128 low[4], high[4];
    for (int r = 0; r < 4; r++) low[r] = high[r] = _mm_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m128 a_low = _mm_loadu_ps(a + i), a_high = _mm_loadu_ps(a + i + 4);
        for (int r = 0; r < 4; r++) {
            low[r] = _mm_add_ps(low[r], _mm_mul_ps(a_low, _mm_loadu_ps(b + r * stride + i)));
            high[r] = _mm_add_ps(high[r], _mm_mul_ps(a_high, _mm_loadu_ps(b + r * stride + i + 4)));
        }
    }
    float lane[4][8];
    for (int r = 0; r < 4; r++) _mm_storeu_ps(lane[r], low[r]), _mm_storeu_ps(lane[r] + 4, high[r]);
#else
    float lane[4][8] = {{0.0f}};
    for (; i + 8 <= n; i += 8)
        for (int r = 0; r < 4; r++)
            for (int l = 0; l < 8; l++) lane[r][l] += a[i + l] * b[r * stride + i + l];
#endif
    for (int r = 0; r < 4; r++) {
        float sum = lanes_sum(lane[r]);
        for (int64_t k = i; k < n; k++) sum += a[k] * b[r * stride + k];
        out[r] = sum;
    }
}

/* row[i] = sum over t (in order) of weights[t] * values[t * stride + i], i < D: VALUE_SLICE values
 * of the row at a time held in registers over all t (the value rows stream past once), each
 * element summed in the order t = 0, 1, ... of one running sum per element. */
enum { VALUE_SLICE = 16 };
static void weigh_values(int64_t D, int64_t stride, int64_t length, const float *restrict weights,
                         const float *restrict values, float *restrict row) {
    int64_t i0 = 0;
    for (; i0 + VALUE_SLICE <= D; i0 += VALUE_SLICE) {
        float sum[VALUE_SLICE] = {0.0f};
        for (int64_t t = 0; t < length; t++) {
            const float *value = values + t * stride + i0, weight = weights[t];
            for (int k = 0; k < VALUE_SLICE; k++) sum[k] += weight * value[k];
        }
        for (int k = 0; k < VALUE_SLICE; k++) row[i0 + k] = sum[k];
    }
    for (int64_t i = i0; i < D; i++) {
        float sum = 0.0f;
        for (int64_t t = 0; t < length; t++) sum += weights[t] * values[t * stride + i];
        row[i] = sum;
    }
}

aqlm_status aqlm_attend_one(int64_t heads, int64_t kv_heads, int64_t D, int64_t capacity, int64_t position, float *q,
                            float *k, const float *v, const float *cos, const float *sin, float scale, float *keys,
                            float *values, float *scores, float *out, int num_threads, aqlm_error *err) {
    AQLM_CHECK(err, heads >= 1 && kv_heads >= 1 && heads % kv_heads == 0,
               "heads (%lld) must be a positive multiple of kv_heads (%lld)", (long long)heads, (long long)kv_heads);
    AQLM_CHECK(err, D >= 2 && D % 2 == 0, "head_dim must be even and >= 2, got %lld", (long long)D);
    AQLM_CHECK(err, position >= 0 && position < capacity, "position %lld is outside the cache of %lld positions",
               (long long)position, (long long)capacity);
    AQLM_CHECK(err, q && k && v && cos && sin && keys && values && scores && out, "arrays must not be NULL");
    AQLM_CHECK(err, num_threads >= 1, "num_threads must be >= 1, got %d", num_threads);
    rotate(heads, D, q, cos + position * D, sin + position * D);
    rotate(kv_heads, D, k, cos + position * D, sin + position * D);
    memcpy(keys + position * kv_heads * D, k, (size_t)(kv_heads * D) * sizeof(float));
    memcpy(values + position * kv_heads * D, v, (size_t)(kv_heads * D) * sizeof(float));
    const int64_t length = position + 1, group = heads / kv_heads;
    /* Heads are independent (each its own row of scores), so threads split them, each head whole:
     * the same bits on any thread count. Only a long cache pays for waking the threads. */
    const int team = aqlm_threads_for(num_threads, (double)length * (double)(heads * D) * ATTEND_WORK_WEIGHT);
    const int threads = team < heads ? team : (int)heads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t head = 0; head < heads; head++) {
        const float *query = q + head * D;
        float *weights = scores + head * capacity;
        const int64_t kv = head / group;
        float top = -INFINITY;
        int64_t t = 0;
        for (; t + 4 <= length; t += 4) {
            float products[4];
            dot4(D, query, keys + (t * kv_heads + kv) * D, kv_heads * D, products);
            for (int r = 0; r < 4; r++) weights[t + r] = products[r] * scale;
        }
        for (; t < length; t++) weights[t] = dot(D, query, keys + (t * kv_heads + kv) * D) * scale;
        for (t = 0; t < length; t++) top = weights[t] > top ? weights[t] : top;
        float total = 0.0f;
        for (int64_t t = 0; t < length; t++) weights[t] -= top;
        exp_in_place(length, weights);
        for (int64_t t = 0; t < length; t++) total += weights[t];
        for (int64_t t = 0; t < length; t++) weights[t] /= total;
        weigh_values(D, kv_heads * D, length, weights, values + kv * D, out + head * D);
    }
    return AQLM_OK;
}
