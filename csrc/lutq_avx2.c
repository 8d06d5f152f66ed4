/*
 * lutq_avx2.c - AVX2 quantized-table kernels (definitions in lutq.h): vpshufb lookups.
 *
 * vpshufb looks up 32 bytes in a 16-entry table (per 128-bit lane). Codebooks of up to 16
 * codewords (Kx4 schemes) take one shuffle per 32 rows; larger ones take one per 16-entry slice of
 * the table, indexed by the code's low nibble, and a tree of vpblendvb on the code's higher bits
 * picks each row's slice: for 256 codewords 16 shuffles and 15 blends per 32 lookups. (An earlier
 * version OR-ed the slices, each shuffled by (code - 16h) + 0x70 with unsigned saturation so that
 * out-of-slice codes gave 0: 64 operations per 32 lookups against 31 now.) Each code is looked up
 * in the high-byte and the low-byte table, which share the nibble and the blend masks. The tables
 * of these kernels hold their bytes offset by 128 (u = v + 128, 0 <= u <= 255), so a looked-up
 * vector read as uint16 words holds 256 * u(odd row)
 * + u(even row); the sums of the words and of the words shifted right by 8, modulo 2**16, give
 * both rows' sums exactly for up to 256 groups a step (as in lutq_avx512vbmi.c, lutq.h).
 * Also used on AVX-512 CPUs without VBMI or VNNI.
 */
#include <math.h>

#include "lutq.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))
_Static_assert(AQLM_LUTQ_LOW_RADIX == 256, "combine() multiplies by the radix with a shift by 8");

/* 32 entries of one table as E + ENTRY_OFFSET in int32 (four vectors of 8, in order) -> their
 * offset high and low bytes (lutq.h), in order: the two bytes of E + ENTRY_OFFSET as uint16, whose
 * unsigned saturation holds E to [-ENTRY_OFFSET, LEVELS] as the reference does. */
ALWAYS_INLINE void split_entries(const __m256i u[4], int8_t *restrict high, int8_t *restrict low) {
    const __m256i low_byte = _mm256_set1_epi16(0xff), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i first = _mm256_packus_epi32(u[0], u[1]), second = _mm256_packus_epi32(u[2], u[3]);
    const __m256i hi_bytes = _mm256_packus_epi16(_mm256_srli_epi16(first, 8), _mm256_srli_epi16(second, 8));
    const __m256i lo_bytes = _mm256_packus_epi16(_mm256_and_si256(first, low_byte), _mm256_and_si256(second, low_byte));
    _mm256_storeu_si256((__m256i *)high, _mm256_permutevar8x32_epi32(hi_bytes, order));
    _mm256_storeu_si256((__m256i *)low, _mm256_permutevar8x32_epi32(lo_bytes, order));
}

/* Every byte of `count` XOR 0x80: int8 v -> the offset byte v + 128. */
static void offset_bytes(int8_t *restrict bytes, int64_t count) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    int64_t at = 0;
    for (; at + 32 <= count; at += 32)
        _mm256_storeu_si256((__m256i *)(bytes + at), _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(bytes + at)), flip));
    for (; at < count; at++) bytes[at] = (int8_t)((uint8_t)bytes[at] ^ 0x80u);
}

void aqlm_lutq_input_pairs_avx2(int64_t ig, const float *restrict group, const float *restrict step, float inverse,
                                int shift, uint32_t *restrict pairs) {
    const __m256 scale = _mm256_set1_ps(inverse), unit = _mm256_set1_ps((float)(1 << shift));
    const __m256i most = _mm256_set1_epi32(AQLM_LUTQ_X_LEVELS), least = _mm256_set1_epi32(-AQLM_LUTQ_X_LEVELS);
    int32_t xq[2 * AQLM_LUTQ_MAX_PAIRS + 8];
    int64_t i = 0;
    for (; i + 8 <= ig; i += 8) { /* cvtps2dq gives INT32_MIN out of range, as aqlm_lutq_round_input */
        const __m256 w = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(step + i), scale), unit);
        const __m256i rounded = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(group + i), w));
        _mm256_storeu_si256((__m256i *)(xq + i), _mm256_min_epi32(_mm256_max_epi32(rounded, least), most));
    }
    for (; i < ig; i++) xq[i] = aqlm_lutq_round_input(group[i], step[i], inverse, shift);
    if (ig % 2) xq[ig] = 0;
    for (int64_t p = 0; p < aqlm_lutq_pairs(ig); p++)
        pairs[p] = (uint32_t)(uint16_t)(int16_t)xq[2 * p] | (uint32_t)(uint16_t)(int16_t)xq[2 * p + 1] << 16;
}

