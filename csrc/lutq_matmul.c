/*
 * lutq_matmul.c - y = x W^T + b for few tokens by quantized lookup tables (see lutq.h).
 *
 * The exact fp32 gather of lut_matmul.c does one table load per code and stalls on the load
 * ports. Here each table is two int8 tables (the high and low bytes of 16-bit entries) with one
 * fp32 step per chunk of input groups and codebook, small enough to sit in vector registers: one
 * in-register permute looks up 64 (AVX-512 VBMI) or 32 (AVX2) output rows at once, summed exactly
 * in int16 and scaled to fp32 once per chunk.
 * Codes must first be repacked (aqlm_lutq_pack_codes) so the rows of a tile lie side by side.
 *
 * Per pass of up to 8 tokens the threads split the input groups (lutq.h): each computes the step
 * of every chunk it meets from a bound that x and the codebooks give (so no thread waits for
 * another's tables), builds and quantizes the tables of its groups in one go, and looks them up
 * for every output row, one slab of chunks at a time, into exact int32 partial sums; after the
 * one barrier each thread adds up the partials of its share of the rows and scales them. So
 * every thread pulls only its share of each row's codes, and even a layer of a few hundred rows
 * keeps every thread busy.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "lutq.h"

aqlm_status aqlm_check_packed_format(const aqlm_format *f, const char *tables, aqlm_error *err) {
    aqlm_status status = aqlm_format_check(f, err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, f->nbits <= 8,
               "%s need codebooks of at most 256 codewords (nbits_per_codebook <= 8), got nbits_per_codebook=%d",
               tables, f->nbits);
    AQLM_CHECK(err, f->out_group_size == 1, "%s need out_group_size=1, got %lld", tables, (long long)f->out_group_size);
    return AQLM_OK;
}

static aqlm_status check_lutq_format(const aqlm_format *f, aqlm_error *err) {
    aqlm_status status = aqlm_check_packed_format(f, "quantized lookup tables", err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, f->in_group_size <= 2 * AQLM_LUTQ_MAX_PAIRS, "quantized lookup tables need in_group_size <= %d, got %lld",
               2 * AQLM_LUTQ_MAX_PAIRS, (long long)f->in_group_size);
    return AQLM_OK;
}

size_t aqlm_lutq_packed_size(const aqlm_format *f) {
    const aqlm_block_shape s = aqlm_block_shape_of(f);
    const int64_t tiles = (f->out_features + AQLM_LUTQ_TILE - 1) / AQLM_LUTQ_TILE;
    const int64_t slots = s.in_groups * s.M;
    return (size_t)(tiles * (aqlm_lutq_nibbles(&s) ? slots / 2 : slots) * AQLM_LUTQ_TILE);
}

aqlm_status aqlm_lutq_pack_codes(const aqlm_format *f, const void *codes, uint8_t *packed, aqlm_error *err) {
    aqlm_status status = check_lutq_format(f, err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, codes != NULL && packed != NULL, "codes and packed must not be NULL");
    const aqlm_block_shape s = aqlm_block_shape_of(f);
    const int64_t out = f->out_features, slots = s.in_groups * s.M;
    const uint8_t mask = (uint8_t)s.code_mask;
    const int nibbles = aqlm_lutq_nibbles(&s);
    const int64_t tiles = (out + AQLM_LUTQ_TILE - 1) / AQLM_LUTQ_TILE;
    memset(packed, 0, aqlm_lutq_packed_size(f));
    for (int64_t tile = 0; tile < tiles; tile++)
        for (int64_t slot = 0; slot < slots; slot++)
            for (int64_t lane = 0; lane < AQLM_LUTQ_TILE; lane++) {
                const int64_t row = tile * AQLM_LUTQ_TILE + lane;
                if (row >= out) continue;
                const uint8_t code = ((const uint8_t *)codes)[row * slots + slot] & mask;
                if (nibbles) packed[((tile * slots + slot) / 2) * AQLM_LUTQ_TILE + lane] |= (uint8_t)(code << (4 * (slot % 2)));
                else packed[(tile * slots + slot) * AQLM_LUTQ_TILE + lane] = code;
            }
    return AQLM_OK;
}

size_t aqlm_lutq_prepared_size(const aqlm_format *f) {
    const aqlm_block_shape s = aqlm_block_shape_of(f);
    return (size_t)(aqlm_lutq_prepared_step(&s) + s.M * s.ig);
}

aqlm_status aqlm_lutq_prepare_codebooks(const aqlm_format *f, aqlm_dtype param_dtype, const void *codebooks,
                                        float *prepared, aqlm_error *err) {
    aqlm_status status = check_lutq_format(f, err);
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, codebooks != NULL && prepared != NULL, "codebooks and prepared must not be NULL");
    const aqlm_block_shape s = aqlm_block_shape_of(f);
    const int64_t M = s.M, K = s.K, ig = s.ig, pairs = aqlm_lutq_pairs(ig);
    const float levels = (float)((1 << aqlm_lutq_entry_shift(ig)) - 1); /* Q (lutq.h) */
    int16_t *cq = (int16_t *)prepared;
    float *column_max = prepared + aqlm_lutq_prepared_column_max(&s), *norm_max = column_max + M * ig;
    float *step = prepared + aqlm_lutq_prepared_step(&s);
    for (int64_t m = 0; m < M; m++) {
        norm_max[m] = 0.0f;
        for (int64_t i = 0; i < ig; i++) {
            column_max[m * ig + i] = 0.0f;
            for (int64_t c = 0; c < K; c++)
                column_max[m * ig + i] = fmaxf(column_max[m * ig + i], fabsf(aqlm_load(param_dtype, codebooks, (m * K + c) * ig + i)));
            step[m * ig + i] = column_max[m * ig + i] / levels;
        }
        for (int64_t c = 0; c < K; c++) {
            float square = 0.0f;
            for (int64_t i = 0; i < ig; i++) {
                const float value = aqlm_load(param_dtype, codebooks, (m * K + c) * ig + i);
                square += value * value;
            }
            norm_max[m] = fmaxf(norm_max[m], sqrtf(square));
        }
        for (int64_t p = 0; p < pairs; p++)
            for (int64_t c = 0; c < K; c++)
                for (int64_t half = 0; half < 2; half++) {
                    const int64_t i = 2 * p + half;
                    const float value = i < ig ? aqlm_load(param_dtype, codebooks, (m * K + c) * ig + i) : 0.0f;
                    const float unit = i < ig ? step[m * ig + i] : 0.0f;
                    cq[((m * pairs + p) * K + c) * 2 + half] = unit > 0.0f ? (int16_t)lrintf(value / unit) : 0;
                }
    }
    return AQLM_OK;
}

