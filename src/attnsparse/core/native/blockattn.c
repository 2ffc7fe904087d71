/* Decode-step attention over selected key blocks, read in place (attnsparse.decode_kernels).
 *
 * The torch path gathers the selected blocks into a copy and then runs SDPA over it, so every selected byte
 * crosses memory three times (read, write, read). Here each selected key and value is read once: scores for the
 * G query heads of a kv group against a block's keys, a softmax over all selected scores, then the weighted
 * sum of the selected values. float32 throughout, like SDPA on CPU.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define MAX_THREADS 64
/* Work (tokens of keys and values read, summaries counted in the same unit) below which one thread is faster
 * than handing items to torch's other threads. */
#define THREADED_MIN_TOKENS 1024
#define TOKEN_TILE 2048 /* tokens (or blocks) scored at a time: (G + 1) x TILE floats stay in L1/L2 */

/* exp(x) for x <= 0 in float32: 2^(x log2 e) split into an integer power and a degree-6 polynomial on
 * [-0.5, 0.5] (relative error ~2e-7); branch-free so loops over scores vectorize. Arguments below -87 give 0. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.44269504088896341f;
    float k = __builtin_roundf(t);
    float f = (t - k) * 0.693147180559945309f; /* e^f with |f| <= ln2 / 2 */
    float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 + f * (1.0f / 720))))));
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#if defined(__AVX2__) && defined(__FMA__)
#define VECTOR_KERNELS 1
#endif
#define WAYS 8 /* rows read side by side: one read stream each keeps enough reads in flight */

#ifdef VECTOR_KERNELS
/* Lane i of the result = the sum of the 8 lanes of a[i]. */
static inline __m256 lane_sums(const __m256 a[8]) {
    __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

/* Row j of WAYS runs of `block` rows at once (output position j * WAYS + w holds run w's row j), dim a multiple of
 * 8: eight independent FMA chains instead of one reduction's latency per dot product, and eight read streams.
 * Scattered 4 KB blocks read one after another reach a third of the copy bandwidth on the machines we measured,
 * eight side by side more than twice that (benchmarks/README.md). */
static void score_ways(const float *q, const float *const rows[WAYS], int64_t block, int64_t groups, int64_t dim,
                       float scale, int64_t stride, float *out) {
    __m256 s = _mm256_set1_ps(scale);
    for (int64_t j = 0; j < block; j++)
        for (int64_t g = 0; g < groups; g++) {
            const float *qg = q + g * dim;
            __m256 acc[WAYS];
            for (int w = 0; w < WAYS; w++) acc[w] = _mm256_setzero_ps();
            for (int64_t d = 0; d < dim; d += 8) {
                __m256 qd = _mm256_loadu_ps(qg + d);
                for (int w = 0; w < WAYS; w++) acc[w] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(rows[w] + j * dim + d), acc[w]);
            }
            _mm256_storeu_ps(out + g * stride + j * WAYS, _mm256_mul_ps(s, lane_sums(acc)));
        }
}

/* acc_g += sum over rows (j, w) of p[g * stride + j * WAYS + w] * rows[w][j], the layout of score_ways. Columns go
 * 64 at a time through eight vector registers, so no accumulator leaves registers within a call. */
static void weigh_ways(const float *p, int64_t stride, const float *const rows[WAYS], int64_t block, int64_t groups,
                       int64_t dim, float *acc) {
    for (int64_t d0 = 0; d0 < dim; d0 += 64) {
        int64_t width = dim - d0 < 64 ? dim - d0 : 64;
        for (int64_t g = 0; g < groups; g++) {
            float *o = acc + g * dim + d0;
            const float *pg = p + g * stride;
            if (width == 64) {
                __m256 a[8];
                for (int k = 0; k < 8; k++) a[k] = _mm256_loadu_ps(o + 8 * k);
                for (int64_t j = 0; j < block; j++)
                    for (int w = 0; w < WAYS; w++) {
                        __m256 weight = _mm256_set1_ps(pg[j * WAYS + w]);
                        const float *row = rows[w] + j * dim + d0;
                        for (int k = 0; k < 8; k++) a[k] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(row + 8 * k), a[k]);
                    }
                for (int k = 0; k < 8; k++) _mm256_storeu_ps(o + 8 * k, a[k]);
            } else {
                for (int64_t j = 0; j < block; j++)
                    for (int w = 0; w < WAYS; w++) {
                        float weight = pg[j * WAYS + w];
                        const float *row = rows[w] + j * dim + d0;
#pragma omp simd
                        for (int64_t d = 0; d < width; d++) o[d] += weight * row[d];
                    }
            }
        }
    }
}
#endif

