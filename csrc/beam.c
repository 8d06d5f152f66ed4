/*
 * beam.c - beam search over AQLM codes minimising the output error tr((W - What) H (W - What)^T).
 *
 * Output groups are independent, so they are processed in tiles, in parallel. Within a tile, the
 * search visits every input group j (in a seeded random order when asked) and every codebook m
 * within it. Changing code (o, j, m) from c_old to c changes What by D = s_o (C[m, c] - C[m, c_old])
 * in block j, and the loss by
 *     -2 <D, G_j> + D H_jj D^T  =  s_o^2 (norm_j[c] + q . C[m, c]) + const,
 * where G = (W - What) H is the row gradient, norm_j[c] = C[m, c] H_jj C[m, c]^T is shared by all
 * rows, q = -2 G_j / s_o - 2 H_jj C[m, c_old] and const = 2 s_o <C[m, c_old], G_j> + s_o^2 norm_j[c_old].
 * So scoring every codeword for every row is one "top-k of bias + q . codeword" pass (the same
 * kernel as k-means assignment), and after a change only G needs an update, G -= D H[block j],
 * a small GEMM. Losses are tracked in double precision. Greedy search (beam 1) works in place on
 * the caller's arrays; wider beams keep per-hypothesis gradient rows in blocks that move by
 * pointer, copying only when one hypothesis spawns several.
 */
#include <math.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "internal.h"

enum { BEAM_TILE_HYPOTHESES = 64 }; /* hypotheses per tile: their gradient rows stay in cache */
enum { BEAM_MAX_BEAM = 256 };

aqlm_beam_params aqlm_beam_params_default(void) {
    aqlm_beam_params p;
    p.beam_size = 1;
    p.shuffle = 0;
    p.seed = 0;
    p.norms_budget_bytes = (size_t)512 << 20;
    return p;
}

/* Read-only data of one call, shared by all tiles. */
typedef struct {
    aqlm_block_shape s;
    int64_t out_groups, in, D;     /* D = og * ig: dimension of a codeword */
    const float *xtx;              /* [in, in] or NULL (identity) */
    const float *codebooks;        /* [M, K, og, ig] */
    const float *ct;               /* [M, D, K]: codebooks transposed for scoring */
    const float *norms;            /* [G, M, K] or NULL: then computed per tile and step */
    const float *scales;           /* [out_groups] */
    const uint8_t *allowed;        /* [out_groups, G] or NULL */
    const int64_t *group_order;    /* [G] */
    const int64_t *codebook_order; /* [G, M] */
    int64_t beam;                  /* beam size, capped at K */
    int64_t tile_groups;           /* output groups per tile */
    const aqlm_kernels *kernels;
} beam_problem;

/* Per-thread scratch, allocated once per call. */
typedef struct {
    float *queries;       /* [tile hypotheses, D] */
    double *consts;       /* [tile hypotheses] */
    int64_t *query_owner; /* [tile hypotheses]: local group * beam + slot */
    float *values;        /* [tile hypotheses, beam] */
    int32_t *indices;     /* [tile hypotheses, beam] */
    float *delta;         /* [tile hypotheses * og, ig] */
    float **rows;         /* [tile hypotheses * og] gradient rows to update */
    float *norms_step;    /* [K] when norms are not precomputed */
    /* beam > 1 only: hypothesis blocks of the tile and their bookkeeping */
    float *block_grad;     /* [tile groups, beam, og, in] */
    uint16_t *block_codes; /* [tile groups, beam, G * M] */
    int64_t *slot_block;   /* [tile groups, beam]: which block holds each slot */
    double *slot_loss;     /* [tile groups, beam] */
    int64_t *slot_count;   /* [tile groups] */
    double *cand_loss;     /* [beam * beam] candidates of one group */
    int64_t *cand_slot, *cand_code, *order; /* [beam * beam] */
    int64_t *new_block, *uses;              /* [beam] */
    double *new_loss;                       /* [beam] */
} beam_workspace;