/* bound[m] of input groups [j0, j1) of one token x (lutq.h): the largest over the groups of
 * min(sum_i |x_i| column_max[m, i], ||x_group|| norm_max[m]). Sums run over 4 lanes (lane l takes
 * i = l, l + 4, ...) added in a fixed order, then the tail: the same floats on every CPU and on
 * every thread that meets the chunk (each computes it over the whole chunk). */
static void chunk_bound(int64_t ig, int64_t M, int64_t j0, int64_t j1, const float *restrict x,
                        const float *restrict column_max, const float *restrict norm_max, float *restrict bound) {
    for (int64_t m = 0; m < M; m++) bound[m] = 0.0f;
    const int64_t body = ig / 4 * 4;
    for (int64_t j = j0; j < j1; j++) {
        const float *group = x + j * ig;
        float lane[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int64_t i = 0; i < body; i += 4)
            for (int l = 0; l < 4; l++) lane[l] += group[i + l] * group[i + l];
        float square = (lane[0] + lane[2]) + (lane[1] + lane[3]);
        for (int64_t i = body; i < ig; i++) square += group[i] * group[i];
        const float norm = sqrtf(square);
        for (int64_t m = 0; m < M; m++) {
            const float *maxima = column_max + m * ig;
            float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int64_t i = 0; i < body; i += 4)
                for (int l = 0; l < 4; l++) part[l] += fabsf(group[i + l]) * maxima[i + l];
            float sum = (part[0] + part[2]) + (part[1] + part[3]);
            for (int64_t i = body; i < ig; i++) sum += fabsf(group[i]) * maxima[i];
            /* comparisons, not fminf/fmaxf (library calls): a NaN group leaves the bound as it was */
            const float by_norm = norm * norm_max[m], tighter = sum < by_norm ? sum : by_norm;
            bound[m] = tighter > bound[m] ? tighter : bound[m];
        }
    }
}

