/*
 * internal.h - shared by the C files of the core; not installed, not part of the API.
 *
 * Each hot inner loop exists as a scalar reference (`*_ref`, always built, the readable statement
 * of what the loop computes) and as SIMD versions in per-ISA files compiled with their own flags.
 * All versions of one loop share one signature; an aqlm_kernels table holds one version of each,
 * and the drivers pick a table once per call, outside any parallel region.
 */
#ifndef AQLM_INTERNAL_H
#define AQLM_INTERNAL_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "aqlm.h"

/* Writes a formatted message and returns AQLM_ERR_ARGUMENT when cond is false. */
#define AQLM_CHECK(err, cond, ...)                                                                  \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            aqlm_set_error((err), __VA_ARGS__);                                                    \
            return AQLM_ERR_ARGUMENT;                                                              \
        }                                                                                          \
    } while (0)

static inline void aqlm_set_error(aqlm_error *err, const char *fmt, ...) {
    if (err == NULL) return;
    va_list args;
    va_start(args, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, args);
    va_end(args);
}

static inline aqlm_status aqlm_nomem(aqlm_error *err, size_t bytes) {
    aqlm_set_error(err, "could not allocate %zu bytes of work memory", bytes);
    return AQLM_ERR_NOMEM;
}

/* ---- scalar dtype conversions (round to nearest even, as torch does) ------------------------ */

