/*
 * kernels_avx512.c - AVX-512 (F, BW, VL, DQ) versions of the loops that gain from 16-wide
 * vectors: the one-token table build (16 codewords per vector); for in_group_size a multiple
 * of 16, decode-and-dot and dequantize (one vector per group row); the top-1 codeword search of
 * greedy beam search and k-means (four queries x 32 codewords per step; from 8192 codewords the
 * lanes keep only their minimum and the winning chunk is rescanned), the gradient update for
 * in_group_size 8 and the codeword norms of beam search (32 codewords in double). Everything else
 * reuses the AVX2 versions, which run unchanged on AVX-512 hardware.
 */
#include <math.h>

#include "internal.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE __m512 load16(aqlm_dtype dtype, const void *base, int64_t index) {
    if (dtype == AQLM_F32) return _mm512_loadu_ps((const float *)base + index);
    const __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + index));
    if (dtype == AQLM_F16) return _mm512_cvtph_ps(half);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

/* Entries [c, c + 64) of one table: four independent FMA chains hide the FMA latency; each
 * entry still sums its ig products in order from zero, as the 16-wide loop does (same bits). */
ALWAYS_INLINE void build_t1_64(int64_t ig, int64_t K, const float *restrict xj, const float *restrict columns,
                               float *restrict out) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    for (int64_t i = 0; i < ig; i++) {
        const __m512 xi = _mm512_set1_ps(xj[i]);
        const float *row = columns + i * K;
        s0 = _mm512_fmadd_ps(xi, _mm512_loadu_ps(row), s0);
        s1 = _mm512_fmadd_ps(xi, _mm512_loadu_ps(row + 16), s1);
        s2 = _mm512_fmadd_ps(xi, _mm512_loadu_ps(row + 32), s2);
        s3 = _mm512_fmadd_ps(xi, _mm512_loadu_ps(row + 48), s3);
    }
    _mm512_storeu_ps(out, s0);
    _mm512_storeu_ps(out + 16, s1);
    _mm512_storeu_ps(out + 32, s2);
    _mm512_storeu_ps(out + 48, s3);
}

static void lut_build_t1_avx512(const aqlm_block_shape *s, int64_t j0, int64_t j1,
                                const float *restrict x, const float *restrict cbt, float *restrict lut) {
    const int64_t og = s->og, ig = s->ig, M = s->M, K = s->K;
    if (K % 16 != 0) {
        aqlm_lut_build_t1_avx2(s, j0, j1, x, cbt, lut);
        return;
    }
    for (int64_t j = j0; j < j1; j++) {
        const float *xj = x + j * ig;
        for (int64_t mr = 0; mr < M * og; mr++) {
            float *out = lut + ((j - j0) * M * og + mr) * K;
            const float *columns = cbt + mr * ig * K;
            int64_t c = 0;
            for (; c + 64 <= K; c += 64) build_t1_64(ig, K, xj, columns + c, out + c);
            for (; c < K; c += 16) {
                __m512 sum = _mm512_setzero_ps();
                for (int64_t i = 0; i < ig; i++)
                    sum = _mm512_fmadd_ps(_mm512_set1_ps(xj[i]), _mm512_loadu_ps(columns + i * K + c), sum);
                _mm512_storeu_ps(out + c, sum);
            }
        }
    }
}

