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

/* q (heads, G, D); keys/values (heads, cap, D) with blocks of `block` tokens; index (heads, count) selected
 * blocks; tokens at positions >= n are not attended. scores: scratch of G * count * block floats.
 * out (heads, G, D). */
static void attend_head(const float *q, const float *keys, const float *values, const int64_t *index,
                        int64_t groups, int64_t dim, int64_t block, int64_t count, int64_t n, float scaling,
                        float *scores, float *out) {
    int64_t used = 0; /* attended tokens, in selection order */
    for (int64_t c = 0; c < count; c++) {
        int64_t first = index[c] * block;
        int64_t stop = first + block < n ? first + block : n;
        for (int64_t t = first; t < stop; t++, used++) {
            const float *k = keys + t * dim;
            for (int64_t g = 0; g < groups; g++) {
                const float *qg = q + g * dim;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t d = 0; d < dim; d++) s += qg[d] * k[d];
                scores[g * count * block + used] = s * scaling;
            }
        }
    }
    for (int64_t g = 0; g < groups; g++) {
        float *row = scores + g * count * block;
        float top = -INFINITY;
        for (int64_t j = 0; j < used; j++) top = row[j] > top ? row[j] : top;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < used; j++) {
            row[j] = exp_nonpositive(row[j] - top);
            total += row[j];
        }
        float inv = total > 0.0f ? 1.0f / total : 0.0f;
#pragma omp simd
        for (int64_t j = 0; j < used; j++) row[j] *= inv;
        memset(out + g * dim, 0, sizeof(float) * (size_t)dim);
    }
    used = 0;
    for (int64_t c = 0; c < count; c++) {
        int64_t first = index[c] * block;
        int64_t stop = first + block < n ? first + block : n;
        for (int64_t t = first; t < stop; t++, used++) {
            const float *v = values + t * dim;
            for (int64_t g = 0; g < groups; g++) {
                float p = scores[g * count * block + used];
                float *o = out + g * dim;
#pragma omp simd
                for (int64_t d = 0; d < dim; d++) o[d] += p * v[d];
            }
        }
    }
}

int block_attend(const float *q, const float *keys, const float *values, const int64_t *index, int64_t heads,
                 int64_t groups, int64_t dim, int64_t cap, int64_t block, int64_t count, int64_t n, float scaling,
                 float *out) {
    float *scores = malloc(sizeof(float) * (size_t)(groups * count * block > 0 ? groups * count * block : 1));
    if (!scores) return -1;
    for (int64_t h = 0; h < heads; h++) {
        attend_head(q + h * groups * dim, keys + h * cap * dim, values + h * cap * dim, index + h * count, groups,
                    dim, block, count, n, scaling, scores, out + h * groups * dim);
    }
    free(scores);
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

/* Block selection by mean key (sums of each block's keys; see decode_kernels.block_means) for every head:
 * score of block b = max over the group's query heads of q . sum_b; sink and recent blocks always; then the
 * highest scores, `count` blocks in all (ties at the threshold: lower block index first). index (heads, count),
 * ascending. scratch: 2 * blocks floats. */
static void select_by_mean(const float *q, const float *sums, int64_t groups, int64_t dim, int64_t blocks,
                           int64_t count, int64_t sink, int64_t recent, float *scratch, int64_t *index) {
    float *score = scratch, *copy = scratch + blocks;
    for (int64_t b = 0; b < blocks; b++) {
        const float *s = sums + b * dim;
        float best = -INFINITY;
        for (int64_t g = 0; g < groups; g++) {
            const float *qg = q + g * dim;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < dim; d++) dot += qg[d] * s[d];
            best = dot > best ? dot : best;
        }
        score[b] = (b < sink || b >= blocks - recent) ? INFINITY : best;
    }
    memcpy(copy, score, sizeof(float) * (size_t)blocks);
    select_largest(copy, blocks, count);
    float threshold = copy[0];
    for (int64_t j = 1; j < count; j++) threshold = copy[j] < threshold ? copy[j] : threshold;
    int64_t above = 0;
    for (int64_t b = 0; b < blocks; b++) above += score[b] > threshold;
    int64_t ties = count - above, taken = 0;
    for (int64_t b = 0; b < blocks && taken < count; b++) {
        if (score[b] > threshold || (score[b] == threshold && ties-- > 0)) index[taken++] = b;
    }
}

/* Mean-key block top-k decode in one call: selection (above) then attention over the selected blocks.
 * sums (heads, sum_cap, D); index_out (heads, count) receives the selection. */
int block_decode_mean(const float *q, const float *keys, const float *values, const float *sums, int64_t heads,
                      int64_t groups, int64_t dim, int64_t cap, int64_t sum_cap, int64_t block, int64_t count,
                      int64_t sink, int64_t recent, int64_t n, float scaling, int64_t *index_out, float *out) {
    int64_t blocks = (n + block - 1) / block;
    if (count > blocks) count = blocks;
    float *scratch = malloc(sizeof(float) * (size_t)(2 * blocks + groups * count * block + 1));
    if (!scratch) return -1;
    for (int64_t h = 0; h < heads; h++) {
        int64_t *index = index_out + h * count;
        if (count == blocks) {
            for (int64_t b = 0; b < blocks; b++) index[b] = b;
        } else {
            select_by_mean(q + h * groups * dim, sums + h * sum_cap * dim, groups, dim, blocks, count, sink,
                           recent, scratch, index);
        }
        attend_head(q + h * groups * dim, keys + h * cap * dim, values + h * cap * dim, index, groups, dim, block,
                    count, n, scaling, scratch + 2 * blocks, out + h * groups * dim);
    }
    free(scratch);
    return 0;
}