/* E + ENTRY_OFFSET (int32) of codewords c..c+7 of codebook m: integer products of pairs (vpmaddwd),
 * exact, then the shift of lutq.h. */
ALWAYS_INLINE __m256i entries8(int64_t pairs, int64_t K, int64_t c, const int16_t *restrict cq, const uint32_t *restrict xq,
                               int shift) {
    __m256i total = _mm256_setzero_si256();
    for (int64_t p = 0; p < pairs; p++)
        total = _mm256_add_epi32(total, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(cq + (p * K + c) * 2)),
                                                          _mm256_set1_epi32((int)xq[p])));
    const __m256i entry = _mm256_srai_epi32(_mm256_add_epi32(total, _mm256_set1_epi32(1 << (shift - 1))), shift);
    return _mm256_add_epi32(entry, _mm256_set1_epi32(AQLM_LUTQ_ENTRY_OFFSET));
}

/* Tables as the reference makes them, into offset bytes (lutq.h); 32 entries at a time go
 * from registers to bytes, the rest (K of 8 or 16) one by one. */
void aqlm_lutq_tables_offset_avx2(const aqlm_block_shape *s, int64_t j0, int64_t j1, const float *restrict x,
                                  const float *restrict prepared, const float *restrict inverse, int8_t *restrict qhi,
                                  int8_t *restrict qlo) {
    const int64_t ig = s->ig, M = s->M, K = s->K, KS = aqlm_lutq_table_stride(K), pairs = aqlm_lutq_pairs(ig);
    if (K % 8 != 0) {
        aqlm_lutq_tables_ref(s, j0, j1, x, prepared, inverse, qhi, qlo);
        offset_bytes(qhi, (j1 - j0) * M * KS);
        offset_bytes(qlo, (j1 - j0) * M * KS);
        return;
    }
    const int shift = aqlm_lutq_entry_shift(ig);
    const int16_t *cq = (const int16_t *)prepared;
    const float *step = prepared + aqlm_lutq_prepared_step(s);
    uint32_t xq[AQLM_LUTQ_MAX_PAIRS];
    for (int64_t j = j0; j < j1; j++)
        for (int64_t m = 0; m < M; m++) {
            aqlm_lutq_input_pairs_avx2(ig, x + j * ig, step + m * ig, inverse[m], shift, xq);
            const int16_t *codebook = cq + m * pairs * K * 2;
            int8_t *high = qhi + ((j - j0) * M + m) * KS, *low = qlo + ((j - j0) * M + m) * KS;
            int64_t c = 0;
            for (; c + 32 <= K; c += 32) {
                __m256i u[4];
                for (int k = 0; k < 4; k++) u[k] = entries8(pairs, K, c + 8 * k, codebook, xq, shift);
                split_entries(u, high + c, low + c);
            }
            for (; c < K; c += 8) {
                int32_t row[8];
                _mm256_storeu_si256((__m256i *)row, entries8(pairs, K, c, codebook, xq, shift));
                for (int k = 0; k < 8; k++) {
                    const int32_t u = row[k] < 0 ? 0 : row[k] > 0xffff ? 0xffff : row[k]; /* the saturation of split_entries */
                    high[c + k] = (int8_t)(uint8_t)(u >> 8);
                    low[c + k] = (int8_t)(uint8_t)(u & 0xff);
                }
            }
            for (; c < KS; c++) high[c] = low[c] = (int8_t)0x80; /* the offset form of 0 */
        }
}

