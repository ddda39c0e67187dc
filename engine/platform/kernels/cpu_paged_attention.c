/* Paged attention for the CPU, reading K/V blocks in place from the pools.
 *
 * Built at first use by kvcache/cpu_paged_attention.py with the system C
 * compiler (-O3 -march=native -ffast-math); HEAD_DIM and BLOCK_SIZE are fixed
 * at compile time so the inner loops vectorise with constant trip counts.
 *
 * Every packed query token i is one unit of work: it attends to the first
 * ctx[i] token slots of the block table tables[qrow[i]], so a decode row and
 * each token of a prompt chunk (ctx = its position + 1, hence causal) go
 * through the same loop. A token with ctx 0 is padding: its output is zero.
 *
 * K/V are stored as KV_T: float, or _Float16 when built with -DKV_HALF (half
 * the bytes to read; converted to float on load, all arithmetic in float).
 *
 * Layouts (row-major), per block of BLOCK_SIZE token slots:
 *   k_pool  [blocks, kv_heads, HEAD_DIM, BLOCK_SIZE]  keys transposed, so one
 *           query's scores for a whole block are HEAD_DIM vector FMAs
 *   v_pool  [blocks, kv_heads, BLOCK_SIZE, HEAD_DIM]
 *   q, out  [n_queries, heads, HEAD_DIM]
 *   tables  [n_tables, width] block ids
 * Query head h reads KV head h / (heads / kv_heads), as in Llama's GQA.
 */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(HEAD_DIM) || !defined(BLOCK_SIZE)
#error "compile with -DHEAD_DIM=<head dim> -DBLOCK_SIZE=<block size>"
#endif
#define D HEAD_DIM
#define BS BLOCK_SIZE
#define MAX_GROUP 16
#ifdef KV_HALF
typedef _Float16 KV_T;
#else
typedef float KV_T;
#endif
#define INLINE static inline __attribute__((always_inline))

/* n KV_T values to float. gcc 12 turns a plain loop over _Float16 into
 * element-by-element inserts (3-8x slower than float32 K/V), so half
 * precision converts 16 (or 8) values an instruction explicitly. */
INLINE void to_float(const KV_T *src, float *dst, int n) {
    int i = 0;
#if defined(KV_HALF) && defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
#elif defined(KV_HALF) && defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; ++i) dst[i] = (float)src[i];
}

typedef struct {
    const float *q;
    const KV_T *k_pool, *v_pool;
    const int32_t *tables, *qrow, *ctx;
    float *out;
    int width, heads, kv_heads;
    float scale;
    int max_ctx;
} job_t;

/* Scores of G query heads against one block's keys: s[g * stride + t].
 * Blocks sit at random places in a pool far larger than the caches, so each
 * loop also prefetches the block that comes next (`next`), a line a step. */
INLINE void block_scores(const KV_T *kt_in, const KV_T *next, const float *qs, float *s,
                         int stride, const int G) {
#ifdef KV_HALF
    float kt[D * BS];
    to_float(kt_in, kt, D * BS);
#else
    const float *kt = kt_in;
#endif
    float acc[MAX_GROUP][BS];
    for (int g = 0; g < G; ++g)
        for (int t = 0; t < BS; ++t) acc[g][t] = 0.f;
    for (int d = 0; d < D; ++d) {
        __builtin_prefetch(next + d * BS);
        for (int g = 0; g < G; ++g) {
            const float qd = qs[g * D + d];
            for (int t = 0; t < BS; ++t) acc[g][t] += qd * kt[d * BS + t];
        }
    }
    for (int g = 0; g < G; ++g)
        for (int t = 0; t < BS; ++t) s[g * stride + t] = acc[g][t];
}

/* One query token, one KV head and its G query heads. `s` has room for
 * G rows of the context rounded up to whole blocks. */
INLINE void attend_head(const job_t *j, const float *q, const int32_t *table, int ctx,
                        int h, float *s, float *out, const int G) {
    const int KVH = j->kv_heads;
    const int blocks = (ctx + BS - 1) / BS;
    const int stride = blocks * BS;
    float qs[MAX_GROUP * D];
    for (int i = 0; i < G * D; ++i) qs[i] = q[i] * j->scale;

    const int64_t head = (int64_t)h * (D * BS), per_block = (int64_t)KVH * (D * BS);
    for (int b = 0; b < blocks; ++b) {
        const KV_T *kt = j->k_pool + table[b] * per_block + head;
        const KV_T *next = j->k_pool + table[b + 1 < blocks ? b + 1 : b] * per_block + head;
        block_scores(kt, next, qs, s + b * BS, stride, G);
    }
    for (int g = 0; g < G; ++g) {
        float *row = s + g * stride;
        float m = row[0];
        for (int t = 1; t < ctx; ++t) m = row[t] > m ? row[t] : m;
        float sum = 0.f;
        for (int t = 0; t < ctx; ++t) {
            row[t] = expf(row[t] - m);
            sum += row[t];
        }
        const float inv = 1.f / sum;
        for (int t = 0; t < ctx; ++t) row[t] *= inv;
    }
    float acc[MAX_GROUP][D];
    for (int g = 0; g < G; ++g)
        for (int d = 0; d < D; ++d) acc[g][d] = 0.f;
    for (int b = 0; b < blocks; ++b) {
        const KV_T *v = j->v_pool + table[b] * per_block + head;
        const KV_T *next = j->v_pool + table[b + 1 < blocks ? b + 1 : b] * per_block + head;
        const int n = ctx - b * BS < BS ? ctx - b * BS : BS;
        for (int t = 0; t < n; ++t) {
            for (int l = 0; l < D; l += 64 / (int)sizeof(KV_T))
                __builtin_prefetch(next + t * D + l);
#ifdef KV_HALF
            float vt[D];
            to_float(v + t * D, vt, D);
#else
            const float *vt = v + t * D;
#endif
            for (int g = 0; g < G; ++g) {
                const float p = s[g * stride + b * BS + t];
                for (int d = 0; d < D; ++d) acc[g][d] += p * vt[d];
            }
        }
    }
    for (int g = 0; g < G; ++g) memcpy(out + g * D, acc[g], sizeof(float) * D);
}

