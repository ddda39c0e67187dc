/* Paged attention for the CPU, reading K/V blocks in place from the pools.
 *
 * Every packed query token i is one unit of work: it attends to the first
 * ctx[i] token slots of the block table tables[qrow[i]], so a decode row and
 * each token of a prompt chunk (ctx = its position + 1, hence causal) go
 * through the same loop. A token with ctx 0 is padding: its output is zero.
 *
 * Per call (one layer) two options: a sliding window (`window` > 0: a query
 * sees only its `window` latest slots, itself included; blocks before the
 * window are not read, so they may already belong to someone else) and
 * soft-capping (`softcap` > 0: each score s becomes softcap * tanh(s /
 * softcap) before the softmax, as Gemma 2 does).
 *
 * K/V are stored as float, or as _Float16 with `kv_half` (half the bytes to
 * read; converted to float on load, all arithmetic in float).
 *
 * Layouts (row-major), per block of block_size (BS) token slots, D = head_dim:
 *   k_pool  [blocks, kv_heads, D, BS]  keys transposed, so one query's scores
 *           for a whole block are D vector FMAs
 *   v_pool  [blocks, kv_heads, BS, D]
 *   q, out  [n_queries, heads, D]
 *   tables  [n_tables, width] block ids
 * Query head h reads KV head h / (heads / kv_heads), as in Llama's GQA.
 *
 * D, BS and the K/V type are run-time arguments, but the inner loops need
 * them as constants to vectorise with fixed trip counts: the loops below take
 * them as `const int` parameters of always-inlined functions, and SHAPES
 * instantiates them for the common shapes (head_dim 64 or 128, blocks of 16,
 * either K/V type). Any other shape runs a generic copy of the same loops.
 */

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256   /* the generic copy keeps a few D x BS arrays on the stack */
#define MAX_BLOCK_SIZE 128
typedef _Float16 half_t;
#define INLINE static inline __attribute__((always_inline))

/* n halves to float. gcc 12 turns a plain loop over _Float16 into
 * element-by-element inserts (3-8x slower than float32 K/V), so this converts
 * 16 (or 8) values an instruction explicitly where the build allows. */
INLINE void half_to_float(const half_t *src, float *dst, int n) {
    int i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; ++i) dst[i] = (float)src[i];
}

typedef struct job job_t;
struct job {
    const float *q;
    char *k_pool, *v_pool;  /* float or half_t elements */
    const float *k_new, *v_new;
    const int64_t *slots;
    const int32_t *tables, *qrow, *ctx;
    float *out;
    int width, heads, kv_heads, head_dim, block_size;
    float scale;
    int window;     /* 0: the whole context */
    float softcap;  /* 0: none */
    void (*attend)(const job_t *j, int i, float *s);  /* one query token */
    void (*write)(const job_t *j, int i);             /* one new token's K/V */
};

/* Scores of G query heads against one block's keys: s[g * stride + t].
 * Blocks sit at random places in a pool far larger than the caches, so each
 * loop also prefetches the block that comes next (`next`), a line a step. */
INLINE void block_scores(const char *kt_in, const char *next, const float *qs, float *s,
                         int stride, const int G, const int D, const int BS, const int half) {
    const int esize = half ? 2 : 4;
    float converted[half ? D * BS : 1];
    const float *kt = (const float *)kt_in;
    if (half) {
        half_to_float((const half_t *)kt_in, converted, D * BS);
        kt = converted;
    }
    float acc[MAX_GROUP][BS];
    for (int g = 0; g < G; ++g)
        for (int t = 0; t < BS; ++t) acc[g][t] = 0.f;
    for (int d = 0; d < D; ++d) {
        __builtin_prefetch(next + (int64_t)d * BS * esize);
        for (int g = 0; g < G; ++g) {
            const float qd = qs[g * D + d];
            for (int t = 0; t < BS; ++t) acc[g][t] += qd * kt[d * BS + t];
        }
    }
    for (int g = 0; g < G; ++g)
        for (int t = 0; t < BS; ++t) s[g * stride + t] = acc[g][t];
}

/* One query token, one KV head and its G query heads. `s` has room for
 * G rows of the context rounded up to whole blocks. Row g of `s` holds the
 * scores of the slots from block b0 on; the live ones are [from, to). */
