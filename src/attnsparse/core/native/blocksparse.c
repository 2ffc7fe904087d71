/* Block-sparse prefill attention over kept key blocks (attnsparse.attention.blockattend).
 *
 * One work item is a (batch x selection, query block) pair, a selection being a kv group (its G query heads share
 * the kept blocks) or one query head: the selection's heads and the block's queries form R rows that are scored
 * against tiles of kept key blocks in turn (small key blocks side by side, in ascending order, in one tile of about
 * 64 keys), flash-attention style (running max, running sum, rescaled accumulator), so every kept key and value is
 * read once per item and nothing of size Q x K exists. Scores are a register-blocked 4-row x 16-column product
 * against 16-key panels of a key copy transposed once per call; the weighted values a 4-row x 16-channel product.
 * float32 throughout, causal inside the diagonal span.
 * Items are handed to torch's own OpenMP threads (see blockattn.c for why the kernels share torch's pool).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#define VECTOR_KERNELS 2 /* 16-float vectors: one per panel row */
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VECTOR_KERNELS 1 /* 8-float vectors: two per panel row */
#endif

#if VECTOR_KERNELS == 2
#define ROWS 8   /* rows of the register tile */
#else
#define ROWS 4
#endif
#define COLS 16  /* columns of the register tile: one 16-float or two 8-float vectors */

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

/* Keys are read from a chunk-transposed copy made once per call: chunks of CHUNK consecutive keys, each stored as a
 * (dim x CHUNK) matrix, so a tile's keys are CHUNK-column panels that the score product reads in place (key blocks
 * that are whole chunks) or copies with short contiguous runs (smaller blocks), never a strided transpose per tile. */
#define CHUNK COLS

/* s (rows x width) = q (rows x dim) . [panel 0 | panel 1 | ...], each panel (dim x CHUNK) at kp[n]. */
static void score_tile(const float *q, const float *const *kp, int64_t rows, int64_t dim, int64_t panels,
                       int64_t width, float *s) {
    int64_t r = 0;
#if VECTOR_KERNELS == 2
    for (; r + ROWS <= rows; r += ROWS)
        for (int64_t n = 0; n < panels; n++) {
            const float *kt = kp[n];
            __m512 a[ROWS];
            for (int i = 0; i < ROWS; i++) a[i] = _mm512_setzero_ps();
            for (int64_t d = 0; d < dim; d++) {
                __m512 k0 = _mm512_loadu_ps(kt + d * CHUNK);
                for (int i = 0; i < ROWS; i++) a[i] = _mm512_fmadd_ps(_mm512_set1_ps(q[(r + i) * dim + d]), k0, a[i]);
            }
            for (int i = 0; i < ROWS; i++) _mm512_storeu_ps(s + (r + i) * width + n * CHUNK, a[i]);
        }
#elif VECTOR_KERNELS == 1
    for (; r + ROWS <= rows; r += ROWS)
        for (int64_t n = 0; n < panels; n++) {
            const float *kt = kp[n];
            __m256 a[ROWS][2];
            for (int i = 0; i < ROWS; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
            for (int64_t d = 0; d < dim; d++) {
                __m256 k0 = _mm256_loadu_ps(kt + d * CHUNK), k1 = _mm256_loadu_ps(kt + d * CHUNK + 8);
                for (int i = 0; i < ROWS; i++) {
                    __m256 x = _mm256_set1_ps(q[(r + i) * dim + d]);
                    a[i][0] = _mm256_fmadd_ps(x, k0, a[i][0]);
                    a[i][1] = _mm256_fmadd_ps(x, k1, a[i][1]);
                }
            }
            for (int i = 0; i < ROWS; i++) {
                _mm256_storeu_ps(s + (r + i) * width + n * CHUNK, a[i][0]);
                _mm256_storeu_ps(s + (r + i) * width + n * CHUNK + 8, a[i][1]);
            }
        }
#endif
    for (; r < rows; r++)
        for (int64_t n = 0; n < panels; n++) {
            float *out = s + r * width + n * CHUNK;
            const float *kt = kp[n];
            memset(out, 0, sizeof(float) * CHUNK);
            for (int64_t d = 0; d < dim; d++) {
                float x = q[r * dim + d];
                const float *row = kt + d * CHUNK;
#pragma omp simd
                for (int64_t c = 0; c < CHUNK; c++) out[c] += x * row[c];
            }
        }
}

/* o (rows x dim) += p (rows x stride, first `len` columns) . v, value row c being vp[c / CHUNK] + (c % CHUNK) * dim. */
static void weigh_tile(const float *p, int64_t stride, const float *const *vp, int64_t rows, int64_t len,
                       int64_t dim, float *o) {
    int64_t r = 0;
#if VECTOR_KERNELS == 2
    if (dim % COLS == 0)
        for (; r + ROWS <= rows; r += ROWS)
            for (int64_t d = 0; d < dim; d += COLS) {
                __m512 a[ROWS];
                for (int i = 0; i < ROWS; i++) a[i] = _mm512_loadu_ps(o + (r + i) * dim + d);
                for (int64_t c = 0; c < len; c++) {
                    __m512 v0 = _mm512_loadu_ps(vp[c / CHUNK] + (c % CHUNK) * dim + d);
                    for (int i = 0; i < ROWS; i++)
                        a[i] = _mm512_fmadd_ps(_mm512_set1_ps(p[(r + i) * stride + c]), v0, a[i]);
                }
                for (int i = 0; i < ROWS; i++) _mm512_storeu_ps(o + (r + i) * dim + d, a[i]);
            }
#elif VECTOR_KERNELS == 1
    if (dim % COLS == 0)
        for (; r + ROWS <= rows; r += ROWS)
            for (int64_t d = 0; d < dim; d += COLS) {
                __m256 a[ROWS][2];
                for (int i = 0; i < ROWS; i++) {
                    a[i][0] = _mm256_loadu_ps(o + (r + i) * dim + d);
                    a[i][1] = _mm256_loadu_ps(o + (r + i) * dim + d + 8);
                }
                for (int64_t c = 0; c < len; c++) {
                    const float *row = vp[c / CHUNK] + (c % CHUNK) * dim + d;
                    __m256 v0 = _mm256_loadu_ps(row), v1 = _mm256_loadu_ps(row + 8);
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
            const float *row = vp[c / CHUNK] + (c % CHUNK) * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) out[d] += w * row[d];
        }
    }
}

