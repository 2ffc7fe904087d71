/* Block-sparse prefill attention over kept key blocks (attnsparse.attention.blockattend).
 *
 * One work item is a (batch x kv head, query block) pair: the G query heads of the group and the block's queries
 * form R = G x nq rows that are scored against tiles of kept key blocks in turn (small key blocks gathered, in
 * ascending order, into one tile of about 64 keys), flash-attention style (running max, running sum, rescaled
 * accumulator), so every kept key and value is read once per item and nothing of size Q x K exists. Scores are
 * a register-blocked 4-row x 16-column product against the tile's keys transposed once per tile; the weighted
 * values a 4-row x 16-channel product. float32 throughout, causal inside the diagonal span.
 * Items are handed to torch's own OpenMP threads (see blockattn.c for why the kernels share torch's pool).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VECTOR_KERNELS 1
#endif

#define ROWS 4   /* rows of the register tile */
#define COLS 16  /* columns of the register tile: two 8-float vectors */

/* exp(x) for x <= 0 in float32 (relative error ~2e-7): 2^(x log2 e) as an integer power times a degree-6
 * polynomial on [-ln2/2, ln2/2]; branch-free so the loops over a row vectorize; arguments below -87 give 0. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.44269504088896341f;
    float k = __builtin_roundf(t);
    float f = (t - k) * 0.693147180559945309f;
    float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 + f * (1.0f / 720))))));
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* s (rows x width) = q (rows x dim) . kt (dim x width); width a multiple of COLS. */
static void score_tile(const float *q, const float *kt, int64_t rows, int64_t dim, int64_t width, float *s) {
    int64_t r = 0;
#ifdef VECTOR_KERNELS
    for (; r + ROWS <= rows; r += ROWS)
        for (int64_t c = 0; c < width; c += COLS) {
            __m256 a[ROWS][2];
            for (int i = 0; i < ROWS; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
            for (int64_t d = 0; d < dim; d++) {
                __m256 k0 = _mm256_loadu_ps(kt + d * width + c), k1 = _mm256_loadu_ps(kt + d * width + c + 8);
                for (int i = 0; i < ROWS; i++) {
                    __m256 x = _mm256_set1_ps(q[(r + i) * dim + d]);
                    a[i][0] = _mm256_fmadd_ps(x, k0, a[i][0]);
                    a[i][1] = _mm256_fmadd_ps(x, k1, a[i][1]);
                }
            }
            for (int i = 0; i < ROWS; i++) {
                _mm256_storeu_ps(s + (r + i) * width + c, a[i][0]);
                _mm256_storeu_ps(s + (r + i) * width + c + 8, a[i][1]);
            }
        }
#endif
    for (; r < rows; r++) {
        float *out = s + r * width;
        memset(out, 0, sizeof(float) * (size_t)width);
        for (int64_t d = 0; d < dim; d++) {
            float x = q[r * dim + d];
            const float *row = kt + d * width;
#pragma omp simd
            for (int64_t c = 0; c < width; c++) out[c] += x * row[c];
        }
    }
}

/* o (rows x dim) += p (rows x stride, first `len` columns) . v (len x dim). */
static void weigh_tile(const float *p, int64_t stride, const float *v, int64_t rows, int64_t len, int64_t dim,
                       float *o) {
    int64_t r = 0;
#ifdef VECTOR_KERNELS
    if (dim % COLS == 0)
        for (; r + ROWS <= rows; r += ROWS)
            for (int64_t d = 0; d < dim; d += COLS) {
                __m256 a[ROWS][2];
                for (int i = 0; i < ROWS; i++) {
                    a[i][0] = _mm256_loadu_ps(o + (r + i) * dim + d);
                    a[i][1] = _mm256_loadu_ps(o + (r + i) * dim + d + 8);
                }
                for (int64_t c = 0; c < len; c++) {
                    __m256 v0 = _mm256_loadu_ps(v + c * dim + d), v1 = _mm256_loadu_ps(v + c * dim + d + 8);
                    for (int i = 0; i < ROWS; i++) {
                        __m256 w = _mm256_set1_ps(p[(r + i) * stride + c]);
                        a[i][0] = _mm256_fmadd_ps(w, v0, a[i][0]);
                        a[i][1] = _mm256_fmadd_ps(w, v1, a[i][1]);
                    }
                }
                for (int i = 0; i < ROWS; i++) {
                    _mm256_storeu_ps(o + (r + i) * dim + d, a[i][0]);
                    _mm256_storeu_ps(o + (r + i) * dim + d + 8, a[i][1]);
                }
            }
#endif
    for (; r < rows; r++) {
        float *out = o + r * dim;
        for (int64_t c = 0; c < len; c++) {
            float w = p[r * stride + c];
            const float *row = v + c * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) out[d] += w * row[d];
        }
    }
}