static inline float dot(const float *a, const float *b, int64_t dim) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < dim; d++) s += a[d] * b[d];
    return s;
}

/* The eight consecutive rows from `first` as side-by-side runs of one row. */
static inline void consecutive_rows(const float *first, int64_t dim, const float *rows[WAYS]) {
    for (int w = 0; w < WAYS; w++) rows[w] = first + w * dim;
}

/* out[g * stride + i] = scale * q_g . rows[i] for `len` consecutive rows and the G query heads. */
static void score_rows(const float *q, const float *rows, int64_t len, int64_t groups, int64_t dim, float scale,
                       int64_t stride, float *out) {
    int64_t i = 0;
#ifdef VECTOR_KERNELS
    for (const float *eight[WAYS]; dim % 8 == 0 && i + WAYS <= len; i += WAYS) {
        consecutive_rows(rows + i * dim, dim, eight);
        score_ways(q, eight, 1, groups, dim, scale, stride, out + i);
    }
#endif
    for (; i < len; i++)
        for (int64_t g = 0; g < groups; g++) out[g * stride + i] = scale * dot(q + g * dim, rows + i * dim, dim);
}

/* acc_g += sum_i p[g * stride + i] rows[i] for `len` consecutive rows and the G query heads. */
static void weigh_rows(const float *p, int64_t stride, const float *rows, int64_t len, int64_t groups, int64_t dim,
                       float *acc) {
    int64_t i = 0;
#ifdef VECTOR_KERNELS
    for (const float *eight[WAYS]; i + WAYS <= len; i += WAYS) {
        consecutive_rows(rows + i * dim, dim, eight);
        weigh_ways(p + i, stride, eight, 1, groups, dim, acc);
    }
#endif
    for (; i < len; i++)
        for (int64_t g = 0; g < groups; g++) {
            float w = p[g * stride + i];
            float *o = acc + g * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) o[d] += w * rows[i * dim + d];
        }
}

/* One step of a walk over the selected blocks index[c, c1) of `base` (blocks of `block` rows of `dim`, rows >= n
 * not attended): WAYS full blocks side by side (their first rows in rows[0..WAYS)) when the vector kernels apply,
 * else one block, maybe partial (rows[0]). Returns the blocks taken; *tokens: the rows they hold. */
static int64_t walk_step(const float *base, const int64_t *index, int64_t c, int64_t c1, int64_t block, int64_t dim,
                         int64_t n, const float *rows[WAYS], int64_t *tokens) {
#ifdef VECTOR_KERNELS
    if (dim % 8 == 0 && c + WAYS <= c1) {
        int64_t w = 0;
        while (w < WAYS && (index[c + w] + 1) * block <= n) w++;
        if (w == WAYS) {
            for (w = 0; w < WAYS; w++) rows[w] = base + index[c + w] * block * dim;
            *tokens = WAYS * block;
            return WAYS;
        }
    }
#else
    (void)c1;
#endif
    int64_t first = index[c] * block;
    rows[0] = base + first * dim;
    *tokens = (first + block < n ? first + block : n) - first;
    return 1;
}

/* Attention of the G query heads q (G, D) over selected blocks index[c0, c1) of one kv head (keys/values
 * (cap, D), blocks of `block` tokens, positions >= n not attended), unnormalised so parts can be merged:
 * m[g] = max score, l[g] = sum of exp(score - m[g]), acc[g] = sum of exp(score - m[g]) v. scores: scratch of
 * G * (c1 - c0) * block floats; their order only has to agree between the key and the value pass. */
