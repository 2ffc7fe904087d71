/* Exact top-k masses and k at coverage of attention rows without sorting them (attnsparse.metrics).
 *
 * Each row is bucketed by the top bits of its float32 pattern (values in [0, 2) order like their bits): one pass
 * gives per-bucket counts and float64 masses, so the bucket holding the k-th largest value, or the coverage
 * crossing, is known; only that bucket's few values are then sorted. Rows with a value outside [0, 2) or NaN are
 * flagged (2) for the caller's sort path; coverage crossings within rounding of the target are flagged (1) for
 * the caller's exact reference, which sums in the reference order. Entropy and ε counts ride on the same rows.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef SHIFT
#define SHIFT 18
#endif
#define BUCKETS (1 << (30 - SHIFT)) /* values < 2.0 have bit patterns < 2^30 */

static inline uint32_t bits_of(float v) {
    uint32_t b;
    memcpy(&b, &v, sizeof b);
    return b;
}

static inline void swap(float *a, float *b) { float t = *a; *a = *b; *b = t; }

static void insertion_descending(float *v, int64_t n) {
    for (int64_t i = 1; i < n; i++) {
        float x = v[i];
        int64_t j = i - 1;
        for (; j >= 0 && v[j] < x; j--) v[j + 1] = v[j];
        v[j + 1] = x;
    }
}

/* Three-way partition of v[0, n) around `pivot`: [> pivot | == pivot | < pivot]; returns the two bounds. */
static void partition3(float *v, int64_t n, float pivot, int64_t *gt_end, int64_t *eq_end) {
    int64_t lt = 0, i = 0, gt = n;
    while (i < gt) {
        if (v[i] > pivot) swap(&v[lt++], &v[i++]);
        else if (v[i] < pivot) swap(&v[i], &v[--gt]);
        else i++;
    }
    *gt_end = lt;
    *eq_end = gt;
}

static float median3(const float *v, int64_t n) {
    float a = v[0], b = v[n / 2], c = v[n - 1];
    if (a < b) { float t = a; a = b; b = t; }
    if (b < c) { float t = b; b = c; c = t; }
    if (a < b) { float t = a; a = b; b = t; }
    return b;
}

/* Sum of the `need` largest of v[0, n) (0 < need < n), in linear expected time (reorders v). */
static double top_sum(float *v, int64_t n, int64_t need) {
    double acc = 0.0;
    while (n > 16) {
        int64_t g, e;
        partition3(v, n, median3(v, n), &g, &e);
        if (need <= g) { n = g; continue; }
        for (int64_t j = 0; j < g; j++) acc += (double)v[j];
        need -= g;
        if (need <= e - g) return acc + (double)need * (double)v[g];
        acc += (double)(e - g) * (double)v[g];
        need -= e - g;
        v += e; n -= e;
    }
    insertion_descending(v, n);
    for (int64_t j = 0; j < need; j++) acc += (double)v[j];
    return acc;
}

/* Walk v[0, n) in descending order from cumulative mass `base` until it reaches `target`, without sorting all
 * of v: returns how many values were taken (n + 1 if never reached) and the cumulative mass before and after
 * the last one. Reorders v. */
static int64_t coverage_walk(float *v, int64_t n, double base, double target, double *lo, double *hi) {
    int64_t taken = 0;
    double acc = base;
    while (n > 16) {
        int64_t g, e;
        partition3(v, n, median3(v, n), &g, &e);
        double upper = 0.0;
        for (int64_t j = 0; j < g; j++) upper += (double)v[j];
        if (g > 0 && acc + upper >= target) { n = g; continue; }
        acc += upper; taken += g;
        for (int64_t j = g; j < e; j++) { /* equal values, one at a time like the reference cumsum */
            double next = acc + (double)v[j];
            taken++;
            if (next >= target) { *lo = acc; *hi = next; return taken; }
            acc = next;
        }
        v += e; n -= e;
    }
    insertion_descending(v, n);
    for (int64_t j = 0; j < n; j++) {
        double next = acc + (double)v[j];
        taken++;
        if (next >= target) { *lo = acc; *hi = next; return taken; }
        acc = next;
    }
    *lo = *hi = acc;
    return -1;
}

/* -x log x of a float32 value in float64 (0 for zeros and subnormals, whose terms are below 1e-36): log of the
 * mantissa scaled into [sqrt(1/2), sqrt(2)) from the atanh series to z^11 (error below 3e-11). Branch-free, so
 * the row loop vectorizes (with -fno-trapping-math). */