/* The first of thread p's input groups when G groups are split between P threads as evenly as
 * can be (p = P gives G). */
static int64_t range_start(int64_t G, int P, int p) { return G * p / P; }

/* How the input groups are split (lutq.h): thread p takes groups [bounds[p], bounds[p + 1]) and
 * pieces [piece0[p], piece0[p + 1]); chunk b has pieces [first[b], first[b + 1]). */
typedef struct {
    int threads;
    int64_t *bounds, *piece0, *first; /* [threads + 1], [threads + 1], [chunks + 1] */
} group_split;

/* Pieces of all threads, to size the buffers. */
static int64_t count_pieces(int64_t G, int64_t group, int P) {
    int64_t pieces = 0;
    for (int p = 0; p < P; p++) pieces += aqlm_lutq_pieces(range_start(G, P, p), range_start(G, P, p + 1), group);
    return pieces;
}

static void fill_split(int64_t G, int64_t group, group_split *split) {
    const int P = split->threads;
    split->piece0[0] = 0;
    for (int p = 0; p < P; p++) {
        const int64_t g0 = range_start(G, P, p), g1 = range_start(G, P, p + 1);
        split->bounds[p] = g0;
        split->piece0[p + 1] = split->piece0[p] + aqlm_lutq_pieces(g0, g1, group);
        /* pieces are numbered by thread then chunk, which is chunk order: a chunk's first piece is
         * the one of the first thread whose range meets it */
        for (int64_t b = g0 / group; b * group < g1; b++)
            if (b * group >= g0) split->first[b] = split->piece0[p] + b - g0 / group;
    }
    split->bounds[P] = G;
    split->first[(G + group - 1) / group] = split->piece0[P];
}

/* With the input groups split, a team pays off on far smaller layers than the other kernels
 * need: at one token on 2 cores (2x8g8, medians of 3 runs, 1 -> 2 threads forced) 2 threads
 * break even near 9k units of `work` below: 128x128 (8.7k) 4.8 -> 5.0 us, 256x128 (9.2k) 5.3 ->
 * 5.4-5.7 us, 64x256 (16.9k) 6.8 -> 6.1 us, 256x256 (18.4k) 8.1 -> 6.9 us, where the process-wide
 * threshold is 262144. So lutq's work counts LUTQ_WORK_WEIGHT-fold against that threshold (262144
 * / 24 = 10923 by default; aqlm_set_min_parallel_work(0) still forces teams). */
enum { LUTQ_WORK_WEIGHT = 24 };

/* Codes each thread streams into L2 while it builds its first token's tables: all of its share
 * of a layer of SmolLM2's size (at most 110 KiB there), the first part of a larger one's (128,
 * 256 and 1024 KiB measured alike on SmolLM2; the kernels prefetch the rest as they go). Of the
 * next call's codes (aqlm_lutq_next), the first NEXT_CODE_BYTES of the same thread's share,
 * beside all of its prepared codebooks. */
enum { EARLY_CODE_BYTES = 128 << 10, NEXT_CODE_BYTES = 8 << 10 };

/* Cache lines to prefetch a few at a time, in order: runs of `run` bytes, `stride` apart from
 * `first` (a thread's codes: each tile's run of its input groups, tile after tile, the order the
 * accumulate kernels read them), up to `total` lines. `next` lines are done; the next one lies
 * `offset` bytes into the run from `run_first` (the line's byte next * 64 is `offset` into run
 * number (next * 64) / run), kept without a division per line (SmolLM2 decoding, perf: the
 * driver's own share of the samples 11.9% -> 10.2%). */
typedef struct {
    const uint8_t *run_first;
    int64_t run, stride, offset, next, total;
} line_stream;

static line_stream lines_of(const void *first, int64_t run, int64_t stride, int64_t total) {
    return (line_stream){.run_first = first, .run = run, .stride = stride, .offset = 0, .next = 0, .total = total};
}