static void attend_part(const float *q, const float *keys, const float *values, const int64_t *index,
                        int64_t groups, int64_t dim, int64_t block, int64_t c0, int64_t c1, int64_t n,
                        float scaling, float *scores, float *m, float *l, float *acc) {
    int64_t stride = (c1 - c0) * block, used = 0, tokens;
    const float *rows[WAYS];
    for (int64_t c = c0; c < c1; used += tokens) {
        int64_t ways = walk_step(keys, index, c, c1, block, dim, n, rows, &tokens);
#ifdef VECTOR_KERNELS
        if (ways == WAYS) score_ways(q, rows, block, groups, dim, scaling, stride, scores + used);
#endif
        if (ways == 1) score_rows(q, rows[0], tokens, groups, dim, scaling, stride, scores + used);
        c += ways;
    }
    for (int64_t g = 0; g < groups; g++) {
        float *row = scores + g * stride;
        float top = -INFINITY;
        for (int64_t j = 0; j < used; j++) top = row[j] > top ? row[j] : top;
        float total = 0.0f;
        if (used > 0) {
#pragma omp simd reduction(+ : total)
            for (int64_t j = 0; j < used; j++) {
                row[j] = exp_nonpositive(row[j] - top);
                total += row[j];
            }
        }
        m[g] = top;
        l[g] = total;
        memset(acc + g * dim, 0, sizeof(float) * (size_t)dim);
    }
    used = 0;
    for (int64_t c = c0; c < c1; used += tokens) {
        int64_t ways = walk_step(values, index, c, c1, block, dim, n, rows, &tokens);
#ifdef VECTOR_KERNELS
        if (ways == WAYS) weigh_ways(scores + used, stride, rows, block, groups, dim, acc);
#endif
        if (ways == 1) weigh_rows(scores + used, stride, rows[0], tokens, groups, dim, acc);
        c += ways;
    }
}

/* out (G, D) from `parts` partial results (m, l: parts x G; acc: parts x G x D). */
static void merge_parts(int64_t parts, int64_t groups, int64_t dim, const float *m, const float *l,
                        const float *acc, float *out) {
    for (int64_t g = 0; g < groups; g++) {
        float top = -INFINITY;
        for (int64_t s = 0; s < parts; s++) top = m[s * groups + g] > top ? m[s * groups + g] : top;
        float total = 0.0f;
        float *o = out + g * dim;
        memset(o, 0, sizeof(float) * (size_t)dim);
        for (int64_t s = 0; s < parts; s++) {
            if (l[s * groups + g] <= 0.0f) continue;
            float w = exp_nonpositive(m[s * groups + g] - top);
            total += w * l[s * groups + g];
            const float *a = acc + (s * groups + g) * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) o[d] += w * a[d];
        }
        float inv = total > 0.0f ? 1.0f / total : 0.0f;
#pragma omp simd
        for (int64_t d = 0; d < dim; d++) o[d] *= inv;
    }
}

/* One head, one part: attention over all its selected blocks, normalised into out (G, D). */
static void attend_head(const float *q, const float *keys, const float *values, const int64_t *index,
                        int64_t groups, int64_t dim, int64_t block, int64_t count, int64_t n, float scaling,
                        float *scratch, float *out) {
    float *m = scratch, *l = m + groups, *acc = l + groups, *scores = acc + groups * dim;
    attend_part(q, keys, values, index, groups, dim, block, 0, count, n, scaling, scores, m, l, acc);
    merge_parts(1, groups, dim, m, l, acc, out);
}

int block_attend(const float *q, const float *keys, const float *values, const int64_t *index, int64_t heads,
                 int64_t groups, int64_t dim, int64_t cap, int64_t block, int64_t count, int64_t n, float scaling,
                 float *out) {
    float *scratch = malloc(sizeof(float) * (size_t)(groups * (2 + dim + count * block)));
    if (!scratch) return -1;
    for (int64_t h = 0; h < heads; h++) {
        attend_head(q + h * groups * dim, keys + h * cap * dim, values + h * cap * dim, index + h * count, groups,
                    dim, block, count, n, scaling, scratch, out + h * groups * dim);
    }
    free(scratch);
    return 0;
}

