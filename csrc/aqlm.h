/*
 * aqlm.h - the public interface of the AQLM C core.
 *
 * Plain C11 over raw pointers: no Python, no libtorch. Every function checks its arguments,
 * returns an aqlm_status and, on failure, writes a message naming the offending value into the
 * caller's aqlm_error. Arrays are dense, C-contiguous, in the index order given in each comment.
 *
 * Short names used everywhere:
 *   out, in   out_features, in_features of the weight W [out, in]
 *   og, ig    out_group_size, in_group_size: one code covers an og x ig block of W
 *   M, K      num_codebooks, codebook size K = 2**nbits
 *   n         number of tokens (rows of the activation x [n, in])
 *
 * Weight format (identical to the `aqlm` package that Hugging Face Transformers loads):
 *   codes      [out/og, in/ig, M], int8 when nbits <= 8, int16 when nbits <= 16, stored
 *              two's-complement packed: code c in [0, K) is stored as c - K when c >= K/2 and
 *              read back as (stored mod K);
 *   codebooks  [M, K, og, ig];
 *   scales     [out/og] (one per output group);
 *   W[o*og + r, j*ig + i] = scales[o] * sum_m codebooks[m, code(o, j, m), r, i].
 */
#ifndef AQLM_H
#define AQLM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    AQLM_OK = 0,
    AQLM_ERR_ARGUMENT = 1,    /* a size, value or combination of arguments is invalid */
    AQLM_ERR_NOMEM = 2,       /* a work buffer could not be allocated */
    AQLM_ERR_INTERRUPTED = 3, /* the caller's interrupt callback asked to stop */
    AQLM_ERR_NUMERIC = 4,     /* NaN or Inf in the inputs */
} aqlm_status;

/* Element types of floating-point arrays. Accumulation is always in float32. */
typedef enum { AQLM_F32 = 0, AQLM_F16 = 1, AQLM_BF16 = 2 } aqlm_dtype;

/* Instruction-set levels, in increasing order; each level implies the ones below it. */
typedef enum { AQLM_SIMD_SCALAR = 0, AQLM_SIMD_AVX2 = 1, AQLM_SIMD_AVX512 = 2 } aqlm_simd;

enum { AQLM_ERROR_CAPACITY = 512 };
typedef struct {
    char message[AQLM_ERROR_CAPACITY];
} aqlm_error;

/* Returns nonzero to ask a long-running function to stop (checked between steps, never inside
 * a parallel region). May be NULL. */
typedef int (*aqlm_interrupt_fn)(void *context);

/* The shape of one quantized weight. */
typedef struct {
    int64_t out_features, in_features;
    int64_t out_group_size, in_group_size;
    int64_t num_codebooks;
    int nbits;     /* bits per code, 1..16; K = 2**nbits */
    int code_bits; /* storage width of one code: 8 (int8) or 16 (int16) */
} aqlm_format;

/* ---- CPU features -------------------------------------------------------------------------- */

/* The best level this CPU and operating system support (CPUID + XGETBV). */
aqlm_simd aqlm_simd_supported(void);
/* The best level this build has kernels for (SIMD files are empty when built for another ISA). */
aqlm_simd aqlm_simd_compiled(void);
const char *aqlm_simd_name(aqlm_simd level);
/* Parses "scalar", "avx2" or "avx512" (case-insensitive). */
aqlm_status aqlm_simd_parse(const char *name, aqlm_simd *level, aqlm_error *err);

/* ---- format --------------------------------------------------------------------------------- */

/* Checks sizes: positive, groups divide features, nbits fits code_bits, no size overflow. */
aqlm_status aqlm_format_check(const aqlm_format *f, aqlm_error *err);
/* Checks that every stored code reads back into [0, K): stored values must lie in
 * [-K/2, K) (packed or unpacked form). Needed only when nbits < code_bits. */
aqlm_status aqlm_codes_check(const aqlm_format *f, const void *codes, aqlm_error *err);

/* ---- threads -------------------------------------------------------------------------------- */

/* Calls start a thread team only for at least this many elementary operations (default 262144,
 * ~tens of microseconds); smaller jobs run on the calling thread. Process-wide and atomic; results
 * do not depend on it. Negative values are taken as 0 (always use the threads asked for). */
void aqlm_set_min_parallel_work(int64_t work);
int64_t aqlm_min_parallel_work(void);

/* ---- inference kernels ---------------------------------------------------------------------- */

