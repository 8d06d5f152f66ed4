/*
 * lutq_avx512vbmi.c - AVX-512 VBMI quantized-table kernels (definitions in lutq.h).
 *
 * vpermb looks up 64 bytes in a 64-entry table held in one register, vpermi2b in a 128-entry
 * table held in two; a 256-entry table is two vpermi2b (entries 0-127 and 128-255) blended on
 * the code's top bit. One lookup instruction thus serves 64 output rows. Each code is looked up
 * in the high-byte and the low-byte table; the eight registers of a (group, codebook) table pair
 * are loaded once for TILE_STEP tiles. These kernels store every table byte offset by 128 (the
 * unsigned byte u = v + 128, 0 <= u <= 255), so a looked-up vector read as 32 uint16 words holds
 * 256 * u(odd row) + u(even row): two sums per table, of the words and of the words shifted right
 * by 8, both modulo 2**16, give both rows' sums exactly (three instructions per lookup instead of
 * five sign extensions and adds), since a piece sums at most 256 groups and 255 * 256 < 2**16:
 *     odd = sum of (word >> 8),   even = (sum of words) - 256 * odd   (mod 2**16),
 * and the true sums are even - 128 * groups and odd - 128 * groups. They are combined as
 * 256 * high + low in int32: one exact partial sum per piece of a chunk, codebook and row
 * (lutq.h), the same integers as the reference's, which the driver's final pass scales to fp32.
 * Runs only where the CPU reports VBMI and VNNI (cpu.c: every CPU with VBMI but Cannon Lake has
 * VNNI); this file alone is compiled with -mavx512vbmi -mavx512vnni.
 */
#include <math.h>

#include "lutq.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__AVX512VNNI__) && defined(__AVX2__)
#include <immintrin.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

enum { TILE_STEP = AQLM_LUTQ_TILE_STEP }; /* tiles sharing each table load */
_Static_assert(AQLM_LUTQ_LOW_RADIX == 256, "combine() multiplies by the radix with a shift by 8");

/* The byte positions, in two registers of 32 uint16 words each packed by vpackusdw from four
 * vectors of 16 entries, of entries 0..63 in order: their low bytes (high = 0) or high bytes
 * (high = 1). vpackusdw interleaves its sources per 128-bit lane: word 8L + r of the first
 * register is entry 4L + r of the first source (r < 4), word 8L + 4 + r entry 4L + r of the second. */
ALWAYS_INLINE __m512i entry_bytes(int high) {
    uint8_t index[64];
    for (int entry = 0; entry < 64; entry++) {
        const int source = entry / 16, lane = entry % 16 / 4, r = entry % 4;
        const int word = 8 * lane + 4 * (source % 2) + r;
        index[entry] = (uint8_t)(64 * (source / 2) + 2 * word + high);
    }
    return _mm512_loadu_si512(index);
}

/* Tables of groups [j0, j1) as the reference makes them (K a multiple of 16): V vectors of 16
 * codewords, each the exact integer products of pairs (VNNI vpdpwssd, 32 a instruction) shifted
 * as lutq.h says. The entries go from registers to bytes: E + ENTRY_OFFSET as uint16 (vpackusdw's
 * unsigned saturation holds E to [-ENTRY_OFFSET, LEVELS], as the reference does), whose two bytes
 * are the offset high and low bytes, 64 entries by two vpermt2b. */