/* Quickselect: reorder v[0, n) so that its `k` largest values come first (0 < k < n). */
static void select_largest(float *v, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        float pivot = v[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pivot) i++;
            while (v[j] < pivot) j--;
            if (i <= j) { float t = v[i]; v[i] = v[j]; v[j] = t; i++; j--; }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else return;
    }
}

#define PICK_SAMPLE 256

/* Copy into `out` the scores that can be among the `count` best, from a threshold set on an evenly spaced sample
 * with a margin, and return how many; 0 when the sample's threshold keeps fewer than `count` (rare: then every
 * score is a candidate). Exact either way: whenever `count` scores pass, the `count` best are among them. */
static int64_t likely_candidates(const float *score, int64_t blocks, int64_t count, float *out) {
    if (blocks < 4 * PICK_SAMPLE || 4 * count > blocks) return 0;
    int64_t step = blocks / PICK_SAMPLE, sampled = 0;
    for (int64_t b = 0; b < blocks; b += step) out[sampled++] = score[b];
    int64_t rank = 2 * count * sampled / blocks + 8; /* twice the expected rank of the true threshold, plus slack */
    if (rank >= sampled) return 0;
    select_largest(out, sampled, rank);
    float low = out[0];
    for (int64_t j = 1; j < rank; j++) low = out[j] < low ? out[j] : low;
    int64_t kept = 0;
    for (int64_t b = 0; b < blocks; b++) {
        out[kept] = score[b];
        kept += score[b] >= low;
    }
    return kept >= count ? kept : 0;
}

/* Keep the `count` best-scored blocks (count < blocks): index (count) ascending; ties at the threshold go to lower
 * block indices. score is left as is; copy: scratch of `blocks` floats. */
static void pick_blocks(const float *score, int64_t blocks, int64_t count, float *copy, int64_t *index) {
    int64_t candidates = likely_candidates(score, blocks, count, copy);
    if (candidates == 0) {
        memcpy(copy, score, sizeof(float) * (size_t)blocks);
        candidates = blocks;
    }
    if (candidates > count) select_largest(copy, candidates, count);
    float threshold = copy[0];
    for (int64_t j = 1; j < count; j++) threshold = copy[j] < threshold ? copy[j] : threshold;
    int64_t above = 0;
    for (int64_t b = 0; b < blocks; b++) above += score[b] > threshold;
    int64_t ties = count - above, taken = 0;
    for (int64_t b = 0; b < blocks && taken < count; b++) {
        if (score[b] > threshold || (score[b] == threshold && ties-- > 0)) index[taken++] = b;
    }
}

/* Mean-key block scores (sums of each block's keys; see decode_kernels.block_means) of blocks [b_begin, b_end):
 * score of block b = max over the group's query heads of q . sum_b. tile: G * TOKEN_TILE floats. */
static void score_by_mean(const float *q, const float *sums, int64_t groups, int64_t dim, int64_t b_begin,
                          int64_t b_end, float *tile, float *score) {
    for (int64_t b0 = b_begin; b0 < b_end; b0 += TOKEN_TILE) {
        int64_t len = b_end - b0 < TOKEN_TILE ? b_end - b0 : TOKEN_TILE, segment = 0;
        const float *first = sums + b0 * dim;
#ifdef VECTOR_KERNELS
        if (dim % 8 == 0) { /* eight sequential streams, one per eighth of the tile: see score_ways */
            segment = len / WAYS;
            const float *rows[WAYS];
            for (int w = 0; w < WAYS; w++) rows[w] = first + w * segment * dim;
            if (segment > 0) score_ways(q, rows, segment, groups, dim, 1.0f, TOKEN_TILE, tile);
            for (int64_t j = 0; j < segment; j++)
                for (int w = 0; w < WAYS; w++) {
                    float best = tile[j * WAYS + w];
                    for (int64_t g = 1; g < groups; g++) {
                        float other = tile[g * TOKEN_TILE + j * WAYS + w];
                        best = other > best ? other : best;
                    }
                    score[b0 + w * segment + j] = best;
                }
        }
#endif
        int64_t done = segment * WAYS;
        score_rows(q, first + done * dim, len - done, groups, dim, 1.0f, TOKEN_TILE, tile);
        for (int64_t i = 0; i < len - done; i++) {
            float best = tile[i];
            for (int64_t g = 1; g < groups; g++) best = tile[g * TOKEN_TILE + i] > best ? tile[g * TOKEN_TILE + i] : best;
            score[b0 + done + i] = best;
        }
    }
}