static void workspace_free(beam_workspace *w) {
    free(w->queries), free(w->consts), free(w->query_owner), free(w->values), free(w->indices), free(w->delta);
    free(w->rows), free(w->norms_step), free(w->block_grad), free(w->block_codes), free(w->slot_block);
    free(w->slot_loss), free(w->slot_count), free(w->cand_loss), free(w->cand_slot), free(w->cand_code);
    free(w->order), free(w->new_block), free(w->uses), free(w->new_loss);
    memset(w, 0, sizeof *w);
}

static int workspace_alloc(beam_workspace *w, const beam_problem *p) {
    memset(w, 0, sizeof *w);
    const int64_t B = p->beam, T = p->tile_groups, H = T * B, og = p->s.og, GM = p->s.in_groups * p->s.M;
    w->queries = malloc((size_t)(H * p->D) * sizeof(float));
    w->consts = malloc((size_t)H * sizeof(double));
    w->query_owner = malloc((size_t)H * sizeof(int64_t));
    w->values = malloc((size_t)(H * B) * sizeof(float));
    w->indices = malloc((size_t)(H * B) * sizeof(int32_t));
    w->delta = malloc((size_t)(H * og * p->s.ig) * sizeof(float));
    w->rows = malloc((size_t)(H * og) * sizeof(float *));
    int ok = w->queries && w->consts && w->query_owner && w->values && w->indices && w->delta && w->rows;
    if (ok && p->norms == NULL) ok = (w->norms_step = malloc((size_t)p->s.K * sizeof(float))) != NULL;
    if (ok && B > 1) {
        w->block_grad = malloc((size_t)(H * og * p->in) * sizeof(float));
        w->block_codes = malloc((size_t)(H * GM) * sizeof(uint16_t));
        w->slot_block = malloc((size_t)H * sizeof(int64_t));
        w->slot_loss = malloc((size_t)H * sizeof(double));
        w->slot_count = malloc((size_t)T * sizeof(int64_t));
        w->cand_loss = malloc((size_t)(B * B) * sizeof(double));
        w->cand_slot = malloc((size_t)(B * B) * sizeof(int64_t));
        w->cand_code = malloc((size_t)(B * B) * sizeof(int64_t));
        w->order = malloc((size_t)(B * B) * sizeof(int64_t));
        w->new_block = malloc((size_t)B * sizeof(int64_t));
        w->uses = malloc((size_t)B * sizeof(int64_t));
        w->new_loss = malloc((size_t)B * sizeof(double));
        ok = w->block_grad && w->block_codes && w->slot_block && w->slot_loss && w->slot_count && w->cand_loss &&
             w->cand_slot && w->cand_code && w->order && w->new_block && w->uses && w->new_loss;
    }
    if (!ok) workspace_free(w);
    return ok;
}

static void store_code(int code_bits, void *codes, int64_t index, uint32_t code, int64_t K) {
    const int64_t value = code >= (uint32_t)(K / 2) ? (int64_t)code - K : (int64_t)code;
    if (code_bits == 8) ((int8_t *)codes)[index] = (int8_t)value;
    else ((int16_t *)codes)[index] = (int16_t)value;
}

/* The diagonal block H_jj of xtx (row stride in), or NULL for the identity. */
static const float *diagonal_block(const beam_problem *p, int64_t j) {
    return p->xtx != NULL ? p->xtx + j * p->s.ig * p->in + j * p->s.ig : NULL;
}

/* norm_j = sum_r w_r H_jj w_r^T of one codeword w (og rows of ig): the reference kernel on a
 * one-codeword "transposed codebook" (stride 1), the same bits as any kernel's table entry. */
static float codeword_norm(const beam_problem *p, int64_t j, const float *word) {
    float norm;
    aqlm_codeword_norms_ref(0, 1, 1, p->s.og, p->s.ig, word, diagonal_block(p, j), p->in, &norm);
    return norm;
}

