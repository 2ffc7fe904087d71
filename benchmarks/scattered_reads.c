/* Read bandwidth of one thread over randomly placed chunks of a large buffer: chunks of 4 KB to 1 MB read one
 * after another, and 4 KB chunks read `ways` at a time side by side (the access pattern of block top-k decoding).
 * Prints one line per case: "sequential CHUNK GBPS" or "interleaved WAYS GBPS". Driven by scattered_reads.py. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static uint64_t state = 88172645463325252ull;
static uint64_t next_random(void) { /* xorshift64 */
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

/* Sum `take` chunks of `chunk` bytes at random chunk-aligned offsets, `ways` chunks walked together; best of 5. */
static double gb_per_s(const float *buffer, size_t total, size_t chunk, size_t take, int ways, size_t *starts) {
    double best = 1e30;
    for (int repeat = 0; repeat < 5; repeat++) {
        for (size_t i = 0; i < take; i++) starts[i] = (next_random() % (total / chunk)) * (chunk / sizeof(float));
        __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
        double started = seconds();
        for (size_t i = 0; i + (size_t)ways <= take; i += (size_t)ways)
            for (size_t j = 0; j < chunk / sizeof(float); j += 16)
                for (int w = 0; w < ways; w++) {
                    const float *p = buffer + starts[i + (size_t)w] + j;
                    a = _mm256_add_ps(a, _mm256_load_ps(p));
                    b = _mm256_add_ps(b, _mm256_load_ps(p + 8));
                }
        double elapsed = seconds() - started;
        volatile float sink = _mm256_cvtss_f32(_mm256_add_ps(a, b));
        (void)sink;
        if (elapsed < best) best = elapsed;
    }
    return (double)(take / (size_t)ways * (size_t)ways * chunk) / best / 1e9;
}

int main(int argc, char **argv) {
    size_t total = (argc > 1 ? (size_t)atol(argv[1]) : 1536) << 20, read = (size_t)96 << 20;
    float *buffer = aligned_alloc(64, total);
    size_t *starts = malloc(sizeof(size_t) * (read / 4096));
    if (!buffer || !starts) return 1;
    for (size_t i = 0; i < total / sizeof(float); i++) buffer[i] = 1.0f;
    for (size_t chunk = 4096; chunk <= ((size_t)1 << 20); chunk *= 2)
        printf("sequential %zu %.2f\n", chunk, gb_per_s(buffer, total, chunk, read / chunk, 1, starts));
    for (int ways = 1; ways <= 16; ways *= 2)
        printf("interleaved %d %.2f\n", ways, gb_per_s(buffer, total, 4096, read / 4096, ways, starts));
    return 0;
}