#define CHANNEL_MAX 256

/* The `r` channels where the group's queries are largest in absolute value (summed over the G heads), ascending
 * index order does not matter; ties: lower channel first (as torch.topk on distinct values). */
static int64_t top_channels(const float *q, int64_t groups, int64_t dim, int64_t r, int64_t *channels) {
    float weight[CHANNEL_MAX];
    int taken[CHANNEL_MAX] = {0};
    if (dim > CHANNEL_MAX) return -1;
    if (r > dim) r = dim;
    for (int64_t d = 0; d < dim; d++) {
        float w = 0.0f;
        for (int64_t g = 0; g < groups; g++) w += fabsf(q[g * dim + d]);
        weight[d] = w;
    }
    for (int64_t i = 0; i < r; i++) {
        int64_t best = -1;
        for (int64_t d = 0; d < dim; d++)
            if (!taken[d] && (best < 0 || weight[d] > weight[best])) best = d;
        taken[best] = 1;
        channels[i] = best;
    }
    return r;
}

/* IEEE half (bits) to float, portable: normal, subnormal, zero, inf and NaN. */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    if (exponent == 0x1fu) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else { /* subnormal: value = mantissa * 2^-24 */
        float value = (float)mantissa * 5.9604644775390625e-8f;
        memcpy(&bits, &value, sizeof bits);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* Row segment of float16 (bits) to float32: hardware conversion 8 at a time where the CPU has F16C. */
static void widen(const uint16_t *restrict src, int64_t len, float *restrict dst) {
    int64_t t = 0;
#if defined(__F16C__) || defined(__AVX2__)
    for (; t + 8 <= len; t += 8) _mm256_storeu_ps(dst + t, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + t))));
#endif
    for (; t < len; t++) dst[t] = half_to_float(src[t]);
}

/* The portable conversion alone, exported so tests can check it on every half bit pattern. */
void half_to_float_portable(const uint16_t *src, int64_t len, float *dst) {
    for (int64_t t = 0; t < len; t++) dst[t] = half_to_float(src[t]);
}

/* acc[t] += w * row[t] */
static void axpy(float w, const float *restrict row, int64_t len, float *restrict acc) {
#pragma omp simd
    for (int64_t t = 0; t < len; t++) acc[t] += w * row[t];
}

/* Channel-subset block scores (decode_kernels.block_channel_scores) of the blocks holding tokens
 * [t_begin, t_end) (t_begin a multiple of block): every key is scored on the r channels where the group's
 * queries are largest, reading those rows of the channel-major float16 key copy `sketch` (dim, sketch_cap);
 * block score = max over its tokens and the G query heads. tile: (G + 1) * (TOKEN_TILE + block) floats. */