/* weight [out, in] (weight_dtype) = dequantized W. */
aqlm_status aqlm_dequantize(const aqlm_format *f, const void *codes, aqlm_dtype param_dtype,
                            const void *codebooks, const void *scales, aqlm_dtype weight_dtype,
                            void *weight, aqlm_simd simd, int num_threads, aqlm_error *err);

/* y [n, out] = x [n, in] @ W^T + bias, by lookup tables: for each input group, the dot products
 * of the activation slice with every codeword, then a gather-accumulate over the codes.
 * Requires nbits <= 8. x and y have x_dtype; codebooks, scales and bias (may be NULL) have
 * param_dtype. */
aqlm_status aqlm_lut_matmul(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype, const void *x,
                            const void *codes, aqlm_dtype param_dtype, const void *codebooks,
                            const void *scales, const void *bias, void *y, aqlm_simd simd,
                            int num_threads, aqlm_error *err);

/* The same product by decoding each code straight from the codebook and taking dot products:
 * for codebooks too large for per-token tables (nbits > 8) and for few tokens. Any nbits. */
aqlm_status aqlm_codebook_matmul(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype,
                                 const void *x, const void *codes, aqlm_dtype param_dtype,
                                 const void *codebooks, const void *scales, const void *bias,
                                 void *y, aqlm_simd simd, int num_threads, aqlm_error *err);

/* The same product from int8 codebooks: each codebook rounded once to int8 with one fp32 step
 * (aqlm_decodeq_prepare into aqlm_decodeq_prepared_size(f) bytes), each token's activations to
 * int16 with one fp32 step at each call, exact integer dot products (csrc/decodeq.h, which derives
 * the error bound): 8-byte codewords, so a 2**16-entry codebook (512 KiB) stays in L2. Needs
 * out_group_size 1, in_group_size 8 and int16 codes (nbits 9..16). The codebooks are read only
 * through `prepared`; a NaN or infinity in the codebooks fails the preparation (AQLM_ERR_NUMERIC),
 * one in a token gives NaN outputs for that token. The bits do not depend on simd or num_threads. */
size_t aqlm_decodeq_prepared_size(const aqlm_format *f);
aqlm_status aqlm_decodeq_prepare(const aqlm_format *f, aqlm_dtype param_dtype, const void *codebooks,
                                 int8_t *prepared, aqlm_error *err);
aqlm_status aqlm_decodeq_matmul(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype, const void *x,
                                const void *codes, const int8_t *prepared, aqlm_dtype param_dtype,
                                const void *scales, const void *bias, void *y, aqlm_simd simd, int num_threads,
                                aqlm_error *err);
/* The int8-codebook kernels a call of `tokens` tokens at `level` uses here: "avx512vnni" (gathers
 * and byte products: Intel with AVX-512 VNNI, up to 2 tokens, unless AQLM_DECODEQ_GATHER=0),
 * "avx512", "avx2" or "scalar". */
const char *aqlm_decodeq_kernel_name(aqlm_simd level, int64_t tokens);

/* Quantized lookup tables (16-bit entries stored as high and low int8 tables, one fp32 step per
 * `group` input groups and codebook, entries from exact integer products of int16 inputs and
 * codebooks, exact integer sums): the fast path for few tokens. Needs nbits <= 8, out_group_size
 * 1 and in_group_size <= 128, and the codes repacked once by aqlm_lutq_pack_codes into
 * aqlm_lutq_packed_size(f) bytes. For each output, |y - exact| <= |scale| * the sum over groups
 * and codebooks of a bound on each entry's error, in units of s[b, m] = a bound on the chunk's
 * exact table entries from x and the codebooks / 32639 (127 * 256 + 127; csrc/lutq.h, which
 * derives it). 1 <= group <= 256.
 * prepared: the codebooks once prepared by aqlm_lutq_prepare_codebooks into
 * aqlm_lutq_prepared_size(f) floats (csrc/lutq.h: the codebooks rounded to int16 in input pairs,
 * the largest |value| of each codebook's column i [M, ig], the largest codeword norm of each
 * codebook [M], and the column steps [M, ig]), or NULL to prepare them at each call. */
size_t aqlm_lutq_packed_size(const aqlm_format *f);
size_t aqlm_lutq_prepared_size(const aqlm_format *f);
aqlm_status aqlm_lutq_prepare_codebooks(const aqlm_format *f, aqlm_dtype param_dtype, const void *codebooks,
                                        float *prepared, aqlm_error *err);