ALWAYS_INLINE void decode_dot_rows(const aqlm_block_shape *s, int64_t o0, int64_t o1, int64_t n,
                                   const float *restrict x, const void *restrict codes,
                                   const aqlm_dtype dtype, const void *restrict cb, float *restrict acc) {
    const int64_t ig = s->ig, M = s->M, K = s->K, G = s->in_groups, in = G * ig;
    const int code_bits = s->code_bits;
    const uint32_t mask = s->code_mask;
    for (int64_t o = o0; o < o1; o++) {
        __m512 sums[AQLM_DECODE_DOT_MAX_TOKENS];
        for (int64_t t = 0; t < n; t++) sums[t] = _mm512_setzero_ps();
        const int64_t row_codes = o * G * M;
        for (int64_t j = 0; j < G; j++) {
            for (int64_t i0 = 0; i0 < ig; i0 += 16) {
                __m512 word = _mm512_setzero_ps();
                for (int64_t m = 0; m < M; m++) {
                    const uint32_t code = aqlm_code_at(code_bits, codes, row_codes + j * M + m, mask);
                    word = _mm512_add_ps(word, load16(dtype, cb, (m * K + code) * ig + i0));
                }
                for (int64_t t = 0; t < n; t++)
                    sums[t] = _mm512_fmadd_ps(word, _mm512_loadu_ps(x + t * in + j * ig + i0), sums[t]);
            }
        }
        for (int64_t t = 0; t < n; t++) acc[(o - o0) * n + t] = _mm512_reduce_add_ps(sums[t]);
    }
}

static void decode_dot_avx512(const aqlm_block_shape *s, int64_t o0, int64_t o1, int64_t n,
                              const float *restrict x, const void *restrict codes, aqlm_dtype cb_dtype,
                              const void *restrict cb, float *restrict acc) {
    if (s->og != 1 || s->ig % 16 != 0 || n < 1 || n > AQLM_DECODE_DOT_MAX_TOKENS) {
        aqlm_decode_dot_avx2(s, o0, o1, n, x, codes, cb_dtype, cb, acc);
        return;
    }
    if (cb_dtype == AQLM_F32) decode_dot_rows(s, o0, o1, n, x, codes, AQLM_F32, cb, acc);
    else if (cb_dtype == AQLM_F16) decode_dot_rows(s, o0, o1, n, x, codes, AQLM_F16, cb, acc);
    else decode_dot_rows(s, o0, o1, n, x, codes, AQLM_BF16, cb, acc);
}

/* ---- top-1 scores over codewords ------------------------------------------------------------ */

/* Top-1 search without per-codeword index bookkeeping: each lane keeps only its running minimum
 * (one vminps per score vector) and, per chunk of TOP1_CHUNK codewords, whether that minimum
 * strictly dropped in the chunk (then it remembers the chunk). The first codeword holding the
 * overall minimum lies in the earliest chunk remembered by a lane holding it; that one chunk is
 * scored again at the end to find the codeword. Every score is accumulated exactly as the
 * reference does (bias, then fma over d = 0, 1, ...), so the rescan finds the same bits. */
enum { TOP1_CHUNK = 256 };  /* codewords per chunk, a multiple of 32 */
enum { TOP1_QUERIES = 4 }; /* queries per pass over a block of codewords */

/* Scores of QB queries for the 32 codewords from c (two vectors each): bias, then fma over
 * d = 0, 1, ... exactly as the reference accumulates; QB * 2 independent FMA chains. */