ALWAYS_INLINE void build_tables(const int V, const aqlm_block_shape *s, int64_t j0, int64_t j1,
                                const float *restrict x, const float *restrict prepared, const float *restrict inverse,
                                int8_t *restrict qhi, int8_t *restrict qlo) {
    const int64_t ig = s->ig, M = s->M, K = s->K, KS = aqlm_lutq_table_stride(K), pairs = aqlm_lutq_pairs(ig);
    const int shift = aqlm_lutq_entry_shift(ig);
    const int16_t *cq = (const int16_t *)prepared;
    const float *step = prepared + aqlm_lutq_prepared_step(s);
    const __m512i low_bytes = entry_bytes(0), high_bytes = entry_bytes(1);
    const __m512i zero = _mm512_setzero_si512(), most = _mm512_set1_epi32(0xffff);
    const __m512i half = _mm512_set1_epi32(1 << (shift - 1)), offset = _mm512_set1_epi32(AQLM_LUTQ_ENTRY_OFFSET);
    uint32_t xq[AQLM_LUTQ_MAX_PAIRS];
    for (int64_t j = j0; j < j1; j++)
        for (int64_t m = 0; m < M; m++) {
            aqlm_lutq_input_pairs_avx2(ig, x + j * ig, step + m * ig, inverse[m], shift, xq);
            const int16_t *codebook = cq + m * pairs * K * 2;
            int8_t *high = qhi + ((j - j0) * M + m) * KS, *low = qlo + ((j - j0) * M + m) * KS;
            for (int64_t c0 = 0; c0 < K; c0 += 16 * V) {
                __m512i value[16];
                for (int v = 0; v < V; v++) value[v] = _mm512_setzero_si512();
                for (int64_t p = 0; p < pairs; p++) {
                    const __m512i pair = _mm512_set1_epi32((int)xq[p]);
                    const int16_t *column = codebook + (p * K + c0) * 2;
                    for (int v = 0; v < V; v++) value[v] = _mm512_dpwssd_epi32(value[v], _mm512_loadu_si512(column + 32 * v), pair);
                }
                for (int v = 0; v < V; v++) value[v] = _mm512_add_epi32(_mm512_srai_epi32(_mm512_add_epi32(value[v], half), shift), offset);
                if (V % 4 == 0) {
                    for (int v = 0; v < V; v += 4) {
                        const __m512i first = _mm512_packus_epi32(value[v], value[v + 1]);
                        const __m512i second = _mm512_packus_epi32(value[v + 2], value[v + 3]);
                        _mm512_storeu_si512(high + c0 + 16 * v, _mm512_permutex2var_epi8(first, high_bytes, second));
                        _mm512_storeu_si512(low + c0 + 16 * v, _mm512_permutex2var_epi8(first, low_bytes, second));
                    }
                } else {
                    for (int v = 0; v < V; v++) {
                        const __m512i u = _mm512_min_epi32(_mm512_max_epi32(value[v], zero), most);
                        _mm_storeu_si128((__m128i *)(high + c0 + 16 * v), _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, 8)));
                        _mm_storeu_si128((__m128i *)(low + c0 + 16 * v), _mm512_cvtepi32_epi8(u));
                    }
                }
            }
            for (int64_t c = K; c < KS; c++) high[c] = low[c] = (int8_t)0x80; /* the offset form of 0 */
        }
}

/* Tables in the offset byte form of the VBMI lookups (any K). */
static void lutq_tables_avx512(const aqlm_block_shape *s, int64_t j0, int64_t j1, const float *restrict x,
                               const float *restrict prepared, const float *restrict inverse, int8_t *restrict qhi,
                               int8_t *restrict qlo) {
    const int64_t K = s->K;
    if (K % 16 != 0) aqlm_lutq_tables_offset_avx2(s, j0, j1, x, prepared, inverse, qhi, qlo);
    else if (K % 256 == 0) build_tables(16, s, j0, j1, x, prepared, inverse, qhi, qlo);
    else if (K % 64 == 0) build_tables(4, s, j0, j1, x, prepared, inverse, qhi, qlo);
    else build_tables(1, s, j0, j1, x, prepared, inverse, qhi, qlo);
}

/* 64 int8 lookups of idx; a holds table entries 0-63, a..b 0-127, c..d 128-255. */
ALWAYS_INLINE __m512i lookup64(const int K, __m512i idx, __m512i a, __m512i b, __m512i c, __m512i d) {
    if (K <= 64) return _mm512_permutexvar_epi8(idx, a);
    if (K <= 128) return _mm512_permutex2var_epi8(a, idx, b);
    const __m512i low = _mm512_permutex2var_epi8(a, idx, b), high = _mm512_permutex2var_epi8(c, idx, d);
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), low, high);
}

/* 256 * high + low in int32 of 16 rows' offset sums (uint16, header) over `groups` lookups each:
 * the offsets removed, exact (lutq.h). */
ALWAYS_INLINE __m512i combine(__m256i high, __m256i low, __m512i offsets) {
    const __m512i hi = _mm512_sub_epi32(_mm512_cvtepu16_epi32(high), offsets), lo = _mm512_sub_epi32(_mm512_cvtepu16_epi32(low), offsets);
    return _mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo); /* 256 = AQLM_LUTQ_LOW_RADIX */
}