aqlm_status aqlm_lutq_pack_codes(const aqlm_format *f, const void *codes, uint8_t *packed, aqlm_error *err);
/* What the next quantized-table call will read first (its prepared codebooks and its codes), and
 * any other memory the caller reads soon after (`soon`: a decoding step's attention cache), for
 * this call to prefetch while it builds its tables (`soon` split between its threads): a decoding
 * step runs the same weights in the same order at every token. Only a hint: its addresses are
 * prefetched, never read, so any values are safe (a call that no longer exists included); `next`
 * may be NULL. */
typedef struct {
    aqlm_format format;
    const uint8_t *packed;
    const float *prepared; /* NULL: prepared at that call, nothing to prefetch */
    const void *soon;      /* NULL or soon_bytes bytes */
    int64_t soon_bytes;
} aqlm_lutq_next;
/* workspace: work memory of workspace_bytes bytes, 64-byte aligned, that no other call uses
 * meanwhile, or NULL: each call then allocates its own (as it does when the memory is too small).
 * aqlm_lutq_workspace_size gives what any call on n tokens of x_dtype needs on up to num_threads
 * threads, prepared or not. */
size_t aqlm_lutq_workspace_size(const aqlm_format *f, int64_t group, int64_t n, aqlm_dtype x_dtype, int num_threads);
aqlm_status aqlm_lutq_matmul(const aqlm_format *f, int64_t group, int64_t n, aqlm_dtype x_dtype,
                             const void *x, const uint8_t *packed, aqlm_dtype param_dtype,
                             const void *codebooks, const float *prepared, const void *scales, const void *bias,
                             void *y, const aqlm_lutq_next *next, void *workspace, size_t workspace_bytes,
                             aqlm_simd simd, int num_threads, aqlm_error *err);
/* One aqlm_lutq_matmul call's arguments, for aqlm_lutq_matmul_many. */
typedef struct {
    const aqlm_format *format;
    int64_t group, n;
    aqlm_dtype x_dtype;
    const void *x;
    const uint8_t *packed;
    aqlm_dtype param_dtype;
    const void *codebooks;
    const float *prepared;
    const void *scales, *bias;
    void *y;
    const aqlm_lutq_next *next;
    void *workspace;
    size_t workspace_bytes;
} aqlm_lutq_call;
enum {
    AQLM_LUTQ_MAX_TOKENS = 8, /* tokens per pass of aqlm_lutq_matmul (tables of all of them stay in L2) */
    AQLM_LUTQ_MAX_CALLS = 8,
};
/* Up to AQLM_LUTQ_MAX_CALLS calls of aqlm_lutq_matmul, each on at most AQLM_LUTQ_MAX_TOKENS
 * tokens (one pass), in one parallel region with one barrier: every call's tables
 * and lookups, then every call's sums. Each y gets the bits its own call gives. No y may overlap
 * another call's x, y or weight (a layer's q, k and v projections of one x qualify), and no two
 * calls may share a workspace. */
aqlm_status aqlm_lutq_matmul_many(int count, const aqlm_lutq_call *calls, aqlm_simd simd, int num_threads,
                                  aqlm_error *err);
/* The quantized-table kernels a call at `level` uses here: "scalar", "avx2" or "avx512vbmi". */
const char *aqlm_lutq_kernel_name(aqlm_simd level);

/* Exact fp32 lookup tables 16 (or 8) tokens wide, for a few to some tens of tokens: each lookup
 * of the packed codes (aqlm_lutq_pack_codes, same layout) fetches the entries of all the tokens
 * of a pass at once. Needs nbits <= 8 and out_group_size 1. Every output sums each codebook's
 * entries over the input groups in order, then the codebooks in order (codebooks of 16 codewords
 * in nibble packing a pair at a time: lutw.h), so the bits do not depend on the SIMD level or the
 * thread count. x and y have x_dtype; codebooks, scales and bias (may be NULL) have param_dtype. */
aqlm_status aqlm_lutw_matmul(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype, const void *x,
                             const uint8_t *packed, aqlm_dtype param_dtype, const void *codebooks,
                             const void *scales, const void *bias, void *y, aqlm_simd simd, int num_threads,
                             aqlm_error *err);
/* The wide-token kernels a call at `level` uses here: "scalar", "avx2" or "avx512". */
const char *aqlm_lutw_kernel_name(aqlm_simd level);