/* norm_j[c] for every codeword c of codebook m (from the transposed codebooks). */
static void codeword_norms(const beam_problem *p, int64_t j, int64_t m, float *out) {
    p->kernels->codeword_norms(0, p->s.K, p->s.K, p->s.og, p->s.ig, p->ct + m * p->D * p->s.K, diagonal_block(p, j),
                               p->in, out);
}

/* The query q and constant of one hypothesis (gradient rows `g`, og rows of stride in) for code
 * (j, m) currently c_old; see the file comment. */
static double build_query(const beam_problem *p, const float *g, int64_t j, const float *c_old, float scale,
                          float norm_old, float *q) {
    const int64_t og = p->s.og, ig = p->s.ig, in = p->in;
    double constant = (double)scale * scale * norm_old;
    for (int64_t r = 0; r < og; r++) {
        const float *gj = g + r * in + j * ig;
        const float *w = c_old + r * ig;
        for (int64_t i = 0; i < ig; i++) {
            float hw = w[i];
            if (p->xtx != NULL) {
                const float *h = p->xtx + (j * ig + i) * in + j * ig;
                double sum = 0.0;
                for (int64_t t = 0; t < ig; t++) sum += (double)h[t] * w[t];
                hw = (float)sum;
            }
            q[r * ig + i] = -2.0f * gj[i] / scale - 2.0f * hw;
            constant += 2.0 * scale * w[i] * gj[i];
        }
    }
    return constant;
}

/* delta (og x ig) = scale * (C[m, new] - C[m, old]) */
static void make_delta(const beam_problem *p, const float *words, uint32_t new_code, uint32_t old_code, float scale,
                       float *delta) {
    for (int64_t t = 0; t < p->D; t++) delta[t] = scale * (words[new_code * p->D + t] - words[old_code * p->D + t]);
}

/* G_r -= delta_r H[block j rows] for n gradient rows (each with its own ig deltas). */
static void apply_deltas(const beam_problem *p, int64_t j, int64_t n, const float *delta, float **rows) {
    const int64_t ig = p->s.ig;
    if (n == 0) return;
    if (p->xtx != NULL) {
        p->kernels->gradient_update(n, ig, p->in, delta, p->xtx + j * ig * p->in, rows);
        return;
    }
    for (int64_t row = 0; row < n; row++)
        for (int64_t i = 0; i < ig; i++) rows[row][j * ig + i] -= delta[row * ig + i];
}

static const float *step_norms(const beam_problem *p, beam_workspace *w, int64_t j, int64_t m) {
    if (p->norms != NULL) return p->norms + (j * p->s.M + m) * p->s.K;
    codeword_norms(p, j, m, w->norms_step);
    return w->norms_step;
}

static int group_allowed(const beam_problem *p, int64_t o, int64_t j) {
    return p->allowed == NULL || p->allowed[o * p->s.in_groups + j] != 0;
}

