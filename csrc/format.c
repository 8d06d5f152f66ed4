/*
 * format.c - validation of the weight format and of matmul arguments, shared by the drivers.
 */
#include "internal.h"

aqlm_status aqlm_format_check(const aqlm_format *f, aqlm_error *err) {
    AQLM_CHECK(err, f != NULL, "format is NULL");
    AQLM_CHECK(err, f->out_features > 0 && f->in_features > 0,
               "out_features and in_features must be positive, got %lld and %lld",
               (long long)f->out_features, (long long)f->in_features);
    AQLM_CHECK(err, f->out_group_size > 0 && f->in_group_size > 0,
               "out_group_size and in_group_size must be positive, got %lld and %lld",
               (long long)f->out_group_size, (long long)f->in_group_size);
    AQLM_CHECK(err, f->out_features % f->out_group_size == 0,
               "out_group_size %lld does not divide out_features %lld", (long long)f->out_group_size,
               (long long)f->out_features);
    AQLM_CHECK(err, f->in_features % f->in_group_size == 0,
               "in_group_size %lld does not divide in_features %lld", (long long)f->in_group_size,
               (long long)f->in_features);
    AQLM_CHECK(err, f->num_codebooks > 0 && f->num_codebooks <= 256,
               "num_codebooks must be in [1, 256], got %lld", (long long)f->num_codebooks);
    AQLM_CHECK(err, f->nbits >= 1 && f->nbits <= 16, "nbits_per_codebook must be in [1, 16], got %d",
               f->nbits);
    const int expected_bits = f->nbits <= 8 ? 8 : 16;
    AQLM_CHECK(err, f->code_bits == expected_bits,
               "codes for nbits_per_codebook=%d must be int%d, got int%d", f->nbits, expected_bits,
               f->code_bits);
    /* Keep every product of sizes that the loops form far from int64 overflow. */
    const int64_t limit = (int64_t)1 << 40;
    AQLM_CHECK(err, f->out_features < limit && f->in_features < limit &&
                        f->out_group_size * f->in_group_size < ((int64_t)1 << 20) &&
                        f->out_features / f->out_group_size * (f->in_features / f->in_group_size) <
                            limit / f->num_codebooks &&
                        f->out_features < limit / f->in_features,
               "sizes too large: out_features=%lld in_features=%lld", (long long)f->out_features,
               (long long)f->in_features);
    return AQLM_OK;
}

aqlm_status aqlm_codes_check(const aqlm_format *f, const void *codes, aqlm_error *err) {
    aqlm_status status = aqlm_format_check(f, err);
    if (status != AQLM_OK) return status;
    if (f->nbits == f->code_bits) return AQLM_OK; /* every stored value reads back in range */
    const int64_t K = (int64_t)1 << f->nbits;
    const int64_t in_groups = f->in_features / f->in_group_size;
    const int64_t count = f->out_features / f->out_group_size * in_groups * f->num_codebooks;
    for (int64_t index = 0; index < count; index++) {
        const int64_t value = f->code_bits == 8 ? (int64_t)((const int8_t *)codes)[index]
                                                : (int64_t)((const int16_t *)codes)[index];
        if (value < -K / 2 || value >= K) {
            const int64_t m = index % f->num_codebooks, j = index / f->num_codebooks % in_groups;
            const int64_t o = index / f->num_codebooks / in_groups;
            AQLM_CHECK(err, 0,
                       "code out of range for %d-bit codebooks at codes[%lld, %lld, %lld]: %lld "
                       "(stored codes must lie in [%lld, %lld))",
                       f->nbits, (long long)o, (long long)j, (long long)m, (long long)value,
                       (long long)(-K / 2), (long long)K);
        }
    }
    return AQLM_OK;
}

aqlm_block_shape aqlm_block_shape_of(const aqlm_format *f) {
    aqlm_block_shape s;
    s.og = f->out_group_size;
    s.ig = f->in_group_size;
    s.M = f->num_codebooks;
    s.K = (int64_t)1 << f->nbits;
    s.in_groups = f->in_features / f->in_group_size;
    s.code_bits = f->code_bits;
    s.code_mask = (uint32_t)(s.K - 1);
    return s;
}

static int dtype_valid(aqlm_dtype dtype) {
    return dtype == AQLM_F32 || dtype == AQLM_F16 || dtype == AQLM_BF16;
}

aqlm_status aqlm_check_matmul_args(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype,
                                   const void *x, const void *codes, aqlm_dtype param_dtype,
                                   const void *codebooks, const void *scales, const void *y,
                                   int num_threads, aqlm_error *err) {
    /* Every pointer is checked before anything is read through one (the codes' range check reads codes). */
    AQLM_CHECK(err, codes != NULL && codebooks != NULL && scales != NULL,
               "codes, codebooks and scales must not be NULL");
    AQLM_CHECK(err, n >= 0, "number of tokens must be >= 0, got %lld", (long long)n);
    AQLM_CHECK(err, n == 0 || (x != NULL && y != NULL), "x and y must not be NULL");
    AQLM_CHECK(err, dtype_valid(x_dtype) && dtype_valid(param_dtype), "unknown dtype code %d or %d",
               (int)x_dtype, (int)param_dtype);
    AQLM_CHECK(err, num_threads >= 1, "num_threads must be >= 1, got %d", num_threads);
    return aqlm_codes_check(f, codes, err);
}

int aqlm_threads_for(int num_threads, double work) {
    /* Below ~256k elementary operations (tens of microseconds) a thread team costs more than it
     * saves, and far more when the machine is oversubscribed and a waiting thread loses its core. */
    if (num_threads < 1 || work < 262144.0) return 1;
    return num_threads;
}