/* The same product in bfloat16: one output-row panel of codewords at a time, in
 * bfloat16, times the tokens in bfloat16, summed in fp32 (bf16tile.h), from a few tokens on,
 * without dequantizing the weight. Each codeword and activation is rounded to bfloat16
 * (round to nearest even), so the result agrees with the exact product of those roundings to fp32
 * summation error, not bit for bit across SIMD levels. Needs out_group_size 1, an even
 * in_group_size that divides 32 and in_features divisible by 32. AMX where the CPU and OS allow,
 * else AVX-512 BF16, else the scalar reference. */
aqlm_status aqlm_bf16_matmul(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype, const void *x, const void *codes,
                             aqlm_dtype param_dtype, const void *codebooks, const void *scales, const void *bias,
                             void *y, aqlm_simd simd, int num_threads, aqlm_error *err);
/* Float16 or float32 codebooks rounded to bfloat16 once (aqlm_bf16_prepare, into
 * aqlm_bf16_prepared_size(f) values): the same bits as the rounding aqlm_bf16_matmul does at each
 * call, which aqlm_bf16_matmul_prepared skips (prepared NULL: it rounds). */
size_t aqlm_bf16_prepared_size(const aqlm_format *f);
aqlm_status aqlm_bf16_prepare(const aqlm_format *f, aqlm_dtype param_dtype, const void *codebooks,
                              uint16_t *prepared, aqlm_error *err);
aqlm_status aqlm_bf16_matmul_prepared(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype, const void *x,
                                      const void *codes, aqlm_dtype param_dtype, const void *codebooks,
                                      const uint16_t *prepared, const void *scales, const void *bias, void *y,
                                      aqlm_simd simd, int num_threads, aqlm_error *err);
/* The bfloat16 tile kernels a call at `level` uses here: "amx", "avx512bf16" or "scalar". */
const char *aqlm_bf16_kernel_name(aqlm_simd level);

/* ---- int8 weights -------------------------------------------------------------------------- */

/* Weight-only int8: W [out, in] ~ scales[o] * w[o, i] with w int8 [out, in] and one fp32 scale per
 * row. y [n, out] = x [n, in] @ W^T + bias (bias [out] or NULL), fp32 in and out, with each token's
 * x rounded to int16 with one step per token (step[t] = max_i |x[t, i]| / 32767, xq = x / step
 * rounded to nearest even) and the dot products exact integers:
 *     y[t, o] = scales[o] * (step[t] * (float)(sum_i xq[t, i] * w[o, i])) + bias[o]
 * the same bits on every SIMD level and thread count. A token holding NaN or an infinity gives
 * NaN outputs. Rows are split over threads; each weight row is converted once per pass of up to
 * several tokens. Allocates one buffer per call for a pass's rounded tokens. */
aqlm_status aqlm_int8_matmul(int64_t n, int64_t in, int64_t out, const float *x, const int8_t *w,
                             const float *scales, const float *bias, float *y, aqlm_simd simd,
                             int num_threads, aqlm_error *err);

/* Symmetric per-row quantization of w [out, in] (fp32): scales[o] = max_i |w[o, i]| / 127 and
 * q[o, i] = w[o, i] / scales[o] rounded to nearest even, clamped to [-127, 127] (an all-zero row
 * gets scale 0 and q 0), so |w - scales * q| <= scales / 2 up to fp32 rounding. NaN/Inf in w:
 * AQLM_ERR_NUMERIC. */
aqlm_status aqlm_int8_quantize_rows(int64_t out, int64_t in, const float *w, int8_t *q, float *scales,
                                    int num_threads, aqlm_error *err);

/* ---- k-means ------------------------------------------------------------------------------- */

typedef enum { AQLM_KMEANS_INIT_RANDOM = 0, AQLM_KMEANS_INIT_PLUSPLUS = 1 } aqlm_kmeans_init;

typedef struct {
    int max_iter;                    /* Lloyd iterations, >= 0 */
    double tolerance;                /* stop when an iteration improves the objective by less than this fraction */
    int64_t max_points_per_centroid; /* train on a seeded sample of k * this many points when n is larger;
                                        0 trains on all points */
    aqlm_kmeans_init init;           /* random distinct points, or k-means++ (O(n k d)) */
    uint64_t seed;
} aqlm_kmeans_params;

/* 25 iterations, tolerance 1e-4, 256 points per centroid, random init, seed 0. */
aqlm_kmeans_params aqlm_kmeans_params_default(void);