/* Greedy search (beam 1) over output groups [o0, o1), in place. */
static void search_greedy(const beam_problem *p, beam_workspace *w, int64_t o0, int64_t o1, void *codes,
                          float *gradient, double *losses) {
    const int64_t og = p->s.og, ig = p->s.ig, D = p->D, K = p->s.K, G = p->s.in_groups, M = p->s.M, in = p->in;
    for (int64_t step = 0; step < G; step++) {
        const int64_t j = p->group_order[step];
        for (int64_t mm = 0; mm < M; mm++) {
            const int64_t m = p->codebook_order[j * M + mm];
            const float *norms = step_norms(p, w, j, m);
            const float *words = p->codebooks + m * K * D;
            int64_t queries = 0;
            for (int64_t o = o0; o < o1; o++) {
                const float scale = p->scales[o];
                if (scale == 0.0f || !group_allowed(p, o, j)) continue;
                const uint32_t old = aqlm_code_at(p->s.code_bits, codes, (o * G + j) * M + m, p->s.code_mask);
                /* the old codeword's norm, recomputed (same bits as norms[old]): a random read of
                 * the large norms table costs more than these few products */
                w->consts[queries] = build_query(p, gradient + o * og * in, j, words + old * D, scale,
                                                 codeword_norm(p, j, words + old * D), w->queries + queries * D);
                w->query_owner[queries++] = o;
            }
            p->kernels->topk_scores(queries, D, K, 1, w->queries, p->ct + m * D * K, norms, w->values, w->indices);
            int64_t updates = 0;
            for (int64_t t = 0; t < queries; t++) {
                const int64_t o = w->query_owner[t];
                const int64_t at = (o * G + j) * M + m;
                const uint32_t old = aqlm_code_at(p->s.code_bits, codes, at, p->s.code_mask);
                const int32_t best = w->indices[t];
                if (best < 0 || (uint32_t)best == old) continue;
                const float scale = p->scales[o];
                const double loss = losses[o] + w->consts[t] + (double)scale * scale * w->values[t];
                if (!(loss < losses[o])) continue;
                losses[o] = loss;
                store_code(p->s.code_bits, codes, at, (uint32_t)best, K);
                make_delta(p, words, (uint32_t)best, old, scale, w->delta + updates * og * ig);
                for (int64_t r = 0; r < og; r++) w->rows[updates * og + r] = gradient + (o * og + r) * in;
                updates++;
            }
            apply_deltas(p, j, updates * og, w->delta, w->rows);
        }
    }
}