/* 32 int8 lookups in the table at `table` of codes < 16 * slices, given as their low nibbles
 * and `select` (select[d]: the code shifted left by 3 - d, so that bit 7 of each byte holds the
 * code's bit 4 + d, which vpblendvb reads): one shuffle per 16-entry slice by the low nibble,
 * then a tree of blends picks the slice, pairs of slices on bit 4, pairs of pairs on bit 5, and
 * so on. tree<N>(first) covers slices [first, first + N); each level is its own function so that
 * every index is a constant and the tree unrolls into registers. */
ALWAYS_INLINE __m256i tree1(int first, __m256i low_nibble, const __m256i select[4], const int8_t *restrict table) {
    (void)select;
    return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(table + 16 * first))), low_nibble);
}
ALWAYS_INLINE __m256i tree2(int first, __m256i low_nibble, const __m256i select[4], const int8_t *restrict table) {
    return _mm256_blendv_epi8(tree1(first, low_nibble, select, table), tree1(first + 1, low_nibble, select, table), select[0]);
}
ALWAYS_INLINE __m256i tree4(int first, __m256i low_nibble, const __m256i select[4], const int8_t *restrict table) {
    return _mm256_blendv_epi8(tree2(first, low_nibble, select, table), tree2(first + 2, low_nibble, select, table), select[1]);
}
ALWAYS_INLINE __m256i tree8(int first, __m256i low_nibble, const __m256i select[4], const int8_t *restrict table) {
    return _mm256_blendv_epi8(tree4(first, low_nibble, select, table), tree4(first + 4, low_nibble, select, table), select[2]);
}
ALWAYS_INLINE __m256i tree16(__m256i low_nibble, const __m256i select[4], const int8_t *restrict table) {
    return _mm256_blendv_epi8(tree8(0, low_nibble, select, table), tree8(8, low_nibble, select, table), select[3]);
}

ALWAYS_INLINE __m256i lookup32(const int slices, __m256i low_nibble, const __m256i select[4], const int8_t *restrict table) {
    switch (slices) {
    case 1: return tree1(0, low_nibble, select, table);
    case 2: return tree2(0, low_nibble, select, table);
    case 4: return tree4(0, low_nibble, select, table);
    case 8: return tree8(0, low_nibble, select, table);
    default: return tree16(low_nibble, select, table);
    }
}

/* 256 * high + low in int32 of 8 rows' offset sums (uint16, header), the offsets removed (exact: lutq.h). */
ALWAYS_INLINE __m256i combine(__m128i high, __m128i low, __m256i offsets) {
    const __m256i hi = _mm256_sub_epi32(_mm256_cvtepu16_epi32(high), offsets), lo = _mm256_sub_epi32(_mm256_cvtepu16_epi32(low), offsets);
    return _mm256_add_epi32(_mm256_slli_epi32(hi, 8), lo); /* 256 = AQLM_LUTQ_LOW_RADIX */
}

/* The 16 int32 sums of rows 0..15 of a half tile from its even rows (0, 2, .., 14) and odd rows
 * (1, 3, .., 15), stored in row order at out. */
ALWAYS_INLINE void store_rows(__m256i even, __m256i odd, int32_t *restrict out) {
    const __m256i a = _mm256_unpacklo_epi32(even, odd), b = _mm256_unpackhi_epi32(even, odd); /* per 128-bit lane */
    _mm256_storeu_si256((__m256i *)out, _mm256_permute2x128_si256(a, b, 0x20));
    _mm256_storeu_si256((__m256i *)(out + 8), _mm256_permute2x128_si256(a, b, 0x31));
}

