/*
 * kmeans.c - Lloyd's k-means for codebook initialisation.
 *
 * Helpers are free functions over raw pointers; aqlm_kmeans only samples, iterates and stops.
 * Degenerate input is handled on purpose: NaN/Inf is an error; fewer points than centroids
 * (common for 2**16-entry codebooks on small layers) makes every point a centroid; empty
 * clusters are refilled by splitting the largest one. Results depend only on the seed, never on
 * the thread count: centroid sums run over points in order, each centroid owned by one thread.
 */
#include <math.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "internal.h"

enum { ASSIGN_CHUNK = 1024 }; /* points per parallel work item */

aqlm_kmeans_params aqlm_kmeans_params_default(void) {
    aqlm_kmeans_params p;
    p.max_iter = 25;
    p.tolerance = 1e-4;
    p.max_points_per_centroid = 256;
    p.init = AQLM_KMEANS_INIT_RANDOM;
    p.seed = 0;
    return p;
}

int64_t aqlm_find_nonfinite(const float *values, int64_t count) {
    for (int64_t i = 0; i < count; i++)
        if (!isfinite(values[i])) return i;
    return -1;
}

/* Distinct indices out of [0, n): the first `count` of a seeded partial Fisher-Yates shuffle. */
static aqlm_status sample_indices(int64_t n, int64_t count, uint64_t *rng, int64_t *out, aqlm_error *err) {
    int64_t *all = malloc((size_t)n * sizeof *all);
    if (all == NULL) return aqlm_nomem(err, (size_t)n * sizeof *all);
    for (int64_t i = 0; i < n; i++) all[i] = i;
    for (int64_t i = 0; i < count; i++) {
        const int64_t j = i + (int64_t)aqlm_random_below(rng, (uint64_t)(n - i));
        const int64_t tmp = all[i];
        all[i] = all[j], all[j] = tmp;
        out[i] = all[i];
    }
    free(all);
    return AQLM_OK;
}

/* Points per k-means++ work item; a multiple of PLUSPLUS_LANES. */
enum { PLUSPLUS_CHUNK = 4096, PLUSPLUS_LANES = 8 };

/* Folds the squared distances of points [i0, i1) (at most PLUSPLUS_CHUNK) to `centroid` into
 * nearest[] (the minimum so far; `first` overwrites) and returns their sum. Coordinates come
 * coordinate-major (xt[t * n + i]) so that every loop below runs over consecutive points and the
 * compiler vectorises it; distances are float32. The sum runs in PLUSPLUS_LANES fixed lanes
 * combined in a fixed order, so it depends only on i0 and i1, never on the thread computing it. */
static double fold_distances(int64_t n, int64_t d, int64_t i0, int64_t i1, const float *restrict xt,
                             const float *restrict centroid, float *restrict nearest, int first) {
    float distance[PLUSPLUS_CHUNK];
    const int64_t count = i1 - i0;
    for (int64_t i = 0; i < count; i++) distance[i] = 0.0f;
    for (int64_t t = 0; t < d; t++) {
        const float *restrict row = xt + t * n + i0;
        const float c = centroid[t];
        for (int64_t i = 0; i < count; i++) {
            const float diff = row[i] - c;
            distance[i] += diff * diff;
        }
    }
    float *restrict folded = nearest + i0;
    if (first)
        for (int64_t i = 0; i < count; i++) folded[i] = distance[i];
    else
        for (int64_t i = 0; i < count; i++) folded[i] = distance[i] < folded[i] ? distance[i] : folded[i];
    float lanes[PLUSPLUS_LANES] = {0};
    int64_t i = 0;
    for (; i + PLUSPLUS_LANES <= count; i += PLUSPLUS_LANES)
        for (int l = 0; l < PLUSPLUS_LANES; l++) lanes[l] += folded[i + l];
    for (; i < count; i++) lanes[i % PLUSPLUS_LANES] += folded[i];
    double total = 0.0;
    for (int l = 0; l < PLUSPLUS_LANES; l++) total += lanes[l];
    return total;
}

/* k-means++ seeding: each next centroid drawn with probability proportional to the squared
 * distance to the nearest centroid chosen so far. The distances are folded chunk by chunk in
 * parallel (fold_distances); the draw walks the chunk sums in order, then the points of the
 * chunk it falls in, so the centroids depend only on the seed, not on the thread count. */