ALWAYS_INLINE void score32(const int QB, int64_t D, int64_t K, int64_t c, const float *restrict q,
                           const float *restrict ct, const float *restrict bias, __m512 acc[][2]) {
    const __m512 b0 = _mm512_loadu_ps(bias + c), b1 = _mm512_loadu_ps(bias + c + 16);
    for (int t = 0; t < QB; t++) acc[t][0] = b0, acc[t][1] = b1;
    for (int64_t d = 0; d < D; d++) {
        const __m512 w0 = _mm512_loadu_ps(ct + d * K + c), w1 = _mm512_loadu_ps(ct + d * K + c + 16);
        for (int t = 0; t < QB; t++) {
            const __m512 qd = _mm512_set1_ps(q[t * D + d]);
            acc[t][0] = _mm512_fmadd_ps(qd, w0, acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(qd, w1, acc[t][1]);
        }
    }
}
enum { TOP1_CHUNKED_MIN_K = 32 * TOP1_CHUNK }; /* from here the one-chunk rescan costs at most 1/32 */

/* QB queries over codewords [c0, c1) (multiples of 32), 32 codewords (two vectors) per step:
 * QB * 2 independent FMA chains. Where this range's minimum is strictly below value[t], sets
 * value[t] to it and chunk[t] to the start of the chunk holding its first occurrence; so across
 * calls in ascending ranges the earliest range wins ties. A vminps with the new score first keeps
 * the running minimum when the score is NaN, as the reference's strict < does. */
ALWAYS_INLINE void top1_chunks(const int QB, int64_t D, int64_t K, int64_t c0, int64_t c1,
                               const float *restrict q, const float *restrict ct, const float *restrict bias,
                               float *restrict value, int32_t *restrict chunk) {
    __m512 best[TOP1_QUERIES], before[TOP1_QUERIES]; /* fixed sizes, not VLAs: kept in registers */
    __m512i best_chunk[TOP1_QUERIES];
    for (int t = 0; t < QB; t++)
        best[t] = before[t] = _mm512_set1_ps(INFINITY), best_chunk[t] = _mm512_set1_epi32(-1);
    for (int64_t c = c0; c < c1; c += TOP1_CHUNK) {
        const int64_t end = c + TOP1_CHUNK < c1 ? c + TOP1_CHUNK : c1;
        for (int64_t cc = c; cc < end; cc += 32) {
            __m512 acc[TOP1_QUERIES][2];
            score32(QB, D, K, cc, q, ct, bias, acc);
            for (int t = 0; t < QB; t++) {
                best[t] = _mm512_min_ps(acc[t][0], best[t]);
                best[t] = _mm512_min_ps(acc[t][1], best[t]);
            }
        }
        const __m512i here = _mm512_set1_epi32((int)c);
        for (int t = 0; t < QB; t++) {
            const __mmask16 dropped = _mm512_cmp_ps_mask(best[t], before[t], _CMP_LT_OQ);
            best_chunk[t] = _mm512_mask_mov_epi32(best_chunk[t], dropped, here);
            before[t] = best[t];
        }
    }
    for (int t = 0; t < QB; t++) {
        const float smallest = _mm512_reduce_min_ps(best[t]);
        if (!(smallest < value[t])) continue;
        const __mmask16 holders = _mm512_cmp_ps_mask(best[t], _mm512_set1_ps(smallest), _CMP_EQ_OQ);
        value[t] = smallest;
        chunk[t] = _mm512_mask_reduce_min_epi32(holders, best_chunk[t]);
    }
}

/* The first codeword in the chunk starting at c0 whose score is exactly `value`, or -1. */
static int32_t top1_find(int64_t D, int64_t K, const float *restrict q, const float *restrict ct,
                         const float *restrict bias, int64_t c0, float value) {
    const int64_t c1 = c0 + TOP1_CHUNK < K ? c0 + TOP1_CHUNK : K;
    const __m512 target = _mm512_set1_ps(value);
    for (int64_t c = c0; c < c1; c += 16) {
        __m512 acc = _mm512_loadu_ps(bias + c);
        for (int64_t d = 0; d < D; d++) acc = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), _mm512_loadu_ps(ct + d * K + c), acc);
        const __mmask16 equal = _mm512_cmp_ps_mask(acc, target, _CMP_EQ_OQ);
        if (equal) return (int32_t)(c + __builtin_ctz((unsigned)equal));
    }
    return -1;
}

/* ---- top-1 for small codebooks: per-lane minimum and its index ---------------------------------
 *
 * Per-lane running minimum of QB queries over codewords [c0, c1) (a multiple of 32), 32 codewords
 * (two vectors) per step: QB * 2 independent FMA chains, each score accumulated exactly as the
 * reference does (bias, then fma over d = 0, 1, ...). A lane takes a new value only when strictly
 * smaller, so it keeps the first minimum among its codewords. */