static inline float aqlm_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0x1fu) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else { /* subnormal: renormalise */
        int shift = 0;
        while (!(mantissa & 0x400u)) {
            mantissa <<= 1;
            shift++;
        }
        bits = sign | ((uint32_t)(113 - shift) << 23) | ((mantissa & 0x3ffu) << 13);
    }
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint16_t aqlm_f32_to_f16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    uint32_t sign = (bits >> 16) & 0x8000u;
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return (uint16_t)(sign | 0x7e00u); /* NaN */
    if (magnitude >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to infinity */
    if (magnitude < 0x38800000u) {                                   /* subnormal or zero */
        if (magnitude < 0x33000000u) return (uint16_t)sign;
        uint32_t exponent = magnitude >> 23;
        uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - exponent;
        uint32_t half = mantissa >> shift;
        uint32_t remainder = mantissa & ((1u << shift) - 1u);
        uint32_t halfway = 1u << (shift - 1u);
        if (remainder > halfway || (remainder == halfway && (half & 1u))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
    return (uint16_t)(sign | ((rounded - 0x38000000u) >> 13));
}

static inline float aqlm_bf16_to_f32(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint16_t aqlm_f32_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* quiet NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float aqlm_load(aqlm_dtype dtype, const void *base, int64_t index) {
    switch (dtype) {
    case AQLM_F16: return aqlm_f16_to_f32(((const uint16_t *)base)[index]);
    case AQLM_BF16: return aqlm_bf16_to_f32(((const uint16_t *)base)[index]);
    default: return ((const float *)base)[index];
    }
}

static inline void aqlm_store(aqlm_dtype dtype, void *base, int64_t index, float value) {
    switch (dtype) {
    case AQLM_F16: ((uint16_t *)base)[index] = aqlm_f32_to_f16(value); break;
    case AQLM_BF16: ((uint16_t *)base)[index] = aqlm_f32_to_bf16(value); break;
    default: ((float *)base)[index] = value; break;
    }
}

static inline size_t aqlm_dtype_size(aqlm_dtype dtype) { return dtype == AQLM_F32 ? 4 : 2; }

/* The code stored at flat index `index`, read back into [0, K). */
static inline uint32_t aqlm_code_at(int code_bits, const void *codes, int64_t index, uint32_t mask) {
    if (code_bits == 8) return (uint32_t)((const uint8_t *)codes)[index] & mask;
    return (uint32_t)((const uint16_t *)codes)[index] & mask;
}

/* ---- kernel signatures ----------------------------------------------------------------------- */

/* One block of the codebook format as the inner loops see it. */
typedef struct {
    int64_t og, ig, M, K;
    int64_t in_groups;   /* in / ig */
    int code_bits;       /* 8 or 16 */
    uint32_t code_mask;  /* K - 1 */
} aqlm_block_shape;

/* Lookup tables for one token, input groups [j0, j1):
 *   lut[(((j - j0) * M + m) * og + r) * K + c] = sum_i x[j*ig + i] * cbt[((m * og + r) * ig + i) * K + c]
 * x: [in] fp32; cbt: the codebooks transposed to [M, og, ig, K], fp32. */
typedef void (*aqlm_lut_build_t1_fn)(const aqlm_block_shape *s, int64_t j0, int64_t j1,
                                     const float *restrict x, const float *restrict cbt,
                                     float *restrict lut);

/* Lookup tables for a block of 8 tokens, input groups [j0, j1):
 *   lut[((((j - j0) * M + m) * og + r) * K + c) * 8 + t] = sum_i xt[(j*ig + i) * 8 + t] * cb[((m * K + c) * og + r) * ig + i]
 * xt: the 8 tokens transposed to [in, 8], fp32; cb: codebooks [M, K, og, ig], fp32. */
typedef void (*aqlm_lut_build_t8_fn)(const aqlm_block_shape *s, int64_t j0, int64_t j1,
                                     const float *restrict xt, const float *restrict cb,
                                     float *restrict lut);

/* Gather-accumulate for `rows` output groups over input groups [j0, j1) (a slab whose tables
 * start at `lut`, laid out as the matching build function writes them):
 *   t1: acc[row * og + r]           += sum_{j, m} lut[...(j, m, r, code(row, j, m))]
 *   t8: acc[(row * og + r) * 8 + t] += sum_{j, m} lut[...(j, m, r, code(row, j, m)) * 8 + t]
 * codes points at the int8 codes of the first row; consecutive rows are in_groups * M apart.
 * Each accumulator is summed in the order j, then m, whatever the slab and thread split. */
typedef void (*aqlm_lut_accumulate_fn)(const aqlm_block_shape *s, int64_t rows, int64_t j0,
                                       int64_t j1, const int8_t *restrict codes,
                                       const float *restrict lut, float *restrict acc);

/* Decode-and-dot for output groups [o0, o1) and n tokens (n <= AQLM_DECODE_DOT_MAX_TOKENS):
 *   acc[((o - o0) * og + r) * n + t] = sum_j sum_i x[t * in + j*ig + i] * sum_m cb[m, code(o, j, m), r, i]
 * x: [n, in] fp32; cb: codebooks [M, K, og, ig] in cb_dtype. */
typedef void (*aqlm_decode_dot_fn)(const aqlm_block_shape *s, int64_t o0, int64_t o1, int64_t n,
                                   const float *restrict x, const void *restrict codes,
                                   aqlm_dtype cb_dtype, const void *restrict cb,
                                   float *restrict acc);
enum { AQLM_DECODE_DOT_MAX_TOKENS = 8 };

/* Dequantize output groups [o0, o1) into weight rows [o0 * og, o1 * og) of w [out, in]. */
typedef void (*aqlm_dequant_rows_fn)(const aqlm_block_shape *s, int64_t o0, int64_t o1,
                                     const void *restrict codes, aqlm_dtype param_dtype,
                                     const void *restrict cb, const void *restrict scales,
                                     aqlm_dtype w_dtype, void *restrict w);

/* For each of n queries (rows of q [n, D]), the k smallest values of
 *   v(c) = bias[c] + sum_d q[i, d] * ct[d, c]      over codewords c in [0, K)   (ct: [D, K])
 * in ascending order (ties: smaller c first) into values [n, k] and indices [n, k]. Each v(c) is
 * accumulated as fma(q[d], ct[d, c], v) for d = 0, 1, ... so every version gives the same bits.
 * Requires 1 <= k <= K. */
typedef void (*aqlm_topk_scores_fn)(int64_t n, int64_t D, int64_t K, int64_t k, const float *restrict q,
                                    const float *restrict ct, const float *restrict bias,
                                    float *restrict values, int32_t *restrict indices);

/* For each of n rows: g_rows[r][col] -= sum_i delta[r, i] * h[i, col] for col in [0, width),
 * i in [0, ig) (h: [ig, width] with row stride `width`), as fma(-delta, h, g) in order i = 0, 1, ... */
typedef void (*aqlm_gradient_update_fn)(int64_t n, int64_t ig, int64_t width, const float *restrict delta,
                                        const float *restrict h, float *const *restrict g_rows);

/* For codewords c in [c0, c1), with w_c[r, i] = ct[(r * ig + i) * ct_stride + c] (og rows of ig):
 *   norms[c - c0] = sum_r sum_i w_c[r, i] * (sum_t h[i * h_stride + t] * w_c[r, t])   (h: [ig, ig])
 * or sum_r sum_i w_c[r, i]^2 when h is NULL; in double, every product rounded before it is added
 * (no fma), sums in the order r, i, t from zero, then rounded to float. */
typedef void (*aqlm_codeword_norms_fn)(int64_t c0, int64_t c1, int64_t ct_stride, int64_t og, int64_t ig,
                                       const float *restrict ct, const float *restrict h, int64_t h_stride,
                                       float *restrict norms);

typedef struct {
    aqlm_simd level;
    aqlm_lut_build_t1_fn lut_build_t1;
    aqlm_lut_build_t8_fn lut_build_t8;
    aqlm_lut_accumulate_fn lut_accumulate_t1;
    aqlm_lut_accumulate_fn lut_accumulate_t8;
    aqlm_decode_dot_fn decode_dot;
    aqlm_dequant_rows_fn dequant_rows;
    aqlm_topk_scores_fn topk_scores;
    aqlm_gradient_update_fn gradient_update;
    aqlm_codeword_norms_fn codeword_norms;
} aqlm_kernels;

/* The table for `level`, or for the best level below it that this build has. */
const aqlm_kernels *aqlm_kernels_for(aqlm_simd level);

/* Scalar references (kernels_ref.c); SIMD tables fall back to these for shapes they do not
 * specialise. */
void aqlm_lut_build_t1_ref(const aqlm_block_shape *s, int64_t j0, int64_t j1,
                           const float *restrict x, const float *restrict cbt, float *restrict lut);
void aqlm_lut_build_t8_ref(const aqlm_block_shape *s, int64_t j0, int64_t j1,
                           const float *restrict xt, const float *restrict cb, float *restrict lut);
void aqlm_lut_accumulate_t1_ref(const aqlm_block_shape *s, int64_t rows, int64_t j0, int64_t j1,
                                const int8_t *restrict codes, const float *restrict lut,
                                float *restrict acc);
void aqlm_lut_accumulate_t8_ref(const aqlm_block_shape *s, int64_t rows, int64_t j0, int64_t j1,
                                const int8_t *restrict codes, const float *restrict lut,
                                float *restrict acc);
void aqlm_decode_dot_ref(const aqlm_block_shape *s, int64_t o0, int64_t o1, int64_t n,
                         const float *restrict x, const void *restrict codes, aqlm_dtype cb_dtype,
                         const void *restrict cb, float *restrict acc);
void aqlm_dequant_rows_ref(const aqlm_block_shape *s, int64_t o0, int64_t o1,
                           const void *restrict codes, aqlm_dtype param_dtype,
                           const void *restrict cb, const void *restrict scales,
                           aqlm_dtype w_dtype, void *restrict w);
void aqlm_topk_scores_ref(int64_t n, int64_t D, int64_t K, int64_t k, const float *restrict q,
                          const float *restrict ct, const float *restrict bias, float *restrict values,
                          int32_t *restrict indices);
void aqlm_gradient_update_ref(int64_t n, int64_t ig, int64_t width, const float *restrict delta,
                              const float *restrict h, float *const *restrict g_rows);
void aqlm_codeword_norms_ref(int64_t c0, int64_t c1, int64_t ct_stride, int64_t og, int64_t ig,
                             const float *restrict ct, const float *restrict h, int64_t h_stride,
                             float *restrict norms);

/* AVX2 versions (kernels_avx2.c), reused by the AVX-512 table where it has no wider version. */
void aqlm_lut_build_t1_avx2(const aqlm_block_shape *s, int64_t j0, int64_t j1,
                            const float *restrict x, const float *restrict cbt, float *restrict lut);
void aqlm_lut_build_t8_avx2(const aqlm_block_shape *s, int64_t j0, int64_t j1,
                            const float *restrict xt, const float *restrict cb, float *restrict lut);
void aqlm_lut_accumulate_t1_avx2(const aqlm_block_shape *s, int64_t rows, int64_t j0, int64_t j1,
                                 const int8_t *restrict codes, const float *restrict lut,
                                 float *restrict acc);
void aqlm_lut_accumulate_t8_avx2(const aqlm_block_shape *s, int64_t rows, int64_t j0, int64_t j1,
                                 const int8_t *restrict codes, const float *restrict lut,
                                 float *restrict acc);
void aqlm_decode_dot_avx2(const aqlm_block_shape *s, int64_t o0, int64_t o1, int64_t n,
                          const float *restrict x, const void *restrict codes, aqlm_dtype cb_dtype,
                          const void *restrict cb, float *restrict acc);
void aqlm_dequant_rows_avx2(const aqlm_block_shape *s, int64_t o0, int64_t o1,
                            const void *restrict codes, aqlm_dtype param_dtype,
                            const void *restrict cb, const void *restrict scales,
                            aqlm_dtype w_dtype, void *restrict w);
void aqlm_topk_scores_avx2(int64_t n, int64_t D, int64_t K, int64_t k, const float *restrict q,
                           const float *restrict ct, const float *restrict bias, float *restrict values,
                           int32_t *restrict indices);
void aqlm_gradient_update_avx2(int64_t n, int64_t ig, int64_t width, const float *restrict delta,
                               const float *restrict h, float *const *restrict g_rows);

extern const aqlm_kernels aqlm_kernels_scalar;
extern const aqlm_kernels aqlm_kernels_avx2;
extern const aqlm_kernels aqlm_kernels_avx512;

/* ---- helpers shared by the drivers ---------------------------------------------------------- */

aqlm_block_shape aqlm_block_shape_of(const aqlm_format *f);
/* Checks the format, the codes (when nbits < code_bits), dtypes and the thread count. */
aqlm_status aqlm_check_matmul_args(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype,
                                   const void *x, const void *codes, aqlm_dtype param_dtype,
                                   const void *codebooks, const void *scales, const void *y,
                                   int num_threads, aqlm_error *err);
/* Inserts (value, index) into the ascending top-k list (values, indices) if it beats the last
 * entry; equal values keep the earlier entry first. */
static inline void aqlm_topk_insert(int64_t k, float *values, int32_t *indices, float value, int32_t index) {
    if (!(value < values[k - 1])) return;
    int64_t at = k - 1;
    while (at > 0 && value < values[at - 1]) {
        values[at] = values[at - 1];
        indices[at] = indices[at - 1];
        at--;
    }
    values[at] = value;
    indices[at] = index;
}

/* A small seeded generator (splitmix64): deterministic streams from explicit seeds only. */
static inline uint64_t aqlm_random_next(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform integer in [0, bound), bound >= 1. */
static inline uint64_t aqlm_random_below(uint64_t *state, uint64_t bound) {
    return (uint64_t)(((unsigned __int128)aqlm_random_next(state) * bound) >> 64);
}

/* Index of the first NaN or Inf among count floats, or -1. */
int64_t aqlm_find_nonfinite(const float *values, int64_t count);

/* Threads to use for `work` elementary operations: 1 below aqlm_min_parallel_work(). */
int aqlm_threads_for(int num_threads, double work);

#endif /* AQLM_INTERNAL_H */