ALWAYS_INLINE void accumulate_avx2(const int slices, const aqlm_block_shape *s, int64_t group, int64_t j0, int64_t j1,
                                   int64_t tiles, const uint8_t *restrict packed, int64_t n, const int8_t *restrict qhi,
                                   const int8_t *restrict qlo, int32_t *restrict partials, int64_t stride) {
    const int64_t M = s->M, G = s->in_groups, KS = aqlm_lutq_table_stride(s->K);
    const int nibbles = aqlm_lutq_nibbles(s);
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const int64_t line = (nibbles ? M / 2 : M) * AQLM_LUTQ_TILE;
    for (int64_t tile = 0; tile < tiles; tile++) {
        const uint8_t *codes = packed + tile * G * line;
        for (int64_t b = j0 / group; b * group < j1; b++) {
            const int64_t piece = b - j0 / group;
            int64_t from, to;
            aqlm_lutq_piece_bounds(b, group, j0, j1, &from, &to);
            const int64_t ahead = aqlm_lutq_next_piece_offset(1, from, to, j0, j1, line, G * line);
            for (int64_t t = 0; t < n; t++) {
                const int8_t *high = qhi + t * G * M * KS, *low = qlo + t * G * M * KS;
                for (int64_t m = 0; m < M; m++) {
                    int32_t *out = partials + ((piece * n + t) * M + m) * stride + tile * AQLM_LUTQ_TILE;
                    for (int half = 0; half < 2; half++) {
                        __m256i words_hi = _mm256_setzero_si256(), odd_hi = words_hi, words_lo = words_hi, odd_lo = words_hi;
                        for (int64_t j = from; j < to; j++) {
                            const int64_t slot = j * M + m;
                            const uint8_t *code_line = codes + (nibbles ? slot / 2 : slot) * AQLM_LUTQ_TILE;
                            if (half == 0) aqlm_lutq_prefetch(code_line, ahead);
                            __m256i idx;
                            if (nibbles) { /* two codes per byte: slot m even in the low nibble, m + 1 in the high */
                                idx = _mm256_loadu_si256((const __m256i *)(code_line + half * 32));
                                idx = _mm256_and_si256(m % 2 ? _mm256_srli_epi16(idx, 4) : idx, low4);
                            } else {
                                idx = _mm256_loadu_si256((const __m256i *)(code_line + half * 32));
                            }
                            const __m256i low_nibble = slices == 1 ? idx : _mm256_and_si256(idx, low4);
                            const __m256i select[4] = {_mm256_slli_epi16(idx, 3), _mm256_slli_epi16(idx, 2),
                                                       _mm256_slli_epi16(idx, 1), idx};
                            const __m256i h = lookup32(slices, low_nibble, select, high + slot * KS);
                            const __m256i l = lookup32(slices, low_nibble, select, low + slot * KS);
                            words_hi = _mm256_add_epi16(words_hi, h);
                            odd_hi = _mm256_add_epi16(odd_hi, _mm256_srli_epi16(h, 8));
                            words_lo = _mm256_add_epi16(words_lo, l);
                            odd_lo = _mm256_add_epi16(odd_lo, _mm256_srli_epi16(l, 8));
                        }
                        /* uint16 lane w of even (odd) holds row 2w (2w + 1) of the half */
                        const __m256i even_hi = _mm256_sub_epi16(words_hi, _mm256_slli_epi16(odd_hi, 8));
                        const __m256i even_lo = _mm256_sub_epi16(words_lo, _mm256_slli_epi16(odd_lo, 8));
                        const __m256i offsets = _mm256_set1_epi32((int)(128 * (to - from)));
                        int32_t *rows = out + half * 32;
                        store_rows(combine(_mm256_castsi256_si128(even_hi), _mm256_castsi256_si128(even_lo), offsets),
                                   combine(_mm256_castsi256_si128(odd_hi), _mm256_castsi256_si128(odd_lo), offsets), rows);
                        store_rows(combine(_mm256_extracti128_si256(even_hi, 1), _mm256_extracti128_si256(even_lo, 1), offsets),
                                   combine(_mm256_extracti128_si256(odd_hi, 1), _mm256_extracti128_si256(odd_lo, 1), offsets), rows + 16);
                    }
                }
            }
        }
    }
}