/* Clusters x [n, d] (d <= 64) into centroids [k, d]. Optional outputs (may be NULL): assignment
 * [n] (nearest centroid of every point, after training) and objective (sum of squared distances
 * of all n points). When n <= k every point becomes a centroid. NaN/Inf in x: AQLM_ERR_NUMERIC. */
aqlm_status aqlm_kmeans(int64_t n, int64_t d, int64_t k, const float *x, const aqlm_kmeans_params *params,
                        float *centroids, int32_t *assignment, double *objective, aqlm_simd simd,
                        int num_threads, aqlm_interrupt_fn interrupt, void *interrupt_context,
                        aqlm_error *err);

/* ---- beam search ----------------------------------------------------------------------------- */

typedef struct {
    int beam_size; /* hypotheses kept per output group; 1 is greedy coordinate descent */
    int shuffle;   /* nonzero: visit input groups, and codebooks within each, in a seeded random order */
    uint64_t seed;
    size_t norms_budget_bytes; /* precompute the codeword norms of every (input group, codebook) when
                                  they fit in this many bytes; else compute them at each step */
} aqlm_beam_params;

/* Beam size 1, no shuffling, seed 0, 512 MiB for precomputed norms. */
aqlm_beam_params aqlm_beam_params_default(void);

/* One pass of beam search over the codes, minimising for every output group o
 *     loss[o] = sum over its rows r of (W - What)[r] xtx (W - What)[r]^T,
 * What the dequantized weight. Visits each input group j once and each codebook m within it,
 * and for every hypothesis scores all 2**nbits codewords for code (o, j, m) in closed form from
 * the row gradient (W - What) xtx; keeps the beam_size best hypotheses of each output group and
 * finally writes the best one. The objective of the result is never above that of the codes
 * given (up to float rounding), since keeping a code is always a candidate.
 *   xtx        [in, in] symmetric positive semi-definite, or NULL for the identity (plain L2);
 *   codebooks  [M, K, og, ig] fp32; scales [out/og] fp32;
 *   allowed    [out/og, in/ig] bytes, or NULL: codes of groups with allowed == 0 are kept;
 *   codes      [out/og, in/ig, M] packed int8/int16, updated in place;
 *   gradient   [out, in]: (W - What) xtx for the codes on entry (W - What when xtx is NULL),
 *              updated to match the codes on exit;
 *   losses     [out/og]: loss[o] for the codes on entry, updated on exit. */
aqlm_status aqlm_beam_search(const aqlm_format *f, const float *xtx, const float *codebooks, const float *scales,
                             const uint8_t *allowed, void *codes, float *gradient, double *losses,
                             const aqlm_beam_params *params, aqlm_simd simd, int num_threads,
                             aqlm_interrupt_fn interrupt, void *interrupt_context, aqlm_error *err);

/* ---- one decoding step of a Llama-family layer (decode_step.c) ---------------------------- */

/* With delta: h += delta first. Then out = weight * (h / sqrt(mean(h^2) + eps)). Arrays of n floats. */
aqlm_status aqlm_residual_rms_norm(int64_t n, float *h, const float *delta, const float *weight, float eps, float *out,
                                   aqlm_error *err);
/* gate = silu(gate) * up, n floats. */
aqlm_status aqlm_silu_mul(int64_t n, float *gate, const float *up, aqlm_error *err);
/* Attention of one token at `position` over a key/value cache (D = head_dim):
 *   q [heads, D], k and v [kv_heads, D]: the token's projections; q and k are rotated in place by
 *     the rotary tables cos and sin [capacity, D] at row `position` (x cos + rotate_half(x) sin);
 *   keys and values [capacity, kv_heads, D]: rows 0..position-1 hold earlier tokens; the rotated
 *     k and v are stored at row `position`;
 *   scores: work space of heads * capacity floats;
 *   out [heads, D] = softmax(scale q K^T) V over rows 0..position, head h reading kv head
 *     h / (heads / kv_heads);
 * up to num_threads threads split the heads once the cache is long (the same bits on any count). */
aqlm_status aqlm_attend_one(int64_t heads, int64_t kv_heads, int64_t D, int64_t capacity, int64_t position, float *q,
                            float *k, const float *v, const float *cos, const float *sin, float scale, float *keys,
                            float *values, float *scores, float *out, int num_threads, aqlm_error *err);

#ifdef __cplusplus
}
#endif

#endif /* AQLM_H */