/* The sums of one tile, modulo 2**16: of the looked-up vectors as uint16 words ("words") and of
 * those words shifted right by 8 ("odd": the odd rows' bytes); word w holds rows 2w and 2w + 1. */
typedef struct {
    __m512i words_hi, odd_hi, words_lo, odd_lo;
} tile_sums;

ALWAYS_INLINE void add_lookups(tile_sums *sums, __m512i high, __m512i low) {
    sums->words_hi = _mm512_add_epi16(sums->words_hi, high);
    sums->odd_hi = _mm512_add_epi16(sums->odd_hi, _mm512_srli_epi16(high, 8));
    sums->words_lo = _mm512_add_epi16(sums->words_lo, low);
    sums->odd_lo = _mm512_add_epi16(sums->odd_lo, _mm512_srli_epi16(low, 8));
}

ALWAYS_INLINE tile_sums zero_sums(void) {
    const __m512i zero = _mm512_setzero_si512();
    return (tile_sums){zero, zero, zero, zero};
}

/* out[u * 64 + row] = 256 * high + low of tile u's sums over `groups` lookups, in row order, for NT tiles. */
ALWAYS_INLINE void store_sums(const int NT, const tile_sums *sums, int64_t groups, int32_t *restrict out) {
    /* rows 2i, 2i + 1 from even[i], odd[i]: first 8 lane pairs, then the next 8 */
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i offsets = _mm512_set1_epi32((int)(128 * groups));
    for (int u = 0; u < NT; u++) {
        const __m512i even_hi = _mm512_sub_epi16(sums[u].words_hi, _mm512_slli_epi16(sums[u].odd_hi, 8));
        const __m512i even_lo = _mm512_sub_epi16(sums[u].words_lo, _mm512_slli_epi16(sums[u].odd_lo, 8));
        const __m512i even0 = combine(_mm512_castsi512_si256(even_hi), _mm512_castsi512_si256(even_lo), offsets);
        const __m512i even1 = combine(_mm512_extracti64x4_epi64(even_hi, 1), _mm512_extracti64x4_epi64(even_lo, 1), offsets);
        const __m512i odd0 = combine(_mm512_castsi512_si256(sums[u].odd_hi), _mm512_castsi512_si256(sums[u].odd_lo), offsets);
        const __m512i odd1 = combine(_mm512_extracti64x4_epi64(sums[u].odd_hi, 1), _mm512_extracti64x4_epi64(sums[u].odd_lo, 1), offsets);
        int32_t *rows = out + u * AQLM_LUTQ_TILE;
        _mm512_storeu_si512(rows, _mm512_permutex2var_epi32(even0, first, odd0));
        _mm512_storeu_si512(rows + 16, _mm512_permutex2var_epi32(even0, second, odd0));
        _mm512_storeu_si512(rows + 32, _mm512_permutex2var_epi32(even1, first, odd1));
        _mm512_storeu_si512(rows + 48, _mm512_permutex2var_epi32(even1, second, odd1));
    }
}

/* NT (<= TILE_STEP) tiles at once; out: the partials of the first tile (layout in lutq.h). */
ALWAYS_INLINE void accumulate_tiles(const int K, const int NT, const aqlm_block_shape *s, int64_t group, int64_t j0, int64_t j1,
                                    const uint8_t *restrict packed, int64_t n, const int8_t *restrict qhi,
                                    const int8_t *restrict qlo, int32_t *restrict out, int64_t stride) {
    const int64_t M = s->M, G = s->in_groups, KS = aqlm_lutq_table_stride(s->K);
    const int64_t tile_stride = G * M * AQLM_LUTQ_TILE;
    for (int64_t b = j0 / group; b * group < j1; b++) {
        const int64_t piece = b - j0 / group;
        int64_t from, to;
        aqlm_lutq_piece_bounds(b, group, j0, j1, &from, &to);
        const int64_t ahead = aqlm_lutq_next_piece_offset(NT, from, to, j0, j1, M * AQLM_LUTQ_TILE, tile_stride);
        for (int64_t t = 0; t < n; t++) {
            for (int64_t m = 0; m < M; m++) {
                tile_sums sums[TILE_STEP];
                for (int u = 0; u < NT; u++) sums[u] = zero_sums();
                for (int64_t j = from; j < to; j++) {
                    const int64_t offset = (t * G * M + j * M + m) * KS;
                    const int8_t *high = qhi + offset, *low = qlo + offset;
                    const __m512i ha = _mm512_loadu_si512(high), la = _mm512_loadu_si512(low);
                    const __m512i hb = K > 64 ? _mm512_loadu_si512(high + 64) : ha, lb = K > 64 ? _mm512_loadu_si512(low + 64) : la;
                    const __m512i hc = K > 128 ? _mm512_loadu_si512(high + 128) : ha, lc = K > 128 ? _mm512_loadu_si512(low + 128) : la;
                    const __m512i hd = K > 128 ? _mm512_loadu_si512(high + 192) : ha, ld = K > 128 ? _mm512_loadu_si512(low + 192) : la;
                    const uint8_t *codes = packed + (j * M + m) * AQLM_LUTQ_TILE;
                    for (int u = 0; u < NT; u++) {
                        aqlm_lutq_prefetch(codes + u * tile_stride, ahead);
                        const __m512i idx = _mm512_loadu_si512(codes + u * tile_stride);
                        add_lookups(&sums[u], lookup64(K, idx, ha, hb, hc, hd), lookup64(K, idx, la, lb, lc, ld));
                    }
                }
                store_sums(NT, sums, to - from, out + ((piece * n + t) * M + m) * stride);
            }
        }
    }
}