static aqlm_status init_plusplus(int64_t n, int64_t d, int64_t k, const float *x, uint64_t *rng,
                                 float *centroids, int num_threads, aqlm_error *err) {
    const int64_t chunks = (n + PLUSPLUS_CHUNK - 1) / PLUSPLUS_CHUNK;
    float *xt = malloc((size_t)(n * d) * sizeof *xt);
    float *nearest = malloc((size_t)n * sizeof *nearest);
    double *chunk_sums = malloc((size_t)chunks * sizeof *chunk_sums);
    if (xt == NULL || nearest == NULL || chunk_sums == NULL) {
        free(xt), free(nearest), free(chunk_sums);
        return aqlm_nomem(err, (size_t)(n * (d + 1)) * sizeof(float) + (size_t)chunks * sizeof(double));
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t t = 0; t < d; t++) xt[t * n + i] = x[i * d + t];
    const int threads = aqlm_threads_for(num_threads, (double)n * d);
    int64_t chosen = (int64_t)aqlm_random_below(rng, (uint64_t)n);
    for (int64_t c = 0; c < k; c++) {
        memcpy(centroids + c * d, x + chosen * d, (size_t)d * sizeof(float));
        if (c + 1 == k) break;
        const float *centroid = centroids + c * d;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t chunk = 0; chunk < chunks; chunk++) {
            const int64_t i0 = chunk * PLUSPLUS_CHUNK, i1 = i0 + PLUSPLUS_CHUNK < n ? i0 + PLUSPLUS_CHUNK : n;
            chunk_sums[chunk] = fold_distances(n, d, i0, i1, xt, centroid, nearest, c == 0);
        }
        double total = 0.0;
        for (int64_t chunk = 0; chunk < chunks; chunk++) total += chunk_sums[chunk];
        if (!(total > 0.0)) { /* all points coincide with chosen centroids: take any */
            chosen = (int64_t)aqlm_random_below(rng, (uint64_t)n);
            continue;
        }
        double target = (double)(aqlm_random_next(rng) >> 11) * 0x1.0p-53 * total;
        int64_t chunk = 0;
        while (chunk + 1 < chunks && target >= chunk_sums[chunk]) target -= chunk_sums[chunk++];
        const int64_t i0 = chunk * PLUSPLUS_CHUNK, i1 = i0 + PLUSPLUS_CHUNK < n ? i0 + PLUSPLUS_CHUNK : n;
        chosen = -1;
        int64_t last = -1; /* the chunk's last point with weight, should rounding leave target >= 0 */
        for (int64_t i = i0; i < i1; i++) {
            if (!(nearest[i] > 0.0f)) continue;
            last = i;
            target -= nearest[i];
            if (target < 0.0) {
                chosen = i;
                break;
            }
        }
        if (chosen < 0) chosen = last;
        for (int64_t i = n - 1; chosen < 0 && i >= 0; i--) /* a chunk without weight: any point with some */
            if (nearest[i] > 0.0f) chosen = i;
    }
    free(xt), free(nearest), free(chunk_sums);
    return AQLM_OK;
}

/* Nearest centroid of every point, and the sum of squared distances (chunk partial sums added
 * in chunk order, so the total does not depend on the thread count). `scratch` holds, per chunk
 * slot of every thread, ASSIGN_CHUNK queries of d floats and ASSIGN_CHUNK distances. */
static void assign_points(const aqlm_kernels *kernels, int64_t n, int64_t d, int64_t k, const float *x,
                          const float *ct, const float *norms, int32_t *assignment, double *chunk_sums,
                          double *objective, float *scratch, int threads) {
    const int64_t chunks = (n + ASSIGN_CHUNK - 1) / ASSIGN_CHUNK;
#pragma omp parallel num_threads(threads)
    {
        int rank = 0;
#ifdef _OPENMP
        rank = omp_get_thread_num();
#endif
        float *queries = scratch + (size_t)rank * ASSIGN_CHUNK * (d + 1);
        float *values = queries + ASSIGN_CHUNK * d;
#pragma omp for schedule(static)
        for (int64_t chunk = 0; chunk < chunks; chunk++) {
            const int64_t i0 = chunk * ASSIGN_CHUNK, i1 = i0 + ASSIGN_CHUNK < n ? i0 + ASSIGN_CHUNK : n;
            for (int64_t i = i0; i < i1; i++)
                for (int64_t t = 0; t < d; t++) queries[(i - i0) * d + t] = -2.0f * x[i * d + t];
            kernels->topk_scores(i1 - i0, d, k, 1, queries, ct, norms, values, assignment + i0);
            double sum = 0.0;
            for (int64_t i = i0; i < i1; i++) {
                double self = 0.0;
                for (int64_t t = 0; t < d; t++) self += (double)x[i * d + t] * x[i * d + t];
                const double distance = self + values[i - i0];
                sum += distance > 0.0 ? distance : 0.0;
            }
            chunk_sums[chunk] = sum;
        }
    }
    double total = 0.0;
    for (int64_t chunk = 0; chunk < chunks; chunk++) total += chunk_sums[chunk];
    *objective = total;
}