/* Thread p's codes of a P-thread call on weight f (packed codes), at most `budget` bytes. */
static line_stream code_lines(const aqlm_format *f, const uint8_t *packed, int P, int p, int64_t budget) {
    const aqlm_block_shape s = aqlm_block_shape_of(f);
    const int64_t G = s.in_groups, g0 = G * p / P, g1 = G * (p + 1) / P;
    const int64_t tiles = (f->out_features + AQLM_LUTQ_TILE - 1) / AQLM_LUTQ_TILE;
    const int64_t line = (aqlm_lutq_nibbles(&s) ? s.M / 2 : s.M) * AQLM_LUTQ_TILE; /* one group's codes in a tile */
    const int64_t run = (g1 - g0) * line, lines = (run * tiles + 63) / 64;
    return lines_of(packed + g0 * line, run > 0 ? run : 1, G * line, lines < budget / 64 ? lines : budget / 64);
}

/* `bytes` bytes from `first`, as one run. */
static line_stream flat_lines(const void *first, int64_t bytes) {
    return lines_of(first, bytes > 0 ? bytes : 1, 0, (bytes + 63) / 64);
}

static void prefetch_lines(line_stream *stream, int64_t count) {
    for (; count > 0 && stream->next < stream->total; count--, stream->next++) {
        aqlm_lutq_prefetch(stream->run_first, stream->offset);
        for (stream->offset += 64; stream->offset >= stream->run; stream->offset -= stream->run)
            stream->run_first += stream->stride;
    }
}

/* Threads for a call: never more than there are input groups (each thread takes at least one). */
static int lutq_threads(int num_threads, double work, int64_t G) {
    const int threads = aqlm_threads_for(num_threads, work * LUTQ_WORK_WEIGHT);
    return threads < G ? threads : (int)G;
}

/* Where each buffer of a call lies in its work memory (offsets from a 64-byte aligned base). */
typedef struct {
    size_t prepared, x, qhi, qlo, qscale, partials, acc, split, bytes;
} lutq_layout;

/* The layout for up to T tokens a pass and P threads; x32 (a float32 copy of x) only for other
 * dtypes, the prepared codebooks only when the caller has none. */
static lutq_layout layout_of(const aqlm_format *f, int64_t group, int64_t T, int P, int copy_x, int prepare) {
    const aqlm_block_shape s = aqlm_block_shape_of(f);
    const int64_t G = s.in_groups, M = s.M, KS = aqlm_lutq_table_stride(s.K), chunks = (G + group - 1) / group;
    const int64_t tiles = (f->out_features + AQLM_LUTQ_TILE - 1) / AQLM_LUTQ_TILE, stride = tiles * AQLM_LUTQ_TILE;
    const int64_t pieces = count_pieces(G, group, P);
    lutq_layout l;
    l.bytes = 0;
    l.prepared = aqlm_carve(&l.bytes, prepare ? aqlm_lutq_prepared_size(f) * sizeof(float) : 0);
    l.x = aqlm_carve(&l.bytes, copy_x ? (size_t)(T * f->in_features) * sizeof(float) : 0);
    l.qhi = aqlm_carve(&l.bytes, (size_t)(T * G * M * KS) + AQLM_LUTQ_PAD);
    l.qlo = aqlm_carve(&l.bytes, (size_t)(T * G * M * KS) + AQLM_LUTQ_PAD);
    l.qscale = aqlm_carve(&l.bytes, (size_t)(T * chunks * M) * sizeof(float));
    l.partials = aqlm_carve(&l.bytes, (size_t)(pieces * T * M * stride) * sizeof(int32_t));
    l.acc = aqlm_carve(&l.bytes, (size_t)(T * stride) * sizeof(float));
    l.split = aqlm_carve(&l.bytes, (size_t)(2 * (P + 1) + chunks + 1) * sizeof(int64_t));
    return l;
}