ALWAYS_INLINE void top1_lanes(const int QB, int64_t D, int64_t K, int64_t c0, int64_t c1,
                              const float *restrict q, const float *restrict ct, const float *restrict bias,
                              __m512 *restrict best, __m512i *restrict best_index) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t c = c0; c < c1; c += 32) {
        __m512 acc[TOP1_QUERIES][2]; /* fixed size, not a VLA: kept in registers */
        score32(QB, D, K, c, q, ct, bias, acc);
        const __m512i index0 = _mm512_add_epi32(iota, _mm512_set1_epi32((int)c));
        const __m512i index1 = _mm512_add_epi32(index0, _mm512_set1_epi32(16));
        for (int t = 0; t < QB; t++) {
            const __mmask16 better0 = _mm512_cmp_ps_mask(acc[t][0], best[t], _CMP_LT_OQ);
            best[t] = _mm512_mask_mov_ps(best[t], better0, acc[t][0]);
            best_index[t] = _mm512_mask_mov_epi32(best_index[t], better0, index0);
            const __mmask16 better1 = _mm512_cmp_ps_mask(acc[t][1], best[t], _CMP_LT_OQ);
            best[t] = _mm512_mask_mov_ps(best[t], better1, acc[t][1]);
            best_index[t] = _mm512_mask_mov_epi32(best_index[t], better1, index1);
        }
    }
}

/* The smallest lane value and, among the lanes holding it, the smallest index (lanes that never
 * took a value hold index -1 and are skipped): the answer of a sequential strict-< scan. */
ALWAYS_INLINE void top1_reduce(__m512 best, __m512i best_index, float *value, int32_t *index) {
    const __mmask16 taken = _mm512_cmpge_epi32_mask(best_index, _mm512_setzero_si512());
    if (!taken) return;
    const float smallest = _mm512_mask_reduce_min_ps(taken, best);
    const __mmask16 holders = taken & _mm512_cmp_ps_mask(best, _mm512_set1_ps(smallest), _CMP_EQ_OQ);
    *value = smallest;
    *index = _mm512_mask_reduce_min_epi32(holders, best_index);
}

enum { TOP1_BLOCK_FLOATS = 8192 }; /* D x block codewords of ct kept in L1 (32 KiB) across all queries */

/* Small codebooks (the rescan of one chunk per query would cost too much there): codewords in
 * blocks that stay in L1, queries four at a time, each lane tracking its minimum's index. Each
 * block's winner is merged with a strict <, so earlier blocks win ties, as in one scan. */
static void top1_indexed(int64_t n, int64_t D, int64_t K, const float *restrict q, const float *restrict ct,
                         const float *restrict bias, float *restrict values, int32_t *restrict indices) {
    int64_t block = TOP1_BLOCK_FLOATS / (D > 0 ? D : 1) / 32 * 32;
    if (block < 32) block = 32;
    for (int64_t c0 = 0; c0 < K; c0 += block) {
        const int64_t c1 = c0 + block < K ? c0 + block : K;
        int64_t row = 0;
        for (; row + TOP1_QUERIES <= n; row += TOP1_QUERIES) {
            __m512 best[TOP1_QUERIES];
            __m512i best_index[TOP1_QUERIES];
            for (int t = 0; t < TOP1_QUERIES; t++) best[t] = _mm512_set1_ps(INFINITY), best_index[t] = _mm512_set1_epi32(-1);
            top1_lanes(TOP1_QUERIES, D, K, c0, c1, q + row * D, ct, bias, best, best_index);
            for (int t = 0; t < TOP1_QUERIES; t++) {
                float value = INFINITY;
                int32_t index = -1;
                top1_reduce(best[t], best_index[t], &value, &index);
                if (index >= 0) aqlm_topk_insert(1, values + row + t, indices + row + t, value, index);
            }
        }
        for (; row < n; row++) {
            __m512 best[1] = {_mm512_set1_ps(INFINITY)};
            __m512i best_index[1] = {_mm512_set1_epi32(-1)};
            top1_lanes(1, D, K, c0, c1, q + row * D, ct, bias, best, best_index);
            float value = INFINITY;
            int32_t index = -1;
            top1_reduce(best[0], best_index[0], &value, &index);
            if (index >= 0) aqlm_topk_insert(1, values + row, indices + row, value, index);
        }
    }
}