static void transpose_with_norms(int64_t d, int64_t k, const float *centroids, float *ct, float *norms) {
    for (int64_t c = 0; c < k; c++) {
        float norm = 0.0f;
        for (int64_t t = 0; t < d; t++) {
            ct[t * k + c] = centroids[c * d + t];
            norm += centroids[c * d + t] * centroids[c * d + t];
        }
        norms[c] = norm;
    }
}

/* Centroids = means of their points; each thread owns a range of centroids and scans all points
 * in order. Returns the number of empty clusters. */
static int64_t update_centroids(int64_t n, int64_t d, int64_t k, const float *x, const int32_t *assignment,
                                float *centroids, int64_t *counts, double *sums, int threads) {
    memset(counts, 0, (size_t)k * sizeof *counts);
    memset(sums, 0, (size_t)(k * d) * sizeof *sums);
#pragma omp parallel num_threads(threads)
    {
        int nt = 1, rank = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads(), rank = omp_get_thread_num();
#endif
        const int64_t c0 = k * rank / nt, c1 = k * (rank + 1) / nt;
        for (int64_t i = 0; i < n; i++) {
            const int64_t c = assignment[i];
            if (c < c0 || c >= c1) continue;
            counts[c]++;
            for (int64_t t = 0; t < d; t++) sums[c * d + t] += x[i * d + t];
        }
    }
    int64_t empty = 0;
    for (int64_t c = 0; c < k; c++) {
        if (counts[c] == 0) {
            empty++;
            continue;
        }
        for (int64_t t = 0; t < d; t++) centroids[c * d + t] = (float)(sums[c * d + t] / (double)counts[c]);
    }
    return empty;
}

/* Refill each empty cluster by splitting the currently largest one into two slightly moved
 * copies (as faiss does), halving its count. */
static void split_clusters(int64_t d, int64_t k, float *centroids, int64_t *counts) {
    const float eps = 1.0f / 1024.0f;
    for (int64_t c = 0; c < k; c++) {
        if (counts[c] != 0) continue;
        int64_t donor = 0;
        for (int64_t other = 1; other < k; other++)
            if (counts[other] > counts[donor]) donor = other;
        if (counts[donor] < 2) return; /* nothing left to split */
        for (int64_t t = 0; t < d; t++) {
            const float value = centroids[donor * d + t];
            const float sign = (t % 2 == 0) ? 1.0f : -1.0f;
            centroids[c * d + t] = value * (1.0f + sign * eps);
            centroids[donor * d + t] = value * (1.0f - sign * eps);
        }
        counts[c] = counts[donor] / 2;
        counts[donor] -= counts[c];
    }
}