static inline double entropy_term(float v) {
    uint32_t bits = bits_of(v);
    uint32_t mbits = (bits & 0x007FFFFFu) | 0x3F800000u; /* mantissa as a float in [1, 2) */
    float mf;
    memcpy(&mf, &mbits, sizeof mf);
    double m = (double)mf;
    int big = m > 1.4142135623730951;
    double exponent = (double)((int32_t)(bits >> 23) - 127 + big);
    m = big ? 0.5 * m : m;
    double z = (m - 1.0) / (m + 1.0), z2 = z * z;
    double poly = 1.0 + z2 * (1.0 / 3 + z2 * (1.0 / 5 + z2 * (1.0 / 7 + z2 * (1.0 / 9 + z2 * (1.0 / 11)))));
    double lg = exponent * 0.6931471805599453 + 2.0 * z * poly;
    return (bits >> 23) == 0 ? 0.0 : -(double)v * lg;
}

/* Entropy (nats) and counts above each ε of one row; ε compares are float32 (`inclusive`: >=, else >). */
static void row_entropy_counts(const float *row, int64_t width, const float *eps, const uint8_t *inclusive,
                               int64_t ne, double *ent, int64_t *counts) {
    double h = 0.0;
#pragma omp simd reduction(+ : h)
    for (int64_t j = 0; j < width; j++) h += entropy_term(row[j]);
    *ent = h;
    for (int64_t i = 0; i < ne; i++) {
        int64_t c = 0;
        float e = eps[i];
        if (inclusive[i]) {
#pragma omp simd reduction(+ : c)
            for (int64_t j = 0; j < width; j++) c += row[j] >= e;
        } else {
#pragma omp simd reduction(+ : c)
            for (int64_t j = 0; j < width; j++) c += row[j] > e;
        }
        counts[i] = c;
    }
}

