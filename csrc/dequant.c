/*
 * dequant.c - codes + codebooks + scales -> dense weight, for large batches (then BLAS).
 */
#include "internal.h"

enum { DEQUANT_ROW_BLOCK = 16 }; /* output groups per parallel work item */

aqlm_status aqlm_dequantize(const aqlm_format *f, const void *codes, aqlm_dtype param_dtype,
                            const void *codebooks, const void *scales, aqlm_dtype weight_dtype,
                            void *weight, aqlm_simd simd, int num_threads, aqlm_error *err) {
    aqlm_status status = aqlm_check_matmul_args(f, 0, weight_dtype, NULL, codes, param_dtype,
                                                codebooks, scales, NULL, num_threads, err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, weight != NULL, "weight must not be NULL");
    const aqlm_block_shape s = aqlm_block_shape_of(f);
    const aqlm_kernels *kernels = aqlm_kernels_for(simd);
    const int64_t out_groups = f->out_features / s.og;
    const int64_t blocks = (out_groups + DEQUANT_ROW_BLOCK - 1) / DEQUANT_ROW_BLOCK;
    const int threads = aqlm_threads_for(num_threads, (double)f->out_features * f->in_features * s.M / 4);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t block = 0; block < blocks; block++) {
        const int64_t o0 = block * DEQUANT_ROW_BLOCK;
        const int64_t o1 = o0 + DEQUANT_ROW_BLOCK < out_groups ? o0 + DEQUANT_ROW_BLOCK : out_groups;
        kernels->dequant_rows(&s, o0, o1, codes, param_dtype, codebooks, scales, weight_dtype, weight);
    }
    return AQLM_OK;
}