aqlm_status aqlm_kmeans(int64_t n, int64_t d, int64_t k, const float *x, const aqlm_kmeans_params *params,
                        float *centroids, int32_t *assignment, double *objective, aqlm_simd simd, int num_threads,
                        aqlm_interrupt_fn interrupt, void *interrupt_context, aqlm_error *err) {
    AQLM_CHECK(err, params != NULL && x != NULL && centroids != NULL, "x, params and centroids must not be NULL");
    AQLM_CHECK(err, n >= 1 && d >= 1 && d <= 64, "need n >= 1 points of dimension 1 <= d <= 64, got n=%lld d=%lld",
               (long long)n, (long long)d);
    AQLM_CHECK(err, k >= 1 && k <= ((int64_t)1 << 24), "k must be in [1, 2**24], got %lld", (long long)k);
    AQLM_CHECK(err, n < ((int64_t)1 << 40), "too many points: %lld", (long long)n);
    AQLM_CHECK(err, params->max_iter >= 0, "max_iter must be >= 0, got %d", params->max_iter);
    AQLM_CHECK(err, params->tolerance >= 0.0, "tolerance must be >= 0, got %g", params->tolerance);
    AQLM_CHECK(err, params->max_points_per_centroid >= 0, "max_points_per_centroid must be >= 0, got %lld",
               (long long)params->max_points_per_centroid);
    AQLM_CHECK(err, params->init == AQLM_KMEANS_INIT_RANDOM || params->init == AQLM_KMEANS_INIT_PLUSPLUS,
               "unknown init %d", (int)params->init);
    AQLM_CHECK(err, num_threads >= 1, "num_threads must be >= 1, got %d", num_threads);
    const int64_t bad = aqlm_find_nonfinite(x, n * d);
    if (bad >= 0) {
        aqlm_set_error(err, "k-means input has a non-finite value at point %lld, coordinate %lld",
                       (long long)(bad / d), (long long)(bad % d));
        return AQLM_ERR_NUMERIC;
    }

    if (n <= k) { /* every point is a centroid; the rest repeat points cyclically */
        for (int64_t c = 0; c < k; c++) memcpy(centroids + c * d, x + (c % n) * d, (size_t)d * sizeof(float));
        if (assignment)
            for (int64_t i = 0; i < n; i++) assignment[i] = (int32_t)i;
        if (objective) *objective = 0.0;
        return AQLM_OK;
    }

    const aqlm_kernels *kernels = aqlm_kernels_for(simd);
    uint64_t rng = params->seed;
    aqlm_status status = AQLM_OK;
    const int64_t cap = params->max_points_per_centroid;
    const int64_t m = cap > 0 && n > k * cap ? k * cap : n; /* training points */

    const size_t bytes_train = m < n ? (size_t)(m * d) * sizeof(float) : 0;
    float *train = bytes_train ? malloc(bytes_train) : (float *)x;
    int64_t *picked = malloc((size_t)(m > k ? m : k) * sizeof *picked);
    int32_t *labels = malloc((size_t)n * sizeof *labels);
    float *ct = malloc((size_t)(k * d) * sizeof *ct);
    float *norms = malloc((size_t)k * sizeof *norms);
    int64_t *counts = malloc((size_t)k * sizeof *counts);
    double *sums = malloc((size_t)(k * d) * sizeof *sums);
    double *chunk_sums = malloc((size_t)((n + ASSIGN_CHUNK - 1) / ASSIGN_CHUNK) * sizeof *chunk_sums);
    float *scratch = malloc((size_t)num_threads * ASSIGN_CHUNK * (size_t)(d + 1) * sizeof(float));
    if ((bytes_train && !train) || !picked || !labels || !ct || !norms || !counts || !sums || !chunk_sums || !scratch) {
        status = aqlm_nomem(err, bytes_train + (size_t)(k * d) * 16 + (size_t)n * 12);
        goto done;
    }
    if (m < n) {
        if ((status = sample_indices(n, m, &rng, picked, err)) != AQLM_OK) goto done;
        for (int64_t i = 0; i < m; i++) memcpy(train + i * d, x + picked[i] * d, (size_t)d * sizeof(float));
    }
    if (params->init == AQLM_KMEANS_INIT_PLUSPLUS) {
        status = init_plusplus(m, d, k, train, &rng, centroids, num_threads, err);
    } else {
        status = sample_indices(m, k, &rng, picked, err);
        for (int64_t c = 0; status == AQLM_OK && c < k; c++)
            memcpy(centroids + c * d, train + picked[c] * d, (size_t)d * sizeof(float));
    }
    if (status != AQLM_OK) goto done;

    const int threads = aqlm_threads_for(num_threads, (double)m * k * d);
    double previous = INFINITY, current = INFINITY;
    for (int iteration = 0; iteration < params->max_iter; iteration++) {
        if (interrupt && interrupt(interrupt_context)) {
            aqlm_set_error(err, "k-means interrupted at iteration %d", iteration);
            status = AQLM_ERR_INTERRUPTED;
            goto done;
        }
        transpose_with_norms(d, k, centroids, ct, norms);
        assign_points(kernels, m, d, k, train, ct, norms, labels, chunk_sums, &current, scratch, threads);
        if (update_centroids(m, d, k, train, labels, centroids, counts, sums, threads) > 0)
            split_clusters(d, k, centroids, counts);
        if (iteration > 0 && previous - current <= params->tolerance * previous) break;
        previous = current;
    }
    transpose_with_norms(d, k, centroids, ct, norms);
    assign_points(kernels, n, d, k, x, ct, norms, labels, chunk_sums, &current, scratch,
                  aqlm_threads_for(num_threads, (double)n * k * d));
    if (assignment) memcpy(assignment, labels, (size_t)n * sizeof *labels);
    if (objective) *objective = current;

done:
    if (bytes_train) free(train);
    free(picked), free(labels), free(ct), free(norms), free(counts), free(sums), free(chunk_sums), free(scratch);
    return status;
}