/* The same for codebooks of <= 16 codewords with two codes per packed byte (M even): the low
 * nibbles are codebook m, the high ones m + 1, each masked to the 4 bits vpermb must see. */
ALWAYS_INLINE void accumulate_tiles_nibbles(const int NT, const aqlm_block_shape *s, int64_t group, int64_t j0, int64_t j1,
                                            const uint8_t *restrict packed, int64_t n, const int8_t *restrict qhi,
                                            const int8_t *restrict qlo, int32_t *restrict out, int64_t stride) {
    const int64_t M = s->M, G = s->in_groups, KS = aqlm_lutq_table_stride(s->K);
    const int64_t tile_stride = G * M / 2 * AQLM_LUTQ_TILE;
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    for (int64_t b = j0 / group; b * group < j1; b++) {
        const int64_t piece = b - j0 / group;
        int64_t from, to;
        aqlm_lutq_piece_bounds(b, group, j0, j1, &from, &to);
        const int64_t ahead = aqlm_lutq_next_piece_offset(NT, from, to, j0, j1, M / 2 * AQLM_LUTQ_TILE, tile_stride);
        for (int64_t t = 0; t < n; t++) {
            for (int64_t m = 0; m < M; m += 2) {
                tile_sums sums0[TILE_STEP], sums1[TILE_STEP];
                for (int u = 0; u < NT; u++) sums0[u] = sums1[u] = zero_sums();
                for (int64_t j = from; j < to; j++) {
                    const int64_t offset = (t * G * M + j * M + m) * KS;
                    const __m512i h0 = _mm512_loadu_si512(qhi + offset), h1 = _mm512_loadu_si512(qhi + offset + KS);
                    const __m512i l0 = _mm512_loadu_si512(qlo + offset), l1 = _mm512_loadu_si512(qlo + offset + KS);
                    const uint8_t *codes = packed + (j * M + m) / 2 * AQLM_LUTQ_TILE;
                    for (int u = 0; u < NT; u++) {
                        aqlm_lutq_prefetch(codes + u * tile_stride, ahead);
                        const __m512i v = _mm512_loadu_si512(codes + u * tile_stride);
                        const __m512i idx0 = _mm512_and_si512(v, low4), idx1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                        add_lookups(&sums0[u], _mm512_permutexvar_epi8(idx0, h0), _mm512_permutexvar_epi8(idx0, l0));
                        add_lookups(&sums1[u], _mm512_permutexvar_epi8(idx1, h1), _mm512_permutexvar_epi8(idx1, l1));
                    }
                }
                store_sums(NT, sums0, to - from, out + ((piece * n + t) * M + m) * stride);
                store_sums(NT, sums1, to - from, out + ((piece * n + t) * M + m + 1) * stride);
            }
        }
    }
}