/* Constant group sizes get their own unrolled copy of the loops. */
static void attend_head_any(const job_t *j, const float *q, const int32_t *table, int ctx,
                            int h, float *s, float *out, int G) {
    switch (G) {
    case 1: attend_head(j, q, table, ctx, h, s, out, 1); break;
    case 2: attend_head(j, q, table, ctx, h, s, out, 2); break;
    case 3: attend_head(j, q, table, ctx, h, s, out, 3); break;
    case 4: attend_head(j, q, table, ctx, h, s, out, 4); break;
    case 6: attend_head(j, q, table, ctx, h, s, out, 6); break;
    case 8: attend_head(j, q, table, ctx, h, s, out, 8); break;
    default: attend_head(j, q, table, ctx, h, s, out, G); break;
    }
}

/* Query token i: every KV head, or zeros for padding (ctx 0). */
static void attend_token(const job_t *j, int i, float *s) {
    float *out = j->out + (int64_t)i * j->heads * D;
    const int ctx = j->ctx[i];
    if (ctx <= 0) {
        memset(out, 0, sizeof(float) * j->heads * D);
        return;
    }
    const int G = j->heads / j->kv_heads;
    const int32_t *table = j->tables + (int64_t)j->qrow[i] * j->width;
    const float *q = j->q + (int64_t)i * j->heads * D;
    for (int h = 0; h < j->kv_heads; ++h)
        attend_head_any(j, q + h * G * D, table, ctx, h, s, out + h * G * D, G);
}

/* Store the K/V [kv_heads, HEAD_DIM] of one new token at token slot `slot`. */
static void write_token(KV_T *k_pool, KV_T *v_pool, int64_t slot, const float *k,
                        const float *v, int kv_heads) {
    const int64_t block = slot / BS, offset = slot % BS;
    for (int h = 0; h < kv_heads; ++h) {
        KV_T *kt = k_pool + (block * kv_heads + h) * (D * BS) + offset;
        KV_T *vt = v_pool + ((block * kv_heads + h) * BS + offset) * D;
        for (int d = 0; d < D; ++d) kt[d * BS] = (KV_T)k[h * D + d];
        for (int d = 0; d < D; ++d) vt[d] = (KV_T)v[h * D + d];
    }
}

/* Writes the K/V of `n_new` new tokens (k_new, v_new [n_new, kv_heads,
 * HEAD_DIM]) at `slots`, then attends every query token; either count may
 * be 0. The writes finish before any query reads: a prompt chunk's tokens
 * see each other's keys. Returns 0 on success, -1 on bad arguments or
 * failed allocation. Both loops share work out dynamically over the OpenMP
 * threads: the worker is often slow to get a core (the BLAS's own worker
 * spins on it after a matmul), and a static split made the main thread wait
 * for it at the barrier. */
int paged_attention(KV_T *k_pool, KV_T *v_pool, const float *k_new, const float *v_new,
                    const int64_t *slots, int n_new, const float *q, const int32_t *tables,
                    const int32_t *qrow, const int32_t *ctx, float *out, int n_queries,
                    int width, int heads, int kv_heads, float scale, int threads) {
    if (kv_heads <= 0 || heads % kv_heads || heads / kv_heads > MAX_GROUP) return -1;
    int max_ctx = 0;
    for (int i = 0; i < n_queries; ++i) {
        if (ctx[i] > width * BS) return -1;
        max_ctx = ctx[i] > max_ctx ? ctx[i] : max_ctx;
    }
    const job_t job = {q, k_pool, v_pool, tables, qrow, ctx, out, width, heads, kv_heads,
                       scale, max_ctx};
    const int G = heads / kv_heads;
    const size_t scratch = (size_t)G * ((max_ctx + BS - 1) / BS * BS + BS);
    const int64_t per_token = (int64_t)kv_heads * D;
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(|| : failed)
    {
#pragma omp for schedule(dynamic, 8)
        for (int i = 0; i < n_new; ++i)
            write_token(k_pool, v_pool, slots[i], k_new + i * per_token, v_new + i * per_token,
                        kv_heads);
        float *s = n_queries ? malloc(sizeof(float) * scratch) : NULL;
        if (n_queries && !s) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < n_queries; ++i)
            if (s) attend_token(&job, i, s);
        free(s);
    }
    return failed ? -1 : 0;
}