static void score_by_channels(const float *q, const uint16_t *sketch, int64_t groups, int64_t dim,
                              int64_t sketch_cap, int64_t t_begin, int64_t t_end, int64_t block, int64_t r,
                              float *tile, float *score) {
    int64_t channels[CHANNEL_MAX];
    r = top_channels(q, groups, dim, r, channels);
    int64_t tile_tokens = TOKEN_TILE - TOKEN_TILE % block;
    if (tile_tokens < block) tile_tokens = block;
    float *row = tile + groups * tile_tokens;
    for (int64_t t0 = t_begin; t0 < t_end; t0 += tile_tokens) {
        int64_t len = t_end - t0 < tile_tokens ? t_end - t0 : tile_tokens;
        memset(tile, 0, sizeof(float) * (size_t)(groups * tile_tokens));
        int64_t i = 0;
#if defined(__F16C__) && defined(__FMA__)
        for (; i + 4 <= r && groups <= 8; i += 4) { /* four rows streamed together, converted in registers */
            const uint16_t *r0 = sketch + channels[i] * sketch_cap + t0, *r1 = sketch + channels[i + 1] * sketch_cap + t0;
            const uint16_t *r2 = sketch + channels[i + 2] * sketch_cap + t0, *r3 = sketch + channels[i + 3] * sketch_cap + t0;
            __m256 w[8][4];
            for (int64_t g = 0; g < groups; g++)
                for (int k = 0; k < 4; k++) w[g][k] = _mm256_set1_ps(q[g * dim + channels[i + k]]);
            int64_t t = 0;
            for (; t + 8 <= len; t += 8) {
                __m256 x0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r0 + t)));
                __m256 x1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r1 + t)));
                __m256 x2 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r2 + t)));
                __m256 x3 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r3 + t)));
                for (int64_t g = 0; g < groups; g++) {
                    float *a = tile + g * tile_tokens + t;
                    __m256 acc = _mm256_loadu_ps(a);
                    acc = _mm256_fmadd_ps(w[g][0], x0, acc);
                    acc = _mm256_fmadd_ps(w[g][1], x1, acc);
                    acc = _mm256_fmadd_ps(w[g][2], x2, acc);
                    acc = _mm256_fmadd_ps(w[g][3], x3, acc);
                    _mm256_storeu_ps(a, acc);
                }
            }
            for (; t < len; t++) {
                float x0 = half_to_float(r0[t]), x1 = half_to_float(r1[t]), x2 = half_to_float(r2[t]);
                float x3 = half_to_float(r3[t]);
                for (int64_t g = 0; g < groups; g++) {
                    const float *qg = q + g * dim;
                    tile[g * tile_tokens + t] += qg[channels[i]] * x0 + qg[channels[i + 1]] * x1 +
                                                 qg[channels[i + 2]] * x2 + qg[channels[i + 3]] * x3;
                }
            }
        }
#endif
        for (; i < r; i++) {
            widen(sketch + channels[i] * sketch_cap + t0, len, row);
            for (int64_t g = 0; g < groups; g++) axpy(q[g * dim + channels[i]], row, len, tile + g * tile_tokens);
        }
        for (int64_t g = 1; g < groups; g++) { /* max over the group's heads into the first row */
            const float *other = tile + g * tile_tokens;
#pragma omp simd
            for (int64_t t = 0; t < len; t++) tile[t] = other[t] > tile[t] ? other[t] : tile[t];
        }
        for (int64_t b0 = 0; b0 < len; b0 += block) { /* t0 and tile_tokens are multiples of block */
            int64_t stop = b0 + block < len ? b0 + block : len;
            float best = -INFINITY;
#pragma omp simd reduction(max : best)
            for (int64_t t = b0; t < stop; t++) best = tile[t] > best ? tile[t] : best;
            score[(t0 + b0) / block] = best;
        }
    }
}

/* Block top-k decode in one call: selection (by mean key or by channel subset, above) then attention over the
 * selected blocks, on `threads` threads when the step reads enough to pay for them (each head's selected blocks
 * are split into one part per thread and the partial softmaxes merged, as in flash-decoding). */
typedef struct {
    const float *q, *keys, *values;
    const void *summary; /* float key sums (blocks, D) per head, or float16 channel-major keys (D, sketch_cap) */
    int64_t heads, groups, dim, cap, sum_cap, block, count, sink, recent, n, blocks, parts;
    int64_t channels; /* 0: score by mean key; r > 0: score by the r largest query channels */
    float scaling;
    float *scores; /* heads x blocks block scores, written in phase 0 */
    int64_t *index;
    float *m, *l, *acc; /* (heads * parts) x G, same, x D */
    int threads, phase, failed;
} DecodeJob;

/* Scratch of at least `floats` floats owned by the calling thread, kept between calls: a fresh malloc of this
 * size per layer would be an mmap and its page faults every step. NULL when it cannot grow. */
