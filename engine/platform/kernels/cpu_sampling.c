/* Whole-vocabulary passes of the sampler on the CPU, one row per thread.
 *
 * top_k_ids: MLX's CPU argpartition took ~32 ms over [64, 49152] logits (a
 * third of a sampled decode step). Each row finds a threshold with counting
 * passes (a bisection on the value, stopped once between k and 2k entries pass
 * it), then sorts only the entries above it.
 *
 * softmax_rows: each row's logsumexp of logits * inv_temp and, given a uniform
 * u, the inverse-CDF draw: the first token whose running sum of weights
 * passes u * total (the sampler's MLX path does the same in ~18 ms).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct { float value; int32_t id; } Entry;

static int by_value_desc(const void *a, const void *b) {
    const Entry *x = a, *y = b;
    if (x->value != y->value) return x->value > y->value ? -1 : 1;
    return x->id - y->id;  /* ties: lower token id first */
}

static long count_at_least(const float *v, int n, float t) {
    int c = 0;  /* an int sum vectorises; a row is far below 2^31 */
#pragma omp simd reduction(+ : c)
    for (int i = 0; i < n; i++) c += v[i] >= t ? 1 : 0;
    return c;
}

/* Runs fn(r, scratch, args) for every row on `threads` threads, each with
 * its own scratch of `bytes`. Returns -1 if scratch memory ran out. */
typedef void (*RowFn)(int r, void *scratch, const void *args);

static int each_row(int rows, size_t bytes, RowFn fn, const void *args, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        void *scratch = malloc(bytes);
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic)
        for (int r = 0; r < rows; r++)
            if (scratch) fn(r, scratch, args);
        free(scratch);
    }
    return failed ? -1 : 0;
}

typedef struct { const float *x; int vocab, k; int32_t *ids; } TopKArgs;

static void top_k_row(int r, void *scratch, const void *args) {
    const TopKArgs *a = args;
    const float *x = a->x;
    int vocab = a->vocab, k = a->k;
    int32_t *ids = a->ids;
    Entry *buf = scratch;
    const float *v = x + (long)r * vocab;
    float lo = FLT_MAX, hi = -FLT_MAX;
#pragma omp simd reduction(min : lo) reduction(max : hi)
    for (int i = 0; i < vocab; i++) {
        float f = fabsf(v[i]) <= FLT_MAX ? v[i] : 0.f;  /* finite values only */
        int ok = fabsf(v[i]) <= FLT_MAX;
        lo = ok && f < lo ? f : lo;
        hi = ok && f > hi ? f : hi;
    }
    /* lo: at least k entries are >= lo (or everything but NaNs) */
    if (lo > hi || count_at_least(v, vocab, lo) < k) {
        lo = -INFINITY;
    } else {
        for (int it = 0; it < 64; it++) {
            float mid = lo + (hi - lo) * 0.5f;
            if (mid <= lo || mid >= hi) break;
            long c = count_at_least(v, vocab, mid);
            if (c >= k) {
                lo = mid;
                if (c <= 2L * k) break;
            } else {
                hi = mid;
            }
        }
    }
    int n = 0;
    if (lo == -INFINITY) {  /* every entry, NaNs ranked as -inf */
        for (int i = 0; i < vocab; i++)
            buf[n++] = (Entry){isnan(v[i]) ? -INFINITY : v[i], i};
    } else {
        for (int i = 0; i < vocab; i++)
            if (v[i] >= lo) buf[n++] = (Entry){v[i], i};
    }
    qsort(buf, n, sizeof(Entry), by_value_desc);
    int32_t *out = ids + (long)r * k;
    for (int j = 0; j < k; j++) out[j] = buf[j].id;  /* n >= k */
}

/* ids [rows, k]: each row's k largest values of x [rows, vocab], largest
 * first. NaNs rank as -inf. Returns -1 if scratch memory ran out. */
int top_k_ids(const float *x, int rows, int vocab, int k, int32_t *ids, int threads) {
    TopKArgs args = {x, vocab, k, ids};
    return each_row(rows, sizeof(Entry) * (size_t)vocab, top_k_row, &args, threads);
}

/* e^x for x in [-87, 0]: range reduction and a degree-6 polynomial (relative
 * error ~2e-7), plain C that gcc vectorises without -ffast-math. */
static inline float exp_nonpositive(float x) {
    float k = floorf(x * 1.44269504f + 0.5f);
    float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120
                  + r * (1.f / 720))))));
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

typedef struct {
    const float *x, *inv_temp, *u;
    int vocab;
    float *lse;
    int32_t *ids;
} SoftmaxArgs;

static void softmax_row(int r, void *scratch, const void *args) {
    const SoftmaxArgs *a = args;
    const float *x = a->x, *inv_temp = a->inv_temp, *u = a->u;
    int vocab = a->vocab;
    float *lse = a->lse, *w = scratch;
    int32_t *ids = a->ids;
    const float *v = x + (long)r * vocab;
    float t = inv_temp[r], top = -FLT_MAX;
#pragma omp simd reduction(max : top)
    for (int i = 0; i < vocab; i++) top = fabsf(v[i]) <= FLT_MAX && v[i] > top ? v[i] : top;
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int i = 0; i < vocab; i++) {
        /* -inf and NaN weigh nothing; the clamp keeps exp's input in range */
        int finite = fabsf(v[i]) <= FLT_MAX;
        float e = exp_nonpositive(finite ? fmaxf((v[i] - top) * t, -87.f) : 0.f);
        w[i] = finite ? e : 0.f;
        total += w[i];
    }
    lse[r] = top * t + logf(total);
    if (!u) return;
    float target = u[r] * total, cap = total * (1.f - 0x1p-20f), run = 0.f;
    if (target > cap) target = cap;
    int id = vocab - 1;
    for (int i = 0; i < vocab; i++) {
        run += w[i];
        if (run > target) { id = i; break; }
    }
    ids[r] = id;
}

/* lse[r] = logsumexp(x[r] * inv_temp[r]) over finite entries; with u, also
 * ids[r] = the inverse-CDF draw for u[r] in (0, 1). x: [rows, vocab]. */
int softmax_rows(const float *x, int rows, int vocab, const float *inv_temp, const float *u,
                 float *lse, int32_t *ids, int threads) {
    SoftmaxArgs args = {x, inv_temp, u, vocab, lse, ids};
    return each_row(rows, sizeof(float) * (size_t)vocab, softmax_row, &args, threads);
}