typedef struct {
    const float *q, *kc, *v;
    const int64_t *offsets, *index;
    int64_t kv_heads, groups, selections, queries, keys, chunks, dim, block, key_block, first, query_blocks,
        tile_blocks, width;
    float scaling;
    float *out;
} Job;

/* Scratch of one thread: queries (R x D), scores (R x W), copied key panels (W/CHUNK x D x CHUNK), copied values
 * (W x D), accumulator (R x D), m, l; each tile column's key position; each panel's keys and values. */
typedef struct {
    float *q, *s, *kt, *vt, *o, *m, *l;
    int64_t *pos;
    const float **kp, **vp;
} Scratch;

/* Collects the next kept key blocks of an item (up to tile_blocks of them, skipping any wholly after the last query
 * p1 - 1) as one tile of CHUNK-column panels: key blocks made of whole chunks are used in place (keys from the
 * chunked copy, values from the value rows); smaller blocks are copied side by side into the scratch panels. Fills
 * kp, vp and pos; returns the tile's columns and advances *e. */
static int64_t gather_tile(const Job *j, const float *chunked, const float *values, int64_t *e, int64_t end,
                           int64_t p1, Scratch *w) {
    int64_t cols = 0, taken = 0, dim = j->dim, in_place = j->key_block % CHUNK == 0;
    for (; *e < end && taken < j->tile_blocks; (*e)++) {
        int64_t t0 = j->index[*e] * j->key_block;
        if (t0 > p1 - 1) continue; /* a block wholly in the future (the selection never keeps one) */
        int64_t nk = t0 + j->key_block < j->keys ? j->key_block : j->keys - t0;
        if (in_place) { /* cols is a multiple of CHUNK here: every earlier block filled whole panels */
            for (int64_t c = 0; c < nk; c += CHUNK) {
                w->kp[(cols + c) / CHUNK] = chunked + (t0 + c) / CHUNK * dim * CHUNK;
                w->vp[(cols + c) / CHUNK] = values + (t0 + c) * dim;
            }
        } else {
            for (int64_t c = 0; c < nk;) { /* runs that cross no chunk boundary, in the source or the tile */
                int64_t src = t0 + c, dst = cols + c, run = nk - c;
                if (run > CHUNK - src % CHUNK) run = CHUNK - src % CHUNK;
                if (run > CHUNK - dst % CHUNK) run = CHUNK - dst % CHUNK;
                const float *from = chunked + src / CHUNK * dim * CHUNK + src % CHUNK;
                float *to = w->kt + dst / CHUNK * dim * CHUNK + dst % CHUNK;
                for (int64_t d = 0; d < dim; d++) memcpy(to + d * CHUNK, from + d * CHUNK, sizeof(float) * (size_t)run);
                c += run;
            }
            memcpy(w->vt + cols * dim, values + t0 * dim, sizeof(float) * (size_t)(nk * dim));
        }
        for (int64_t c = 0; c < nk; c++) w->pos[cols + c] = t0 + c;
        cols += nk;
        taken++;
    }
    if (!in_place)
        for (int64_t n = 0; n * CHUNK < cols; n++) {
            w->kp[n] = w->kt + n * dim * CHUNK;
            w->vp[n] = w->vt + n * CHUNK * dim;
        }
    return cols;
}