size_t aqlm_lutq_workspace_size(const aqlm_format *f, int64_t group, int64_t n, aqlm_dtype x_dtype, int num_threads) {
    const aqlm_block_shape s = aqlm_block_shape_of(f);
    const int64_t T = n < AQLM_LUTQ_MAX_TOKENS ? n : AQLM_LUTQ_MAX_TOKENS;
    size_t most = 0; /* the pieces, and so the partials, depend on the thread count */
    for (int P = 1; P <= num_threads && P <= s.in_groups; P++) {
        const size_t bytes = layout_of(f, group, T, P, x_dtype != AQLM_F32, 1).bytes;
        most = bytes > most ? bytes : most;
    }
    return most;
}

/* One call's state between its steps: its shape, its buffers in its work memory, its split. */
typedef struct {
    aqlm_lutq_call call;
    aqlm_block_shape s;
    const aqlm_lutq_kernels *kernels;
    int64_t in, out, ig, M, G, KS, chunks, tiles, stride, T, group_bytes;
    int P, copy_x, own;
    char *base;
    const float *ready, *column_max, *norm_max;
    float *x32, *qscale, *acc;
    int8_t *qhi, *qlo;
    int32_t *partials;
    group_split split;
} lutq_state;

/* Checks a call, carves (or allocates) its work memory, splits its input groups between its
 * threads and prepares its codebooks where the caller has not. */
static aqlm_status lutq_begin(const aqlm_lutq_call *call, aqlm_simd simd, int num_threads, lutq_state *c,
                              aqlm_error *err) {
    const aqlm_format *f = call->format;
    c->own = 0, c->base = NULL;
    AQLM_CHECK(err, f != NULL, "format must not be NULL");
    aqlm_status status = check_lutq_format(f, err);
    if (status != AQLM_OK) return status;
    const int64_t group = call->group, n = call->n;
    AQLM_CHECK(err, group >= 1 && group <= AQLM_LUTQ_MAX_GROUP,
               "input groups per table scale must be in [1, %d], got %lld", AQLM_LUTQ_MAX_GROUP, (long long)group);
    AQLM_CHECK(err, n >= 0, "number of tokens must be >= 0, got %lld", (long long)n);
    AQLM_CHECK(err, call->packed != NULL && call->codebooks != NULL && call->scales != NULL,
               "packed codes, codebooks and scales must not be NULL");
    AQLM_CHECK(err, n == 0 || (call->x != NULL && call->y != NULL), "x and y must not be NULL");
    AQLM_CHECK(err, num_threads >= 1, "num_threads must be >= 1, got %d", num_threads);
    c->call = *call;
    c->P = 1, c->copy_x = 0;
    if (n == 0) return AQLM_OK;

    const aqlm_block_shape s = aqlm_block_shape_of(f);
    c->s = s, c->kernels = aqlm_lutq_kernels_for(simd);
    c->in = f->in_features, c->out = f->out_features, c->ig = s.ig, c->M = s.M, c->G = s.in_groups;
    c->KS = aqlm_lutq_table_stride(s.K), c->chunks = (c->G + group - 1) / group;
    c->tiles = (c->out + AQLM_LUTQ_TILE - 1) / AQLM_LUTQ_TILE, c->stride = c->tiles * AQLM_LUTQ_TILE;
    c->T = n < AQLM_LUTQ_MAX_TOKENS ? n : AQLM_LUTQ_MAX_TOKENS;
    /* Lookups are ~8 per vector operation (two tables), table entries ~8 per FMA. */
    const double work = (double)c->T * ((double)c->out * c->G * c->M / 8 + (double)c->G * c->M * s.K * c->ig / 8);
    c->P = lutq_threads(num_threads, work, c->G);
    c->copy_x = call->x_dtype != AQLM_F32; /* float32 x is read where it is */

    const lutq_layout l = layout_of(f, group, c->T, c->P, c->copy_x, call->prepared == NULL);
    c->own = call->workspace == NULL || call->workspace_bytes < l.bytes || ((uintptr_t)call->workspace & 63) != 0;
    c->base = c->own ? aligned_alloc(64, l.bytes) : call->workspace;
    if (!c->base) {
        c->own = 0;
        return aqlm_nomem(err, l.bytes);
    }
    char *base = c->base;
    c->x32 = (float *)(base + l.x), c->qscale = (float *)(base + l.qscale), c->acc = (float *)(base + l.acc);
    c->qhi = (int8_t *)(base + l.qhi), c->qlo = (int8_t *)(base + l.qlo);
    c->partials = (int32_t *)(base + l.partials);
    int64_t *split_arrays = (int64_t *)(base + l.split);
    c->split = (group_split){.threads = c->P, .bounds = split_arrays, .piece0 = split_arrays + (c->P + 1),
                             .first = split_arrays + 2 * (c->P + 1)};
    fill_split(c->G, group, &c->split);
    if (!call->prepared) /* f checked above */
        aqlm_lutq_prepare_codebooks(f, call->param_dtype, call->codebooks, (float *)(base + l.prepared), err);
    c->ready = call->prepared ? call->prepared : (const float *)(base + l.prepared);
    c->column_max = c->ready + aqlm_lutq_prepared_column_max(&s), c->norm_max = c->column_max + c->M * c->ig;
    memset(c->qhi + c->T * c->G * c->M * c->KS, 0, AQLM_LUTQ_PAD);
    memset(c->qlo + c->T * c->G * c->M * c->KS, 0, AQLM_LUTQ_PAD);
    /* A chunk's tables (all tokens, high and low) per slab of lookups. */
    c->group_bytes = 2 * c->T * c->M * c->KS;
    return AQLM_OK;
}