/* k = 1 with K a multiple of 32. Large codebooks: codewords in blocks that stay in L1, queries
 * four at a time, lanes tracking chunks; indices[row] holds the winning chunk until the end, then
 * the codeword found in it. */
static void topk_scores_avx512(int64_t n, int64_t D, int64_t K, int64_t k, const float *restrict q,
                               const float *restrict ct, const float *restrict bias, float *restrict values,
                               int32_t *restrict indices) {
    if (k != 1 || K % 32 != 0) {
        aqlm_topk_scores_avx2(n, D, K, k, q, ct, bias, values, indices);
        return;
    }
    for (int64_t row = 0; row < n; row++) values[row] = INFINITY, indices[row] = -1;
    if (K < TOP1_CHUNKED_MIN_K) {
        top1_indexed(n, D, K, q, ct, bias, values, indices);
        return;
    }
    int64_t block = TOP1_BLOCK_FLOATS / (D > 0 ? D : 1) / TOP1_CHUNK * TOP1_CHUNK;
    if (block < TOP1_CHUNK) block = TOP1_CHUNK;
    for (int64_t c0 = 0; c0 < K; c0 += block) {
        const int64_t c1 = c0 + block < K ? c0 + block : K;
        int64_t row = 0;
        for (; row + TOP1_QUERIES <= n; row += TOP1_QUERIES) top1_chunks(TOP1_QUERIES, D, K, c0, c1, q + row * D, ct, bias, values + row, indices + row);
        for (; row < n; row++) top1_chunks(1, D, K, c0, c1, q + row * D, ct, bias, values + row, indices + row);
    }
    for (int64_t row = 0; row < n; row++)
        if (indices[row] >= 0) indices[row] = top1_find(D, K, q + row * D, ct, bias, indices[row], values[row]);
}

/* ---- gradient update ------------------------------------------------------------------------- */

enum { GRADIENT_ROWS = 3 }; /* rows per pass over H: 3 x 8 deltas, 3 sums and a slice of H fill the registers */

/* g_r -= delta_r H for R <= GRADIENT_ROWS rows and in_group_size 8: the R x 8 deltas stay in registers, every
 * 16-column slice of H is loaded once for the R rows; the tail columns are masked. */
ALWAYS_INLINE void gradient_update_ig8_rows(const int R, int64_t width, const float *restrict delta,
                                            const float *restrict h, float *const *restrict g_rows) {
    __m512 d[GRADIENT_ROWS][8]; /* fixed sizes, not VLAs: kept in registers */
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 8; i++) d[r][i] = _mm512_set1_ps(delta[r * 8 + i]);
    for (int64_t col = 0; col < width; col += 16) {
        const __mmask16 mask = width - col >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (width - col)) - 1u);
        __m512 acc[GRADIENT_ROWS];
        for (int r = 0; r < R; r++) acc[r] = _mm512_maskz_loadu_ps(mask, g_rows[r] + col);
        for (int i = 0; i < 8; i++) {
            const __m512 hv = _mm512_maskz_loadu_ps(mask, h + i * width + col);
            for (int r = 0; r < R; r++) acc[r] = _mm512_fnmadd_ps(d[r][i], hv, acc[r]);
        }
        for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(g_rows[r] + col, mask, acc[r]);
    }
}