static float *thread_scratch(size_t floats) {
    static __thread float *buffer;
    static __thread size_t capacity;
    if (floats > capacity) {
        float *grown = realloc(buffer, sizeof(float) * floats);
        if (!grown) return NULL;
        buffer = grown;
        capacity = floats;
    }
    return buffer;
}

/* Items of a phase: 0, block scores of one of `parts` block ranges of a head; 1, one head's pick; 2, attention
 * over one of `parts` ranges of a head's selected blocks. */
static int64_t phase_items(const DecodeJob *j) {
    return j->phase == 1 ? j->heads : j->heads * j->parts;
}

static void run_item(DecodeJob *j, int64_t i) {
    int64_t longest = (j->count + j->parts - 1) / j->parts;
    size_t need = j->phase == 0 ? (size_t)((j->groups + 1) * (TOKEN_TILE + j->block))
                : j->phase == 1 ? (size_t)j->blocks : (size_t)(j->groups * longest * j->block);
    float *scratch = j->failed ? NULL : thread_scratch(need + 1);
    if (!scratch) { j->failed = 1; return; } /* and every later item: picks or indices may be missing */
    int64_t h = j->phase == 1 ? i : i / j->parts, s = i % j->parts;
    const float *q = j->q + h * j->groups * j->dim;
    if (j->phase == 0) {
        int64_t b0 = s * j->blocks / j->parts, b1 = (s + 1) * j->blocks / j->parts;
        float *score = j->scores + h * j->blocks;
        if (b0 >= b1) return;
        if (j->channels > 0) {
            const uint16_t *sketch = (const uint16_t *)j->summary + h * j->dim * j->sum_cap;
            int64_t t1 = b1 * j->block < j->n ? b1 * j->block : j->n;
            score_by_channels(q, sketch, j->groups, j->dim, j->sum_cap, b0 * j->block, t1, j->block, j->channels,
                              scratch, score);
        } else {
            score_by_mean(q, (const float *)j->summary + h * j->sum_cap * j->dim, j->groups, j->dim, b0, b1, scratch,
                          score);
        }
    } else if (j->phase == 1) {
        float *score = j->scores + h * j->blocks;
        for (int64_t b = 0; b < j->blocks; b++)
            if (b < j->sink || b >= j->blocks - j->recent) score[b] = INFINITY;
        pick_blocks(score, j->blocks, j->count, scratch, j->index + h * j->count);
    } else {
        int64_t c0 = s * j->count / j->parts, c1 = (s + 1) * j->count / j->parts;
        attend_part(q, j->keys + h * j->cap * j->dim, j->values + h * j->cap * j->dim, j->index + h * j->count,
                    j->groups, j->dim, j->block, c0, c1, j->n, j->scaling, scratch, j->m + i * j->groups,
                    j->l + i * j->groups, j->acc + i * j->groups * j->dim);
    }
}

/* Every item of each phase, one OpenMP region per call. Built with -fopenmp the kernel resolves libgomp.so.1 to
 * the copy torch has already loaded, so these are torch's own intra-op threads: no second pool competing for the
 * cores (a private pthread pool ran up to 3x slower right after torch work on a 2-core machine). Items are handed
 * out dynamically, so a thread the OS deschedules delays only the items it holds. */
static void run_phases(DecodeJob *job, int first_phase) {
    int threads = job->threads;
#pragma omp parallel num_threads(threads) if (threads > 1)
    for (int phase = first_phase; phase <= 2; phase++) {
#pragma omp single
        job->phase = phase;
        int64_t total = phase_items(job);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < total; i++) run_item(job, i);
    }
    (void)threads;
}