static void lutq_end(lutq_state *c) {
    if (c->own) free(c->base);
    c->own = 0, c->base = NULL;
}

/* The pass of tokens [t0, t0 + tokens) in float32: x itself, or its copy in x32 (lutq_copy_pass). */
static const float *pass_input(const lutq_state *c, int64_t t0) {
    return c->copy_x ? c->x32 : (const float *)c->call.x + t0 * c->in;
}

static void lutq_copy_pass(const lutq_state *c, int64_t t0, int64_t tokens) {
    if (c->copy_x)
        for (int64_t index = 0; index < tokens * c->in; index++) c->x32[index] = aqlm_load(c->call.x_dtype, c->call.x, t0 * c->in + index);
}

/* Step 1 of a pass for the parts [member, member + team, ...) of the P: each part's tables, then
 * all of its lookups, into its partial sums. */
static void lutq_tables_and_lookups(const lutq_state *c, int64_t t0, int64_t tokens, int member, int team) {
    const aqlm_format *f = c->call.format;
    const aqlm_block_shape *s = &c->s;
    const aqlm_lutq_next *next = c->call.next;
    const int64_t group = c->call.group, G = c->G, M = c->M, KS = c->KS, in = c->in, chunks = c->chunks;
    const int P = c->P;
    const float *xs = pass_input(c, t0);
    for (int p = member; p < P; p += team) {
        const int64_t g0 = c->split.bounds[p], g1 = c->split.bounds[p + 1];
        /* The first token's tables are built one group at a time, with a few lines of this
         * thread's codes prefetched after each: they stream in from memory while the tables
         * compute, where a layer the others have evicted would otherwise have the lookups
         * wait on them (a burst of prefetches only stalls; SmolLM2 decoding: 7% faster).
         * So do the next call's first lines (aqlm_lutq_next), for the same thread, and p's share
         * of the memory the caller reads soon after. */
        enum { STREAMS = 4 };
        line_stream streams[STREAMS] = {code_lines(f, c->call.packed, P, p, EARLY_CODE_BYTES), flat_lines(NULL, 0),
                                        flat_lines(NULL, 0), flat_lines(NULL, 0)};
        if (next != NULL && next->prepared != NULL) {
            streams[1] = flat_lines(next->prepared, (int64_t)aqlm_lutq_prepared_size(&next->format) * (int64_t)sizeof(float));
            streams[2] = code_lines(&next->format, next->packed, P, p, NEXT_CODE_BYTES);
        }
        if (next != NULL && next->soon != NULL && next->soon_bytes > 0) { /* p's share, whole lines */
            const int64_t lines = (next->soon_bytes + 63) / 64, first = lines * p / P, last = lines * (p + 1) / P;
            streams[3] = flat_lines((const uint8_t *)next->soon + first * 64, (last - first) * 64);
        }
        int64_t lines_per_group[STREAMS];
        for (int r = 0; r < STREAMS; r++) lines_per_group[r] = (streams[r].total + (g1 - g0) - 1) / (g1 - g0);
        for (int64_t t = 0; t < tokens; t++)
            for (int64_t b = g0 / group; b * group < g1; b++) {
                int64_t from, to;
                aqlm_lutq_piece_bounds(b, group, g0, g1, &from, &to);
                /* the whole chunk's bound, the same float on every thread that meets it */
                float bound[AQLM_LUTQ_MAX_CODEBOOKS], inverse[AQLM_LUTQ_MAX_CODEBOOKS];
                chunk_bound(c->ig, M, b * group, (b + 1) * group < G ? (b + 1) * group : G, xs + t * in,
                            c->column_max, c->norm_max, bound);
                for (int64_t m = 0; m < M; m++) inverse[m] = bound[m] > 0.0f ? (float)AQLM_LUTQ_LEVELS / bound[m] : 0.0f;
                if (b * group >= g0) /* one writer per step: the thread holding the chunk's start */
                    for (int64_t m = 0; m < M; m++) c->qscale[(t * chunks + b) * M + m] = bound[m] / (float)AQLM_LUTQ_LEVELS;
                int8_t *high = c->qhi + (t * G + from) * M * KS, *low = c->qlo + (t * G + from) * M * KS;
                if (t0 == 0 && t == 0)
                    for (int64_t j = from; j < to; j++) {
                        c->kernels->tables(s, j, j + 1, xs, c->ready, inverse, high + (j - from) * M * KS, low + (j - from) * M * KS);
                        for (int r = 0; r < STREAMS; r++) prefetch_lines(&streams[r], lines_per_group[r]);
                    }
                else
                    c->kernels->tables(s, from, to, xs + t * in, c->ready, inverse, high, low);
            }
        /* Slabs of chunks whose tables stay in L2 while every tile's codes stream past. */
        for (int64_t b0 = g0 / group; b0 * group < g1;) {
            int64_t b1 = b0 + 1, slab_bytes = group * c->group_bytes;
            while (b1 * group < g1 && slab_bytes + group * c->group_bytes <= AQLM_LUTQ_SLAB_BYTES)
                b1++, slab_bytes += group * c->group_bytes;
            const int64_t from = b0 * group > g0 ? b0 * group : g0, to = b1 * group < g1 ? b1 * group : g1;
            int32_t *target = c->partials + (c->split.piece0[p] + b0 - g0 / group) * tokens * M * c->stride;
            c->kernels->accumulate(s, group, from, to, c->tiles, c->call.packed, tokens, c->qhi, c->qlo, target, c->stride);
            b0 = b1;
        }
    }
}