INLINE void attend_head(const job_t *j, const float *q, const int32_t *table, int ctx,
                        int h, float *s, float *out, const int G, const int D, const int BS,
                        const int half) {
    const int esize = half ? 2 : 4;
    const int first = j->window > 0 && ctx > j->window ? ctx - j->window : 0;
    const int b0 = first / BS, blocks = (ctx + BS - 1) / BS;
    const int stride = (blocks - b0) * BS, from = first - b0 * BS, to = ctx - b0 * BS;
    float qs[MAX_GROUP * D];
    for (int i = 0; i < G * D; ++i) qs[i] = q[i] * j->scale;

    /* element offsets of this head in a block, and of a block */
    const int64_t head = (int64_t)h * (D * BS), per_block = (int64_t)j->kv_heads * (D * BS);
    for (int b = b0; b < blocks; ++b) {
        const char *kt = j->k_pool + (table[b] * per_block + head) * esize;
        const int nb = table[b + 1 < blocks ? b + 1 : b];
        const char *next = j->k_pool + (nb * per_block + head) * esize;
        block_scores(kt, next, qs, s + (b - b0) * BS, stride, G, D, BS, half);
    }
    for (int g = 0; g < G; ++g) {
        float *row = s + g * stride;
        if (j->softcap > 0.f) {
            const float cap = j->softcap, inv_cap = 1.f / j->softcap;
            for (int t = from; t < to; ++t) row[t] = cap * tanhf(row[t] * inv_cap);
        }
        float m = row[from];
        for (int t = from + 1; t < to; ++t) m = row[t] > m ? row[t] : m;
        float sum = 0.f;
        for (int t = from; t < to; ++t) {
            row[t] = expf(row[t] - m);
            sum += row[t];
        }
        const float inv = 1.f / sum;
        for (int t = from; t < to; ++t) row[t] *= inv;
    }
    float acc[MAX_GROUP][D];
    for (int g = 0; g < G; ++g)
        for (int d = 0; d < D; ++d) acc[g][d] = 0.f;
    for (int b = b0; b < blocks; ++b) {
        const char *v = j->v_pool + (table[b] * per_block + head) * esize;
        const int nb = table[b + 1 < blocks ? b + 1 : b];
        const char *next = j->v_pool + (nb * per_block + head) * esize;
        const int n = ctx - b * BS < BS ? ctx - b * BS : BS;
        const int start = b == b0 ? from : 0;
        const float *p = s + (b - b0) * BS;
        for (int t = start; t < n; ++t) {
            for (int l = 0; l < D * esize; l += 64) __builtin_prefetch(next + t * D * esize + l);
            float converted[half ? D : 1];
            const float *vt = (const float *)v + t * D;
            if (half) {
                half_to_float((const half_t *)v + t * D, converted, D);
                vt = converted;
            }
            for (int g = 0; g < G; ++g) {
                const float pg = p[g * stride + t];
                for (int d = 0; d < D; ++d) acc[g][d] += pg * vt[d];
            }
        }
    }
    for (int g = 0; g < G; ++g) memcpy(out + g * D, acc[g], sizeof(float) * D);
}

/* Query token i: every KV head, or zeros for padding (ctx 0). Constant
 * group sizes get their own unrolled copy of the loops. */
INLINE void attend_token(const job_t *j, int i, float *s, const int D, const int BS,
                         const int half) {
    float *out = j->out + (int64_t)i * j->heads * D;
    const int ctx = j->ctx[i];
    if (ctx <= 0) {
        memset(out, 0, sizeof(float) * j->heads * D);
        return;
    }
    const int G = j->heads / j->kv_heads;
    const int32_t *table = j->tables + (int64_t)j->qrow[i] * j->width;
    const float *q = j->q + (int64_t)i * j->heads * D;
    for (int h = 0; h < j->kv_heads; ++h) {
        const float *qh = q + h * G * D;
        float *oh = out + h * G * D;
        switch (G) {
        case 1: attend_head(j, qh, table, ctx, h, s, oh, 1, D, BS, half); break;
        case 2: attend_head(j, qh, table, ctx, h, s, oh, 2, D, BS, half); break;
        case 3: attend_head(j, qh, table, ctx, h, s, oh, 3, D, BS, half); break;
        case 4: attend_head(j, qh, table, ctx, h, s, oh, 4, D, BS, half); break;
        case 6: attend_head(j, qh, table, ctx, h, s, oh, 6, D, BS, half); break;
        case 8: attend_head(j, qh, table, ctx, h, s, oh, 8, D, BS, half); break;
        default: attend_head(j, qh, table, ctx, h, s, oh, G, D, BS, half); break;
        }
    }
}

/* Store new token i's K/V [kv_heads, D] at its token slot. */
INLINE void write_token(const job_t *j, int i, const int D, const int BS, const int half) {
    const int64_t slot = j->slots[i], block = slot / BS, offset = slot % BS;
    const float *k = j->k_new + (int64_t)i * j->kv_heads * D;
    const float *v = j->v_new + (int64_t)i * j->kv_heads * D;
    for (int h = 0; h < j->kv_heads; ++h) {
        const int64_t kt = (block * j->kv_heads + h) * (D * BS) + offset;
        const int64_t vt = ((block * j->kv_heads + h) * BS + offset) * D;
        if (half) {
            half_t *kp = (half_t *)j->k_pool + kt, *vp = (half_t *)j->v_pool + vt;
            for (int d = 0; d < D; ++d) kp[d * BS] = (half_t)k[h * D + d];
            for (int d = 0; d < D; ++d) vp[d] = (half_t)v[h * D + d];
        } else {
            float *kp = (float *)j->k_pool + kt, *vp = (float *)j->v_pool + vt;
            for (int d = 0; d < D; ++d) kp[d * BS] = k[h * D + d];
            for (int d = 0; d < D; ++d) vp[d] = v[h * D + d];
        }
    }
}