/* Beam search with beam > 1 over output groups [o0, o1); writes the best hypothesis back. */
static void search_beam(const beam_problem *p, beam_workspace *w, int64_t o0, int64_t o1, void *codes,
                        float *gradient, double *losses) {
    const int64_t og = p->s.og, ig = p->s.ig, D = p->D, K = p->s.K, G = p->s.in_groups, M = p->s.M, in = p->in;
    const int64_t B = p->beam, GM = G * M, block_floats = og * in;
    const int64_t groups = o1 - o0;
    for (int64_t u = 0; u < groups; u++) { /* one hypothesis: the given codes */
        const int64_t o = o0 + u;
        for (int64_t b = 0; b < B; b++) w->slot_block[u * B + b] = u * B + b;
        w->slot_count[u] = 1;
        w->slot_loss[u * B] = losses[o];
        memcpy(w->block_grad + (u * B) * block_floats, gradient + o * og * in, (size_t)block_floats * sizeof(float));
        uint16_t *hypothesis = w->block_codes + (u * B) * GM;
        for (int64_t t = 0; t < GM; t++)
            hypothesis[t] = (uint16_t)aqlm_code_at(p->s.code_bits, codes, o * GM + t, p->s.code_mask);
    }
    for (int64_t step = 0; step < G; step++) {
        const int64_t j = p->group_order[step];
        for (int64_t mm = 0; mm < M; mm++) {
            const int64_t m = p->codebook_order[j * M + mm];
            const float *norms = step_norms(p, w, j, m);
            const float *words = p->codebooks + m * K * D;
            int64_t queries = 0;
            for (int64_t u = 0; u < groups; u++) {
                const int64_t o = o0 + u;
                const float scale = p->scales[o];
                if (scale == 0.0f || !group_allowed(p, o, j)) continue;
                for (int64_t b = 0; b < w->slot_count[u]; b++) {
                    const int64_t block = w->slot_block[u * B + b];
                    const uint32_t old = w->block_codes[block * GM + j * M + m];
                    w->consts[queries] = build_query(p, w->block_grad + block * block_floats, j, words + old * D, scale,
                                                     norms[old], w->queries + queries * D);
                    w->query_owner[queries++] = u * B + b;
                }
            }
            p->kernels->topk_scores(queries, D, K, B, w->queries, p->ct + m * D * K, norms, w->values, w->indices);
            int64_t updates = 0, query = 0;
            for (int64_t u = 0; u < groups; u++) {
                const int64_t o = o0 + u;
                const float scale = p->scales[o];
                const int64_t count = w->slot_count[u];
                /* candidates: (loss, source slot, code); kept codes when this group is not searched */
                int64_t candidates = 0;
                for (int64_t b = 0; b < count; b++) {
                    const int64_t block = w->slot_block[u * B + b];
                    const uint32_t old = w->block_codes[block * GM + j * M + m];
                    if (query < queries && w->query_owner[query] == u * B + b) {
                        for (int64_t t = 0; t < B; t++) {
                            const int32_t code = w->indices[query * B + t];
                            if (code < 0) continue;
                            double loss = w->slot_loss[u * B + b] + w->consts[query] + (double)scale * scale * w->values[query * B + t];
                            if ((uint32_t)code == old) loss = w->slot_loss[u * B + b];
                            w->cand_loss[candidates] = loss, w->cand_slot[candidates] = b, w->cand_code[candidates++] = code;
                        }
                        query++;
                    } else {
                        w->cand_loss[candidates] = w->slot_loss[u * B + b], w->cand_slot[candidates] = b;
                        w->cand_code[candidates++] = old;
                    }
                }
                /* the B best candidates, ties to the earlier (source, code) */
                const int64_t keep = candidates < B ? candidates : B;
                for (int64_t t = 0; t < candidates; t++) w->order[t] = t;
                for (int64_t t = 0; t < keep; t++) {
                    int64_t best = t;
                    for (int64_t v = t + 1; v < candidates; v++) {
                        const int64_t a = w->order[v], b = w->order[best];
                        if (w->cand_loss[a] < w->cand_loss[b] ||
                            (w->cand_loss[a] == w->cand_loss[b] &&
                             (w->cand_slot[a] < w->cand_slot[b] || (w->cand_slot[a] == w->cand_slot[b] && w->cand_code[a] < w->cand_code[b]))))
                            best = v;
                    }
                    const int64_t tmp = w->order[t];
                    w->order[t] = w->order[best], w->order[best] = tmp;
                }
                /* new slot t takes its source's block; a source used again gets a free block, copied */
                for (int64_t b = 0; b < B; b++) w->uses[b] = 0;
                for (int64_t t = 0; t < keep; t++) w->uses[w->cand_slot[w->order[t]]]++;
                int64_t free_blocks[BEAM_MAX_BEAM], free_count = 0;
                for (int64_t b = 0; b < B; b++)
                    if (b >= count || w->uses[b] == 0) free_blocks[free_count++] = w->slot_block[u * B + b];
                for (int64_t t = 0; t < keep; t++) {
                    const int64_t c = w->order[t], source = w->cand_slot[c];
                    const int64_t source_block = w->slot_block[u * B + source];
                    int64_t block = source_block;
                    if (w->uses[source] > 1) { /* not the last user: copy into a free block */
                        block = free_blocks[--free_count];
                        memcpy(w->block_grad + block * block_floats, w->block_grad + source_block * block_floats,
                               (size_t)block_floats * sizeof(float));
                        memcpy(w->block_codes + block * GM, w->block_codes + source_block * GM, (size_t)GM * sizeof(uint16_t));
                    }
                    w->uses[source]--;
                    w->new_block[t] = block;
                    w->new_loss[t] = w->cand_loss[c];
                    const uint32_t old = w->block_codes[block * GM + j * M + m], code = (uint32_t)w->cand_code[c];
                    if (code != old) {
                        w->block_codes[block * GM + j * M + m] = (uint16_t)code;
                        make_delta(p, words, code, old, scale, w->delta + updates * og * ig);
                        for (int64_t r = 0; r < og; r++)
                            w->rows[updates * og + r] = w->block_grad + block * block_floats + r * in;
                        updates++;
                    }
                }
                for (int64_t b = 0; b < B; b++) w->uses[b] = 0; /* reuse as "block taken" marks */
                for (int64_t t = 0; t < keep; t++) {
                    w->slot_block[u * B + t] = w->new_block[t];
                    w->slot_loss[u * B + t] = w->new_loss[t];
                    w->uses[w->new_block[t] - u * B] = 1;
                }
                int64_t next = keep; /* remaining slots keep the unused blocks, so every block has one slot */
                for (int64_t b = 0; b < B; b++)
                    if (!w->uses[b]) w->slot_block[u * B + next++] = u * B + b;
                w->slot_count[u] = keep;
            }
            apply_deltas(p, j, updates * og, w->delta, w->rows);
        }
    }
    for (int64_t u = 0; u < groups; u++) {
        const int64_t o = o0 + u, block = w->slot_block[u * B];
        if (!(w->slot_loss[u * B] < losses[o])) continue; /* keep the given codes unless strictly better */
        losses[o] = w->slot_loss[u * B];
        memcpy(gradient + o * og * in, w->block_grad + block * block_floats, (size_t)block_floats * sizeof(float));
        for (int64_t t = 0; t < GM; t++) store_code(p->s.code_bits, codes, o * GM + t, w->block_codes[block * GM + t], K);
    }
}