static int block_decode(const float *q, const float *keys, const float *values, const void *summary,
                        int64_t heads, int64_t groups, int64_t dim, int64_t cap, int64_t sum_cap, int64_t block,
                        int64_t count, int64_t sink, int64_t recent, int64_t n, int64_t channels, float scaling,
                        int64_t threads, float *out) {
    int64_t blocks = (n + block - 1) / block;
    if (count > blocks) count = blocks;
    if (channels > 0 && dim > CHANNEL_MAX) return -2;
    /* work in tokens of keys and values: the selected ones, plus the float16 channel rows or the key sums scored */
    int64_t work = heads * count * block + (channels > 0 ? heads * n * channels / (4 * dim) : heads * blocks / 2);
    if (threads < 1 || work < THREADED_MIN_TOKENS) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    DecodeJob job = {q, keys, values, summary, heads, groups, dim, cap, sum_cap, block, count, sink, recent, n,
                     blocks, threads, channels, scaling, NULL, NULL, NULL, NULL, NULL, (int)threads, 0, 0};
    if (count < job.parts) job.parts = count > 0 ? count : 1;
    size_t partials = (size_t)(heads * job.parts * groups);
    /* one buffer: block scores, picks, then the partial results of every part */
    job.index = malloc(sizeof(int64_t) * (size_t)(heads * count) + sizeof(float) * ((size_t)(heads * blocks) +
                       partials * (2 + (size_t)dim)));
    if (job.index) {
        job.scores = (float *)(job.index + heads * count);
        job.m = job.scores + heads * blocks;
        job.l = job.m + partials;
        job.acc = job.l + partials;
        if (count >= blocks) { /* every block: no scores, no picks */
            for (int64_t h = 0; h < heads; h++)
                for (int64_t b = 0; b < blocks; b++) job.index[h * count + b] = b;
        }
        run_phases(&job, count < blocks ? 0 : 2);
        for (int64_t h = 0; !job.failed && h < heads; h++) {
            merge_parts(job.parts, groups, dim, job.m + h * job.parts * groups, job.l + h * job.parts * groups,
                        job.acc + h * job.parts * groups * dim, out + h * groups * dim);
        }
    } else {
        job.failed = 1;
    }
    free(job.index);
    return job.failed ? -1 : 0;
}

/* Every key: the tokens [0, n) of each head (keys/values (heads, cap, D)), walked like selected blocks of 16
 * tokens (all of them, in order; the last may be partial). Dense and streaming heads use it. */
int dense_decode(const float *q, const float *keys, const float *values, int64_t heads, int64_t groups, int64_t dim,
                 int64_t cap, int64_t n, float scaling, int64_t threads, float *out) {
    return block_decode(q, keys, values, NULL, heads, groups, dim, cap, 0, 16, (n + 15) / 16, 0, 0, n, 0, scaling, threads, out);
}

/* Mean-key selection: sums (heads, sum_cap, D) float32. */
int block_decode_mean(const float *q, const float *keys, const float *values, const float *sums, int64_t heads,
                      int64_t groups, int64_t dim, int64_t cap, int64_t sum_cap, int64_t block, int64_t count,
                      int64_t sink, int64_t recent, int64_t n, float scaling, int64_t threads, float *out) {
    return block_decode(q, keys, values, sums, heads, groups, dim, cap, sum_cap, block, count, sink, recent, n, 0,
                        scaling, threads, out);
}

/* Channel-subset selection: sketch (heads, D, sketch_cap) float16, r channels per step (1 <= r). */
int block_decode_channels(const float *q, const float *keys, const float *values, const uint16_t *sketch,
                          int64_t heads, int64_t groups, int64_t dim, int64_t cap, int64_t sketch_cap, int64_t block,
                          int64_t count, int64_t sink, int64_t recent, int64_t n, int64_t channels, float scaling,
                          int64_t threads, float *out) {
    if (channels < 1) return -2;
    return block_decode(q, keys, values, sketch, heads, groups, dim, cap, sketch_cap, block, count, sink, recent, n,
                        channels, scaling, threads, out);
}

/* The explicit vector paths this build compiled, as bits: 1 AVX2+FMA kernels, 2 F16C conversion, 4 F16C+FMA
 * channel scoring (0 for a portable build; tests check that both builds were exercised). */
int vector_paths(void) {
    int paths = 0;
#ifdef VECTOR_KERNELS
    paths |= 1;
#endif
#if defined(__F16C__) || defined(__AVX2__)
    paths |= 2;
#endif
#if defined(__F16C__) && defined(__FMA__)
    paths |= 4;
#endif
    return paths;
}