static void gradient_update_avx512(int64_t n, int64_t ig, int64_t width, const float *restrict delta,
                                   const float *restrict h, float *const *restrict g_rows) {
    if (ig != 8) {
        aqlm_gradient_update_avx2(n, ig, width, delta, h, g_rows);
        return;
    }
    int64_t row = 0;
    for (; row + GRADIENT_ROWS <= n; row += GRADIENT_ROWS)
        gradient_update_ig8_rows(GRADIENT_ROWS, width, delta + row * 8, h, g_rows + row);
    for (; row < n; row++) gradient_update_ig8_rows(1, width, delta + row * 8, h, g_rows + row);
}

/* ---- codeword norms -------------------------------------------------------------------------- */

/* 32 codewords from c (four vectors of eight doubles): the reference's operations lane by lane
 * (products rounded, then added, in the order r, i, t), four independent chains. */
ALWAYS_INLINE void codeword_norms_32(int64_t c, int64_t ct_stride, int64_t og, int64_t ig, const float *restrict ct,
                                     const float *restrict h, int64_t h_stride, float *restrict out) {
    __m512d norm[4];
    for (int u = 0; u < 4; u++) norm[u] = _mm512_setzero_pd();
    for (int64_t r = 0; r < og; r++) {
        const float *w = ct + r * ig * ct_stride + c;
        for (int64_t i = 0; i < ig; i++) {
            __m512d wi[4];
            for (int u = 0; u < 4; u++) wi[u] = _mm512_cvtps_pd(_mm256_loadu_ps(w + i * ct_stride + 8 * u));
            if (h == NULL) {
                for (int u = 0; u < 4; u++) norm[u] = _mm512_add_pd(norm[u], _mm512_mul_pd(wi[u], wi[u]));
                continue;
            }
            __m512d hw[4];
            for (int u = 0; u < 4; u++) hw[u] = _mm512_setzero_pd();
            for (int64_t t = 0; t < ig; t++) {
                const __m512d ht = _mm512_set1_pd((double)h[i * h_stride + t]);
                for (int u = 0; u < 4; u++)
                    hw[u] = _mm512_add_pd(hw[u], _mm512_mul_pd(ht, _mm512_cvtps_pd(_mm256_loadu_ps(w + t * ct_stride + 8 * u))));
            }
            for (int u = 0; u < 4; u++) norm[u] = _mm512_add_pd(norm[u], _mm512_mul_pd(wi[u], hw[u]));
        }
    }
    for (int u = 0; u < 4; u++) _mm256_storeu_ps(out + 8 * u, _mm512_cvtpd_ps(norm[u]));
}

static void codeword_norms_avx512(int64_t c0, int64_t c1, int64_t ct_stride, int64_t og, int64_t ig,
                                  const float *restrict ct, const float *restrict h, int64_t h_stride,
                                  float *restrict norms) {
    int64_t c = c0;
    for (; c + 32 <= c1; c += 32) codeword_norms_32(c, ct_stride, og, ig, ct, h, h_stride, norms + (c - c0));
    aqlm_codeword_norms_ref(c, c1, ct_stride, og, ig, ct, h, h_stride, norms + (c - c0));
}

const aqlm_kernels aqlm_kernels_avx512 = {
    .level = AQLM_SIMD_AVX512,
    .lut_build_t1 = lut_build_t1_avx512,
    .lut_build_t8 = aqlm_lut_build_t8_avx2,
    .lut_accumulate_t1 = aqlm_lut_accumulate_t1_avx2,
    .lut_accumulate_t8 = aqlm_lut_accumulate_t8_avx2,
    .decode_dot = decode_dot_avx512,
    .dequant_rows = aqlm_dequant_rows_avx2,
    .topk_scores = topk_scores_avx512,
    .gradient_update = gradient_update_avx512,
    .codeword_norms = codeword_norms_avx512,
};

#else /* built without AVX-512: a scalar table that aqlm_kernels_for never returns for AVX-512 */

const aqlm_kernels aqlm_kernels_avx512 = {
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

#endif