ALWAYS_INLINE void accumulate_vbmi(const int K, const aqlm_block_shape *s, int64_t group, int64_t j0, int64_t j1, int64_t tiles,
                                   const uint8_t *restrict packed, int64_t n, const int8_t *restrict qhi,
                                   const int8_t *restrict qlo, int32_t *restrict partials, int64_t stride) {
    const int nibbles = aqlm_lutq_nibbles(s);
    const int64_t tile_stride = (nibbles ? s->in_groups * s->M / 2 : s->in_groups * s->M) * AQLM_LUTQ_TILE;
    for (int64_t tile = 0; tile < tiles; tile += TILE_STEP) {
        const int64_t count = tiles - tile < TILE_STEP ? tiles - tile : TILE_STEP;
        const uint8_t *codes = packed + tile * tile_stride;
        int32_t *out = partials + tile * AQLM_LUTQ_TILE;
        /* the last tiles of a layer whose count is not a multiple of TILE_STEP share their table loads too */
        if (nibbles && count == TILE_STEP) accumulate_tiles_nibbles(TILE_STEP, s, group, j0, j1, codes, n, qhi, qlo, out, stride);
        else if (nibbles && count == 3) accumulate_tiles_nibbles(3, s, group, j0, j1, codes, n, qhi, qlo, out, stride);
        else if (nibbles && count == 2) accumulate_tiles_nibbles(2, s, group, j0, j1, codes, n, qhi, qlo, out, stride);
        else if (nibbles) accumulate_tiles_nibbles(1, s, group, j0, j1, codes, n, qhi, qlo, out, stride);
        else if (count == TILE_STEP) accumulate_tiles(K, TILE_STEP, s, group, j0, j1, codes, n, qhi, qlo, out, stride);
        else if (count == 3) accumulate_tiles(K, 3, s, group, j0, j1, codes, n, qhi, qlo, out, stride); /* e.g. 192 rows */
        else if (count == 2) accumulate_tiles(K, 2, s, group, j0, j1, codes, n, qhi, qlo, out, stride);
        else accumulate_tiles(K, 1, s, group, j0, j1, codes, n, qhi, qlo, out, stride);
    }
}

static void lutq_accumulate_vbmi(const aqlm_block_shape *s, int64_t group, int64_t j0, int64_t j1, int64_t tiles,
                                 const uint8_t *restrict packed, int64_t n, const int8_t *restrict qhi,
                                 const int8_t *restrict qlo, int32_t *restrict partials, int64_t stride) {
    if (s->K <= 64) accumulate_vbmi(64, s, group, j0, j1, tiles, packed, n, qhi, qlo, partials, stride);
    else if (s->K <= 128) accumulate_vbmi(128, s, group, j0, j1, tiles, packed, n, qhi, qlo, partials, stride);
    else accumulate_vbmi(256, s, group, j0, j1, tiles, packed, n, qhi, qlo, partials, stride);
}

/* The reference's fma chain, 16 rows at a time (the FMA rounds once, as fmaf does). */
static void lutq_finish_avx512(int64_t M, int64_t chunks, const int64_t *restrict first, int64_t n,
                               const int32_t *restrict partials, int64_t stride, int64_t row0, int64_t row1,
                               const float *restrict qscale, float *restrict acc) {
    for (int64_t t = 0; t < n; t++)
        for (int64_t row = row0; row < row1; row += 16) {
            __m512 sum = _mm512_setzero_ps();
            for (int64_t b = 0; b < chunks; b++)
                for (int64_t m = 0; m < M; m++) {
                    __m512i total = _mm512_setzero_si512();
                    for (int64_t k = first[b]; k < first[b + 1]; k++)
                        total = _mm512_add_epi32(total, _mm512_loadu_si512(partials + ((k * n + t) * M + m) * stride + row));
                    sum = _mm512_fmadd_ps(_mm512_set1_ps(qscale[(t * chunks + b) * M + m]), _mm512_cvtepi32_ps(total), sum);
                }
            _mm512_storeu_ps(acc + t * stride + row, sum);
        }
}

const aqlm_lutq_kernels aqlm_lutq_kernels_avx512vbmi = {
    .name = "avx512vbmi",
    .tables = lutq_tables_avx512,
    .accumulate = lutq_accumulate_vbmi,
    .finish = lutq_finish_avx512,
};

#else /* built without VBMI: never chosen */

const aqlm_lutq_kernels aqlm_lutq_kernels_avx512vbmi = {.name = NULL,
                                                        .tables = aqlm_lutq_tables_ref,
                                                        .accumulate = aqlm_lutq_accumulate_ref,
                                                        .finish = aqlm_lutq_finish_ref};

#endif