int rowstats(const float *x, int64_t rows, int64_t width, const int64_t *ks, int64_t nk, const double *targets,
             int64_t nt, const float *eps, const uint8_t *inclusive, int64_t ne, double *top, int64_t *kcov,
             int64_t *counts, double *ent, uint8_t *flag) {
    uint32_t *count = calloc(BUCKETS, sizeof(uint32_t));
    double *mass = calloc(BUCKETS, sizeof(double));
    int64_t *acount = malloc(sizeof(int64_t) * BUCKETS);
    double *amass = malloc(sizeof(double) * BUCKETS);
    int32_t *slot = malloc(sizeof(int32_t) * BUCKETS);
    int64_t nslots_max = nk + nt;
    int *wanted = malloc(sizeof(int) * (size_t)(nslots_max + 1));   /* bucket of each slot */
    int64_t *start = malloc(sizeof(int64_t) * (size_t)(nslots_max + 1));
    int64_t *fill = malloc(sizeof(int64_t) * (size_t)(nslots_max + 1));
    int *k_bucket = malloc(sizeof(int) * (size_t)(nk + 1));
    int *t_bucket = malloc(sizeof(int) * (size_t)(nt + 1));
    float *buf = malloc(sizeof(float) * (size_t)(width > 0 ? width : 1));
    float *scratch = malloc(sizeof(float) * (size_t)(width > 0 ? width : 1));
    int ok = count && mass && acount && amass && slot && wanted && start && fill && k_bucket && t_bucket && buf
             && scratch;
    if (ok) {
        for (int b = 0; b < BUCKETS; b++) slot[b] = -1;
    }
    const double tol_unit = 4.0 * (double)width * ldexp(1.0, -53);
    for (int64_t r = 0; ok && r < rows; r++) {
        const float *row = x + r * width;
        flag[r] = 0;
        int high = 0, low = BUCKETS; /* used buckets: [low, high], plus bucket 0 (zeros and subnormals) */
        uint32_t any_high = 0;
        for (int64_t j = 0; j < width; j++) {
            uint32_t bits = bits_of(row[j]);
            any_high |= bits;
            int key = (int)((bits >> SHIFT) & (BUCKETS - 1));
            count[key]++;
            mass[key] += (double)row[j];
            high = key > high ? key : high;
            low = (key > 0 && key < low) ? key : low;
        }
        if (low > high) low = high;
        int bad = any_high >= (1u << 30); /* a value outside [0, 2) or NaN */
        if (!bad) row_entropy_counts(row, width, eps, inclusive, ne, &ent[r], &counts[r * ne]);
        if (bad) {
            flag[r] = 2;
            memset(count, 0, sizeof(uint32_t) * BUCKETS);
            memset(mass, 0, sizeof(double) * BUCKETS);
            continue;
        }
        int64_t c = 0;
        double m = 0.0;
        for (int b = high; b >= low; b--) {
            acount[b] = c; amass[b] = m;
            c += count[b]; m += mass[b];
        }
        if (low > 0) { /* buckets 1 .. low-1 are empty */
            acount[0] = c; amass[0] = m;
            c += count[0]; m += mass[0];
        }
        const double total = m;
        const double tol = tol_unit * (total > 1.0 ? total : 1.0);

        /* which buckets hold a boundary: those values are gathered (one pass) and selected */
        int64_t nslots = 0;
        for (int64_t i = 0; i < nk; i++) {
            int64_t k = ks[i];
            k_bucket[i] = -1;
            if (k >= width) { top[r * nk + i] = total; continue; }
            int b = 0; /* the highest used bucket whose cumulative count reaches k */
            if (acount[low] + (int64_t)count[low] >= k) {
                int lo = low, hi = high;
                while (lo < hi) {
                    int mid = (lo + hi + 1) / 2;
                    if (acount[mid] + (int64_t)count[mid] >= k) lo = mid; else hi = mid - 1;
                }
                b = lo;
            }
            int64_t need = k - acount[b];
            if (need >= (int64_t)count[b] || mass[b] == 0.0) {
                top[r * nk + i] = amass[b] + (need >= (int64_t)count[b] ? mass[b] : 0.0);
                continue;
            }
            k_bucket[i] = b;
            if (slot[b] < 0) { slot[b] = (int32_t)nslots; wanted[nslots++] = b; }
        }
        for (int64_t i = 0; i < nt; i++) {
            int b = -1; /* the highest used bucket whose cumulative mass reaches the target, or -1 */
            if (amass[low] + mass[low] >= targets[i]) {
                int lo = low, hi = high;
                while (lo < hi) {
                    int mid = (lo + hi + 1) / 2;
                    if (amass[mid] + mass[mid] >= targets[i]) lo = mid; else hi = mid - 1;
                }
                b = lo;
            } else if (amass[0] + mass[0] >= targets[i]) {
                b = 0;
            }
            t_bucket[i] = b;
            if (b >= 0 && slot[b] < 0) { slot[b] = (int32_t)nslots; wanted[nslots++] = b; }
        }
        int64_t offset = 0;
        for (int64_t s = 0; s < nslots; s++) { start[s] = offset; fill[s] = 0; offset += count[wanted[s]]; }
        if (nslots) {
            for (int64_t j = 0; j < width; j++) {
                int32_t s = slot[bits_of(row[j]) >> SHIFT];
                if (s >= 0) buf[start[s] + fill[s]++] = row[j];
            }
        }
        for (int64_t i = 0; i < nk; i++) {
            int b = k_bucket[i];
            if (b < 0) continue;
            int64_t s = slot[b], n = (int64_t)count[b];
            memcpy(scratch, buf + start[s], sizeof(float) * (size_t)n);
            top[r * nk + i] = amass[b] + top_sum(scratch, n, ks[i] - acount[b]);
        }
        for (int64_t i = 0; i < nt; i++) {
            int64_t *out = &kcov[r * nt + i];
            int b = t_bucket[i];
            if (b < 0) { /* not reached: the caller clamps to the row length; near misses are checked exactly */
                *out = width + 1;
                if (targets[i] - total <= tol) flag[r] = 1;
                continue;
            }
            int64_t s = slot[b], n = (int64_t)count[b];
            memcpy(scratch, buf + start[s], sizeof(float) * (size_t)n);
            double lo, hi;
            int64_t taken = coverage_walk(scratch, n, amass[b], targets[i], &lo, &hi);
            if (taken < 0) { *out = width + 1; flag[r] = 1; continue; } /* bucket sums disagree by rounding */
            *out = acount[b] + taken;
            if (hi - targets[i] < tol || targets[i] - lo <= tol) flag[r] = 1;
        }
        for (int64_t s = 0; s < nslots; s++) slot[wanted[s]] = -1;
        memset(count + low, 0, sizeof(uint32_t) * (size_t)(high - low + 1));
        memset(mass + low, 0, sizeof(double) * (size_t)(high - low + 1));
        count[0] = 0;
        mass[0] = 0.0;
    }
    free(count); free(mass); free(acount); free(amass); free(slot); free(wanted); free(start); free(fill);
    free(k_bucket); free(t_bucket); free(buf); free(scratch);
    return ok ? 0 : -1;
}