static void shuffle(int64_t n, int64_t *values, uint64_t *rng) {
    for (int64_t i = n - 1; i > 0; i--) {
        const int64_t j = (int64_t)aqlm_random_below(rng, (uint64_t)(i + 1));
        const int64_t tmp = values[i];
        values[i] = values[j], values[j] = tmp;
    }
}

aqlm_status aqlm_beam_search(const aqlm_format *f, const float *xtx, const float *codebooks, const float *scales,
                             const uint8_t *allowed, void *codes, float *gradient, double *losses,
                             const aqlm_beam_params *params, aqlm_simd simd, int num_threads,
                             aqlm_interrupt_fn interrupt, void *interrupt_context, aqlm_error *err) {
    AQLM_CHECK(err, codebooks && scales && codes && gradient && losses && params,
               "codebooks, scales, codes, gradient, losses and params must not be NULL");
    aqlm_status status = aqlm_codes_check(f, codes, err); /* reads codes: only after the NULL check */
    if (status != AQLM_OK) return status;
    AQLM_CHECK(err, params->beam_size >= 1 && params->beam_size <= BEAM_MAX_BEAM, "beam_size must be in [1, %d], got %d",
               BEAM_MAX_BEAM, params->beam_size);
    AQLM_CHECK(err, num_threads >= 1, "num_threads must be >= 1, got %d", num_threads);
    AQLM_CHECK(err, f->out_group_size * f->in_group_size <= 1024, "out_group_size * in_group_size must be <= 1024, got %lld",
               (long long)(f->out_group_size * f->in_group_size));

    beam_problem p;
    p.s = aqlm_block_shape_of(f);
    p.out_groups = f->out_features / f->out_group_size;
    p.in = f->in_features;
    p.D = p.s.og * p.s.ig;
    const int64_t G = p.s.in_groups, M = p.s.M, K = p.s.K, D = p.D;

    const struct { const char *name; const float *data; int64_t count; } checks[] = {
        {"xtx", xtx, xtx ? p.in * p.in : 0},
        {"codebooks", codebooks, M * K * D},
        {"scales", scales, p.out_groups},
        {"gradient", gradient, f->out_features * p.in},
    };
    for (size_t c = 0; c < sizeof checks / sizeof checks[0]; c++) {
        const int64_t bad = checks[c].count ? aqlm_find_nonfinite(checks[c].data, checks[c].count) : -1;
        if (bad >= 0) {
            aqlm_set_error(err, "beam search input %s has a non-finite value at flat index %lld", checks[c].name, (long long)bad);
            return AQLM_ERR_NUMERIC;
        }
    }
    for (int64_t o = 0; o < p.out_groups; o++) {
        if (!isfinite(losses[o])) {
            aqlm_set_error(err, "beam search input losses has a non-finite value at index %lld", (long long)o);
            return AQLM_ERR_NUMERIC;
        }
    }

    p.xtx = xtx;
    p.codebooks = codebooks;
    p.scales = scales;
    p.allowed = allowed;
    p.beam = params->beam_size < K ? params->beam_size : K;
    p.tile_groups = BEAM_TILE_HYPOTHESES / p.beam > 0 ? BEAM_TILE_HYPOTHESES / p.beam : 1;
    p.kernels = aqlm_kernels_for(simd);

    const int threads = aqlm_threads_for(num_threads, (double)f->out_features * p.in * M * (xtx ? D : 1));
    const size_t norms_bytes = (size_t)(G * M * K) * sizeof(float);
    float *ct = malloc((size_t)(M * D * K) * sizeof(float));
    float *norms = norms_bytes <= params->norms_budget_bytes ? malloc(norms_bytes) : NULL;
    int64_t *group_order = malloc((size_t)G * sizeof(int64_t));
    int64_t *codebook_order = malloc((size_t)(G * M) * sizeof(int64_t));
    beam_workspace *spaces = calloc((size_t)threads, sizeof(beam_workspace));
    if (!ct || (norms_bytes <= params->norms_budget_bytes && !norms) || !group_order || !codebook_order || !spaces) {
        status = aqlm_nomem(err, (size_t)(M * D * K) * sizeof(float) + norms_bytes);
        goto done;
    }
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < K; c++)
            for (int64_t t = 0; t < D; t++) ct[(m * D + t) * K + c] = codebooks[(m * K + c) * D + t];
    uint64_t rng = params->seed;
    for (int64_t j = 0; j < G; j++) group_order[j] = j;
    if (params->shuffle) shuffle(G, group_order, &rng);
    for (int64_t j = 0; j < G; j++) {
        for (int64_t m = 0; m < M; m++) codebook_order[j * M + m] = m;
        if (params->shuffle) shuffle(M, codebook_order + j * M, &rng);
    }
    p.ct = ct;
    p.group_order = group_order;
    p.codebook_order = codebook_order;
    p.norms = NULL;
    if (norms != NULL) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int64_t jm = 0; jm < G * M; jm++) codeword_norms(&p, jm / M, jm % M, norms + jm * K);
        p.norms = norms;
    }
    for (int t = 0; t < threads; t++) {
        if (!workspace_alloc(&spaces[t], &p)) {
            status = aqlm_nomem(err, (size_t)(p.tile_groups * p.beam * p.s.og * p.in) * sizeof(float));
            goto done;
        }
    }

    const int64_t tiles = (p.out_groups + p.tile_groups - 1) / p.tile_groups;
    const int64_t batch = tiles / 16 > threads ? tiles / 16 : threads; /* tiles between interrupt checks */
    for (int64_t first = 0; first < tiles; first += batch) {
        if (interrupt && interrupt(interrupt_context)) {
            aqlm_set_error(err, "beam search interrupted");
            status = AQLM_ERR_INTERRUPTED;
            goto done;
        }
        const int64_t last = first + batch < tiles ? first + batch : tiles;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int64_t tile = first; tile < last; tile++) {
            int rank = 0;
#ifdef _OPENMP
            rank = omp_get_thread_num();
#endif
            const int64_t o0 = tile * p.tile_groups;
            const int64_t o1 = o0 + p.tile_groups < p.out_groups ? o0 + p.tile_groups : p.out_groups;
            if (p.beam == 1) search_greedy(&p, &spaces[rank], o0, o1, codes, gradient, losses);
            else search_beam(&p, &spaces[rank], o0, o1, codes, gradient, losses);
        }
    }

done:
    if (spaces)
        for (int t = 0; t < threads; t++) workspace_free(&spaces[t]);
    free(spaces), free(ct), free(norms), free(group_order), free(codebook_order);
    return status;
}