/* One copy of the loops per shape: constants, or the job's own numbers. */
#define SHAPE(name, D, BS, half)                                                          \
    static void attend_##name(const job_t *j, int i, float *s) {                          \
        attend_token(j, i, s, D, BS, half);                                               \
    }                                                                                     \
    static void write_##name(const job_t *j, int i) { write_token(j, i, D, BS, half); }
SHAPE(d64_b16_f32, 64, 16, 0)
SHAPE(d64_b16_f16, 64, 16, 1)
SHAPE(d128_b16_f32, 128, 16, 0)
SHAPE(d128_b16_f16, 128, 16, 1)
SHAPE(any_f32, j->head_dim, j->block_size, 0)
SHAPE(any_f16, j->head_dim, j->block_size, 1)
#undef SHAPE

static const struct {
    int head_dim, block_size, half;
    void (*attend)(const job_t *, int, float *);
    void (*write)(const job_t *, int);
} SHAPES[] = {
    {64, 16, 0, attend_d64_b16_f32, write_d64_b16_f32},
    {64, 16, 1, attend_d64_b16_f16, write_d64_b16_f16},
    {128, 16, 0, attend_d128_b16_f32, write_d128_b16_f32},
    {128, 16, 1, attend_d128_b16_f16, write_d128_b16_f16},
    {0, 0, 0, attend_any_f32, write_any_f32},
    {0, 0, 1, attend_any_f16, write_any_f16},
};

/* 1 if the kernel takes this head_dim and block size (any K/V type), else 0. */
int paged_attention_supports(int head_dim, int block_size) {
    return head_dim > 0 && head_dim <= MAX_HEAD_DIM && block_size > 0 &&
           block_size <= MAX_BLOCK_SIZE;
}

/* 1 if (head_dim, block_size, kv_half) has its own copy of the loops, 0 if it
 * runs the generic one. */
int paged_attention_specialised(int head_dim, int block_size, int kv_half) {
    for (size_t s = 0; s < sizeof SHAPES / sizeof SHAPES[0]; ++s)
        if (SHAPES[s].head_dim == head_dim && SHAPES[s].block_size == block_size &&
            SHAPES[s].half == !!kv_half)
            return 1;
    return 0;
}

static void pick_shape(job_t *job, int kv_half) {
    for (size_t s = 0; s < sizeof SHAPES / sizeof SHAPES[0]; ++s) {
        const int generic = SHAPES[s].head_dim == 0;
        if (SHAPES[s].half == kv_half && (generic || (SHAPES[s].head_dim == job->head_dim &&
                                                      SHAPES[s].block_size == job->block_size))) {
            job->attend = SHAPES[s].attend;
            job->write = SHAPES[s].write;
            return;
        }
    }
}

/* Writes the K/V of `n_new` new tokens (k_new, v_new [n_new, kv_heads,
 * head_dim]) at `slots`, then attends every query token; either count may
 * be 0. The writes finish before any query reads: a prompt chunk's tokens
 * see each other's keys. Returns 0 on success, -1 on bad arguments or
 * failed allocation. Both loops share work out dynamically over the OpenMP
 * threads: the worker is often slow to get a core (the BLAS's own worker
 * spins on it after a matmul), and a static split made the main thread wait
 * for it at the barrier. */
int paged_attention(void *k_pool, void *v_pool, const float *k_new, const float *v_new,
                    const int64_t *slots, int n_new, const float *q, const int32_t *tables,
                    const int32_t *qrow, const int32_t *ctx, float *out, int n_queries,
                    int width, int heads, int kv_heads, int head_dim, int block_size,
                    int kv_half, float scale, int window, float softcap, int threads) {
    if (kv_heads <= 0 || heads % kv_heads || heads / kv_heads > MAX_GROUP ||
        !paged_attention_supports(head_dim, block_size) || window < 0 || !(softcap >= 0.f))
        return -1;
    int max_ctx = 0;
    for (int i = 0; i < n_queries; ++i) {
        if (ctx[i] > width * block_size) return -1;
        max_ctx = ctx[i] > max_ctx ? ctx[i] : max_ctx;
    }
    job_t job = {q, k_pool, v_pool, k_new, v_new, slots, tables, qrow, ctx, out, width,
                 heads, kv_heads, head_dim, block_size, scale, window, softcap, 0, 0};
    pick_shape(&job, !!kv_half);
    const int G = heads / kv_heads, bs = block_size;
    const size_t scratch = (size_t)G * ((max_ctx + bs - 1) / bs * bs + bs);
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(|| : failed)
    {
#pragma omp for schedule(dynamic, 8)
        for (int i = 0; i < n_new; ++i) job.write(&job, i);
        float *s = n_queries ? malloc(sizeof(float) * scratch) : NULL;
        if (n_queries && !s) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < n_queries; ++i)
            if (s) job.attend(&job, i, s);
        free(s);
    }
    return failed ? -1 : 0;
}