static void run_item(const Job *j, int64_t item, Scratch *w) {
    /* item = (batch x selection, query block); a selection covers `share` query heads of one kv head */
    int64_t bs = item / j->query_blocks, r = item % j->query_blocks;
    int64_t heads = j->kv_heads * j->groups, share = heads / j->selections;
    int64_t b = bs / j->selections, head0 = bs % j->selections * share, hk = head0 / j->groups;
    int64_t offset = j->keys - j->queries, block_start = (j->first + r) * j->block;
    int64_t p0 = block_start > offset ? block_start : offset;
    int64_t p1 = block_start + j->block < j->keys ? block_start + j->block : j->keys;
    int64_t nq = p1 - p0, rows = share * nq, dim = j->dim, width = j->width;
    for (int64_t g = 0; g < share; g++) /* rows in (head, query) order, pre-scaled */
        for (int64_t i = 0; i < nq; i++) {
            const float *src = j->q + ((b * heads + head0 + g) * j->queries + (p0 - offset + i)) * dim;
            float *dst = w->q + (g * nq + i) * dim;
            for (int64_t d = 0; d < dim; d++) dst[d] = src[d] * j->scaling;
        }
    memset(w->o, 0, sizeof(float) * (size_t)(rows * dim));
    for (int64_t i = 0; i < rows; i++) { w->m[i] = -INFINITY; w->l[i] = 0.0f; }
    int64_t bk = b * j->kv_heads + hk;
    const float *chunked = j->kc + bk * j->chunks * dim * CHUNK, *values = j->v + bk * j->keys * dim;
    int64_t e = j->offsets[item], end = j->offsets[item + 1];
    while (e < end) {
        int64_t cols = gather_tile(j, chunked, values, &e, end, p1, w);
        if (cols == 0) break;
        score_tile(w->q, w->kp, rows, dim, (cols + CHUNK - 1) / CHUNK, width, w->s);
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
#pragma omp simd reduction(max : top)
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
        weigh_tile(w->s, width, w->vp, rows, cols, dim, w->o);
    }
    for (int64_t g = 0; g < share; g++)
        for (int64_t i = 0; i < nq; i++) {
            int64_t row = g * nq + i;
            float inv = w->l[row] > 0.0f ? 1.0f / w->l[row] : 0.0f;
            float *dst = j->out + ((b * j->queries + (p0 - offset + i)) * heads + head0 + g) * dim;
            const float *o = w->o + row * dim;
            for (int64_t d = 0; d < dim; d++) dst[d] = o[d] * inv;
        }
}

/* q (B, Hkv * G, Q, D); kc the keys chunk-transposed, (B * Hkv, ceil(K / CHUNK), D, CHUNK) zero-padded; v
 * (B * Hkv, K, D); all contiguous float32. One selection per kv group (selections = Hkv) or per query head
 * (selections = Hkv * G): the kept key blocks of item (bs, r) are index[offsets[bs * Qb + r] .. offsets[bs * Qb + r
 * + 1]), ascending, bs = b * selections + s. Queries in blocks of `block`, keys in blocks of `key_block` (a divisor
 * of block), gathered into tiles of about TILE_KEYS columns so small key blocks still give full register tiles.
 * out (B, Q, Hkv * G, D). Returns 0, or -1 when scratch cannot be allocated. */
#define TILE_KEYS 64
int block_sparse_prefill(const float *q, const float *kc, const float *v, const int64_t *offsets,
                         const int64_t *index, int64_t batch, int64_t kv_heads, int64_t groups, int64_t selections,
                         int64_t queries, int64_t keys, int64_t dim, int64_t block, int64_t key_block, int64_t first,
                         int64_t query_blocks, float scaling, int64_t threads, float *out) {
    int64_t tile_blocks = key_block >= TILE_KEYS ? 1 : TILE_KEYS / key_block;
    int64_t width = (tile_blocks * key_block + CHUNK - 1) / CHUNK * CHUNK, panels = width / CHUNK;
    Job job = {q, kc, v, offsets, index, kv_heads, groups, selections, queries, keys, (keys + CHUNK - 1) / CHUNK,
               dim, block, key_block, first, query_blocks, tile_blocks, width, scaling, out};
    int64_t items = batch * selections * query_blocks;
    int64_t rows = kv_heads * groups / selections * block;
    int failed = 0;
    if (threads < 1) threads = 1;
    if (threads > items) threads = items;
    (void)threads;
#pragma omp parallel num_threads((int)threads) if (threads > 1)
    {
        size_t floats = (size_t)(rows * dim * 2 + rows * width + 2 * dim * width + 2 * rows);
        float *base = malloc(sizeof(float) * floats);
        int64_t *pos = malloc(sizeof(int64_t) * (size_t)width);
        const float **panel = malloc(sizeof(float *) * (size_t)(2 * panels));
        if (!base || !pos || !panel) {
#pragma omp atomic write
            failed = 1;
        }
        Scratch w = {NULL, NULL, NULL, NULL, NULL, NULL, NULL, pos, panel, panel ? panel + panels : NULL};
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
            if (base && pos && panel) run_item(&job, item, &w);
        free(base);
        free(pos);
        free(panel);
    }
    return failed ? -1 : 0;
}

/* 2 when this build has the AVX-512 tiles, 1 for AVX2 + FMA, 0 for the portable loops (tests check each build
 * ran the path it was built for). */
int vector_paths(void) {
#ifdef VECTOR_KERNELS
    return VECTOR_KERNELS;
#else
    return 0;
#endif
}