static void lutq_accumulate_avx2(const aqlm_block_shape *s, int64_t group, int64_t j0, int64_t j1, int64_t tiles,
                                 const uint8_t *restrict packed, int64_t n, const int8_t *restrict qhi,
                                 const int8_t *restrict qlo, int32_t *restrict partials, int64_t stride) {
    switch (aqlm_lutq_table_stride(s->K) / 16) {
    case 1: accumulate_avx2(1, s, group, j0, j1, tiles, packed, n, qhi, qlo, partials, stride); break;
    case 2: accumulate_avx2(2, s, group, j0, j1, tiles, packed, n, qhi, qlo, partials, stride); break;
    case 4: accumulate_avx2(4, s, group, j0, j1, tiles, packed, n, qhi, qlo, partials, stride); break;
    case 8: accumulate_avx2(8, s, group, j0, j1, tiles, packed, n, qhi, qlo, partials, stride); break;
    default: accumulate_avx2(16, s, group, j0, j1, tiles, packed, n, qhi, qlo, partials, stride); break;
    }
}

/* The reference's fma chain, 8 rows at a time (the FMA rounds once, as fmaf does). */
void aqlm_lutq_finish_avx2(int64_t M, int64_t chunks, const int64_t *restrict first, int64_t n,
                           const int32_t *restrict partials, int64_t stride, int64_t row0, int64_t row1,
                           const float *restrict qscale, float *restrict acc) {
    for (int64_t t = 0; t < n; t++)
        for (int64_t row = row0; row < row1; row += 8) {
            __m256 sum = _mm256_setzero_ps();
            for (int64_t b = 0; b < chunks; b++)
                for (int64_t m = 0; m < M; m++) {
                    __m256i total = _mm256_setzero_si256();
                    for (int64_t k = first[b]; k < first[b + 1]; k++)
                        total = _mm256_add_epi32(total, _mm256_loadu_si256((const __m256i *)(partials + ((k * n + t) * M + m) * stride + row)));
                    sum = _mm256_fmadd_ps(_mm256_set1_ps(qscale[(t * chunks + b) * M + m]), _mm256_cvtepi32_ps(total), sum);
                }
            _mm256_storeu_ps(acc + t * stride + row, sum);
        }
}

const aqlm_lutq_kernels aqlm_lutq_kernels_avx2 = {
    .name = "avx2",
    .tables = aqlm_lutq_tables_offset_avx2,
    .accumulate = lutq_accumulate_avx2,
    .finish = aqlm_lutq_finish_avx2,
};

#else /* built without AVX2: never chosen */

void aqlm_lutq_tables_offset_avx2(const aqlm_block_shape *s, int64_t j0, int64_t j1, const float *restrict x,
                                  const float *restrict prepared, const float *restrict inverse, int8_t *restrict qhi,
                                  int8_t *restrict qlo) {
    aqlm_lutq_tables_ref(s, j0, j1, x, prepared, inverse, qhi, qlo);
    for (int64_t at = 0; at < (j1 - j0) * s->M * aqlm_lutq_table_stride(s->K); at++) {
        qhi[at] = (int8_t)((uint8_t)qhi[at] ^ 0x80u);
        qlo[at] = (int8_t)((uint8_t)qlo[at] ^ 0x80u);
    }
}

void aqlm_lutq_finish_avx2(int64_t M, int64_t chunks, const int64_t *restrict first, int64_t n,
                           const int32_t *restrict partials, int64_t stride, int64_t row0, int64_t row1,
                           const float *restrict qscale, float *restrict acc) {
    aqlm_lutq_finish_ref(M, chunks, first, n, partials, stride, row0, row1, qscale, acc);
}

const aqlm_lutq_kernels aqlm_lutq_kernels_avx2 = {.name = NULL,
                                                  .tables = aqlm_lutq_tables_ref,
                                                  .accumulate = aqlm_lutq_accumulate_ref,
                                                  .finish = aqlm_lutq_finish_ref};

#endif