typedef struct {
    const float *q, *k, *v;
    const int64_t *offsets, *index;
    int64_t kv_heads, groups, queries, keys, dim, block, key_block, first, query_blocks, tile_blocks, width;
    float scaling;
    float *out;
} Job;

/* Scratch of one thread: queries (R x D), scores (R x W), keys transposed (D x W), gathered values (W x D),
 * accumulator (R x D), m, l; the key position of each tile column. */
typedef struct {
    float *q, *s, *kt, *vt, *o, *m, *l;
    int64_t *pos;
} Scratch;

/* Gathers the next kept key blocks of an item (up to tile_blocks of them, skipping any wholly after the last query
 * p1 - 1) into one tile: keys transposed, values by row, each column's position. Returns the tile's columns and
 * advances *e; *values points at the values to weigh (the gathered ones, or the block itself when a tile is one
 * block, which needs no copy). */
static int64_t gather_tile(const Job *j, const float *keys, const float *values, int64_t *e, int64_t end,
                           int64_t p1, Scratch *w, const float **weighed) {
    int64_t cols = 0, taken = 0, dim = j->dim, width = j->width, t_single = -1;
    for (; *e < end && taken < j->tile_blocks; (*e)++) {
        int64_t t0 = j->index[*e] * j->key_block;
        if (t0 > p1 - 1) continue; /* a block wholly in the future (the selection never keeps one) */
        int64_t nk = t0 + j->key_block < j->keys ? j->key_block : j->keys - t0;
        for (int64_t d = 0; d < dim; d++) {
            float *col = w->kt + d * width + cols;
            for (int64_t c = 0; c < nk; c++) col[c] = keys[(t0 + c) * dim + d];
        }
        if (j->tile_blocks > 1) memcpy(w->vt + cols * dim, values + t0 * dim, sizeof(float) * (size_t)(nk * dim));
        else t_single = t0;
        for (int64_t c = 0; c < nk; c++) w->pos[cols + c] = t0 + c;
        cols += nk;
        taken++;
    }
    for (int64_t d = 0; d < dim; d++)
        for (int64_t c = cols; c < width; c++) w->kt[d * width + c] = 0.0f;
    *weighed = t_single >= 0 ? values + t_single * dim : w->vt;
    return cols;
}

static void run_item(const Job *j, int64_t item, Scratch *w) {
    int64_t bh = item / j->query_blocks, r = item % j->query_blocks;
    int64_t offset = j->keys - j->queries, block_start = (j->first + r) * j->block;
    int64_t p0 = block_start > offset ? block_start : offset;
    int64_t p1 = block_start + j->block < j->keys ? block_start + j->block : j->keys;
    int64_t nq = p1 - p0, rows = j->groups * nq, dim = j->dim, width = j->width;
    for (int64_t g = 0; g < j->groups; g++) /* rows in (g, query) order, pre-scaled */
        for (int64_t i = 0; i < nq; i++) {
            const float *src = j->q + ((bh * j->groups + g) * j->queries + (p0 - offset + i)) * dim;
            float *dst = w->q + (g * nq + i) * dim;
            for (int64_t d = 0; d < dim; d++) dst[d] = src[d] * j->scaling;
        }
    memset(w->o, 0, sizeof(float) * (size_t)(rows * dim));
    for (int64_t i = 0; i < rows; i++) { w->m[i] = -INFINITY; w->l[i] = 0.0f; }
    const float *keys = j->k + bh * j->keys * dim, *values = j->v + bh * j->keys * dim;
    int64_t e = j->offsets[item], end = j->offsets[item + 1];
    while (e < end) {
        const float *weighed;
        int64_t cols = gather_tile(j, keys, values, &e, end, p1, w, &weighed);
        if (cols == 0) break;
        score_tile(w->q, w->kt, rows, dim, width, w->s);
        int diagonal = w->pos[cols - 1] > p0; /* some rows see only a prefix of the (ascending) columns */
        for (int64_t i = 0; i < rows; i++) {
            float *s = w->s + i * width;
            int64_t seen = cols; /* columns of this tile the row may see */
            if (diagonal) {
                int64_t pos = p0 + i % nq;
                while (seen > 0 && w->pos[seen - 1] > pos) seen--;
            }
            if (seen <= 0) { /* nothing visible here: weights 0 */
                memset(s, 0, sizeof(float) * (size_t)cols);
                continue;
            }
            float top = w->m[i];
            for (int64_t c = 0; c < seen; c++) top = s[c] > top ? s[c] : top;
            float alpha = exp_nonpositive(w->m[i] - top), total = 0.0f; /* m = -inf first: alpha 0 */
#pragma omp simd reduction(+ : total)
            for (int64_t c = 0; c < seen; c++) {
                s[c] = exp_nonpositive(s[c] - top);
                total += s[c];
            }
            for (int64_t c = seen; c < cols; c++) s[c] = 0.0f;
            w->l[i] = w->l[i] * alpha + total;
            w->m[i] = top;
            if (alpha != 1.0f) {
                float *o = w->o + i * dim;
#pragma omp simd
                for (int64_t d = 0; d < dim; d++) o[d] *= alpha;
            }
        }
        weigh_tile(w->s, width, weighed, rows, cols, dim, w->o);
    }
    int64_t heads = j->kv_heads * j->groups, b = bh / j->kv_heads, hk = bh % j->kv_heads;
    for (int64_t g = 0; g < j->groups; g++)
        for (int64_t i = 0; i < nq; i++) {
            int64_t row = g * nq + i;
            float inv = w->l[row] > 0.0f ? 1.0f / w->l[row] : 0.0f;
            float *dst = j->out + ((b * j->queries + (p0 - offset + i)) * heads + hk * j->groups + g) * dim;
            const float *o = w->o + row * dim;
            for (int64_t d = 0; d < dim; d++) dst[d] = o[d] * inv;
        }
}