/* Step 2 of a pass, after every part's step 1: the rows of each part's share summed, scaled and stored. */
static void lutq_finish(const lutq_state *c, int64_t t0, int64_t tokens, int member, int team) {
    const int64_t out = c->out, stride = c->stride;
    const int P = c->P;
    const aqlm_dtype x_dtype = c->call.x_dtype, param_dtype = c->call.param_dtype;
    for (int p = member; p < P; p += team) {
        const int64_t units = stride / AQLM_LUTQ_ROW_BLOCK;
        const int64_t row0 = units * p / P * AQLM_LUTQ_ROW_BLOCK, row1 = units * (p + 1) / P * AQLM_LUTQ_ROW_BLOCK;
        if (row0 == row1) continue;
        c->kernels->finish(c->M, c->chunks, c->split.first, tokens, c->partials, stride, row0, row1, c->qscale, c->acc);
        const int64_t last = row1 < out ? row1 : out;
        if (x_dtype == AQLM_F32 && param_dtype == AQLM_F32) { /* the same, in loops that vectorize */
            const float *scale = (const float *)c->call.scales, *shift = (const float *)c->call.bias;
            for (int64_t t = 0; t < tokens; t++) {
                float *target = (float *)c->call.y + (t0 + t) * out;
                const float *sums = c->acc + t * stride;
                if (shift)
                    for (int64_t row = row0; row < last; row++) target[row] = sums[row] * scale[row] + shift[row];
                else
                    for (int64_t row = row0; row < last; row++) target[row] = sums[row] * scale[row] + 0.0f;
            }
            continue;
        }
        for (int64_t row = row0; row < last; row++) {
            const float scale = aqlm_load(param_dtype, c->call.scales, row);
            const float shift = c->call.bias ? aqlm_load(param_dtype, c->call.bias, row) : 0.0f;
            for (int64_t t = 0; t < tokens; t++)
                aqlm_store(x_dtype, c->call.y, (t0 + t) * out + row, c->acc[t * stride + row] * scale + shift);
        }
    }
}