/* q (B*Hkv, G, Q, D), k and v (B*Hkv, K, D), all contiguous float32; queries in blocks of `block`, keys in blocks
 * of `key_block` (a divisor of block); kept key blocks of item (bh, r) are index[offsets[bh * Qb + r] ..
 * offsets[bh * Qb + r + 1]), ascending; out (B, Q, Hkv * G, D). Kept key blocks are gathered into tiles of about
 * TILE_KEYS columns, so small key blocks still give full register tiles. Returns 0, or -1 when scratch cannot be
 * allocated. */
#define TILE_KEYS 64
int block_sparse_prefill(const float *q, const float *k, const float *v, const int64_t *offsets,
                         const int64_t *index, int64_t batch, int64_t kv_heads, int64_t groups, int64_t queries,
                         int64_t keys, int64_t dim, int64_t block, int64_t key_block, int64_t first,
                         int64_t query_blocks, float scaling, int64_t threads, float *out) {
    int64_t tile_blocks = key_block >= TILE_KEYS ? 1 : TILE_KEYS / key_block;
    int64_t width = (tile_blocks * key_block + COLS - 1) / COLS * COLS;
    Job job = {q, k, v, offsets, index, kv_heads, groups, queries, keys, dim, block, key_block, first, query_blocks,
               tile_blocks, width, scaling, out};
    int64_t items = batch * kv_heads * query_blocks;
    int64_t rows = groups * block;
    int failed = 0;
    if (threads < 1) threads = 1;
    if (threads > items) threads = items;
    (void)threads;
#pragma omp parallel num_threads((int)threads) if (threads > 1)
    {
        size_t floats = (size_t)(rows * dim * 2 + rows * width + 2 * dim * width + 2 * rows);
        float *base = malloc(sizeof(float) * floats);
        int64_t *pos = malloc(sizeof(int64_t) * (size_t)width);
        if (!base || !pos) {
#pragma omp atomic write
            failed = 1;
        }
        Scratch w = {NULL, NULL, NULL, NULL, NULL, NULL, NULL, pos};
        if (base) {
            w.q = base;
            w.s = w.q + rows * dim;
            w.kt = w.s + rows * width;
            w.vt = w.kt + dim * width;
            w.o = w.vt + width * dim;
            w.m = w.o + rows * dim;
            w.l = w.m + rows;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++)
            if (base && pos) run_item(&job, item, &w);
        free(base);
        free(pos);
    }
    return failed ? -1 : 0;
}

/* 1 when this build has the AVX2 + FMA tiles, 0 for the portable loops (tests check both builds ran). */
int vector_paths(void) {
#ifdef VECTOR_KERNELS
    return 1;
#else
    return 0;
#endif
}