aqlm_status aqlm_lutq_matmul(const aqlm_format *f, int64_t group, int64_t n, aqlm_dtype x_dtype,
                             const void *x, const uint8_t *packed, aqlm_dtype param_dtype,
                             const void *codebooks, const float *prepared, const void *scales, const void *bias,
                             void *y, const aqlm_lutq_next *next, void *workspace, size_t workspace_bytes,
                             aqlm_simd simd, int num_threads, aqlm_error *err) {
    const aqlm_lutq_call call = {.format = f, .group = group, .n = n, .x_dtype = x_dtype, .x = x, .packed = packed,
                                 .param_dtype = param_dtype, .codebooks = codebooks, .prepared = prepared,
                                 .scales = scales, .bias = bias, .y = y, .next = next, .workspace = workspace,
                                 .workspace_bytes = workspace_bytes};
    lutq_state c;
    const aqlm_status status = lutq_begin(&call, simd, num_threads, &c, err);
    if (status != AQLM_OK || n == 0) return status;
    for (int64_t t0 = 0; t0 < n; t0 += c.T) {
        const int64_t tokens = n - t0 < c.T ? n - t0 : c.T;
        lutq_copy_pass(&c, t0, tokens);
#pragma omp parallel num_threads(c.P)
        {
            /* The team may be smaller than asked (OMP_THREAD_LIMIT, nesting): each member then
             * plays several of the P parts, the same work in the same places. */
            const int member = omp_get_thread_num(), team = omp_get_num_threads();
            lutq_tables_and_lookups(&c, t0, tokens, member, team);
#pragma omp barrier
            lutq_finish(&c, t0, tokens, member, team);
        }
    }
    lutq_end(&c);
    return AQLM_OK;
}

aqlm_status aqlm_lutq_matmul_many(int count, const aqlm_lutq_call *calls, aqlm_simd simd, int num_threads,
                                  aqlm_error *err) {
    AQLM_CHECK(err, count >= 0 && count <= AQLM_LUTQ_MAX_CALLS, "count must be in [0, %d], got %d", AQLM_LUTQ_MAX_CALLS, count);
    AQLM_CHECK(err, count == 0 || calls != NULL, "calls must not be NULL");
    lutq_state states[AQLM_LUTQ_MAX_CALLS];
    aqlm_status status = AQLM_OK;
    int begun = 0, P = 1;
    for (; begun < count && status == AQLM_OK; begun++) {
        const aqlm_lutq_call *call = &calls[begun];
        if (call->n > AQLM_LUTQ_MAX_TOKENS) {
            aqlm_set_error(err, "calls run together take at most %d tokens each, call %d has %lld", AQLM_LUTQ_MAX_TOKENS,
                           begun, (long long)call->n);
            status = AQLM_ERR_ARGUMENT;
            break;
        }
        status = lutq_begin(call, simd, num_threads, &states[begun], err);
        if (status == AQLM_OK && call->n > 0) {
            lutq_copy_pass(&states[begun], 0, call->n);
            P = states[begun].P > P ? states[begun].P : P;
        }
    }
    if (status == AQLM_OK) {
#pragma omp parallel num_threads(P)
        {
            const int member = omp_get_thread_num(), team = omp_get_num_threads();
            for (int i = 0; i < count; i++)
                if (states[i].call.n > 0) lutq_tables_and_lookups(&states[i], 0, states[i].call.n, member, team);
#pragma omp barrier
            for (int i = 0; i < count; i++)
                if (states[i].call.n > 0) lutq_finish(&states[i], 0, states[i].call.n, member, team);
        }
    }
    for (int i = 0; i < begun; i++) lutq_end(&states[i]);
    return status;
}
