/* Per-layer CPU operations on host memory, for the shared layers of models/layers.
 *
 * Each function is one layer's math on row-major float32 activations
 * [rows, features], with no synchronisation and no allocation beyond reused
 * per-thread scratch. engine/platform/host_forward.py binds them to the layers
 * of any model composed from models/layers, so an architecture gets the CPU
 * speed without C of its own (MLX's CPU backend runs each element-wise op
 * single-threaded and hands every evaluation to its stream thread: around the
 * matmuls that cost a third of a 64-row decode step).
 *
 * A matmul is either float32 weights [out, in] through cblas_sgemm (from the
 * BLAS the engine loaded, handed over at run time: blas.h) or a packed group-quantized weight through the
 * integer kernel (cpu_int8_matmul.c).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "int16_matmul.h"
#include "int8_matmul.h"

typedef struct {
    const float *weight;   /* float32 [out, in], or NULL for a packed weight */
    const uint8_t *codes;  /* packed int8 layout (see cpu_int8_matmul.c) */
    const float *scales;
    const float *biases;
    const float *bias;     /* optional [out] */
    int out_dim, in_dim, group_size;
    int wide;              /* packed weight with int16 activations; 2: 16-bit codes
                              (cpu_int16_matmul.c, no biases) */
} Matmul;

/* Up to this many rows, BLAS computes y.T = W @ x.T and we transpose: MKL
 * then streams W as it lies instead of repacking it (measured 1.1-7x faster
 * at 64 rows for the default model's shapes; ~10% slower at 2048 rows). */
#define FEW_ROWS 512
#define PAR_ROWS 256 /* element-wise loops use the team from this many rows */
/* ... or, where rows may be short (a per-head q/k norm's are head_dim long),
 * from this many values: 32 decode rows of 9 heads were 288 rows of tiny
 * work, and waking the team cost more than the norm. */
#define PAR_VALUES (256L * 512)

/* A buffer of at least n floats, kept and grown across calls; per calling
 * thread, since engines may step in several threads. */
enum { SLOT_TRANSPOSE, SLOT_SPLIT, SLOTS };

static float *scratch_slot(int slot, size_t n) {
    static _Thread_local float *buf[SLOTS];
    static _Thread_local size_t cap[SLOTS];
    if (n > cap[slot]) {
        free(buf[slot]);
        buf[slot] = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
        cap[slot] = buf[slot] ? n : 0;
    }
    return buf[slot];
}

/* y[rows, n] (+)= t[n, rows] transposed, in 32 x 32 tiles. */
static void transpose_into(const float *t, int rows, int n, float *y, int accumulate) {
    for (int j0 = 0; j0 < n; j0 += 32)
        for (int r0 = 0; r0 < rows; r0 += 32) {
            int j1 = j0 + 32 < n ? j0 + 32 : n, r1 = r0 + 32 < rows ? r0 + 32 : rows;
            for (int r = r0; r < r1; r++) {
                float *out = y + (long)r * n;
                for (int j = j0; j < j1; j++)
                    out[j] = (accumulate ? out[j] : 0.f) + t[(long)j * rows + r];
            }
        }
}

/* y[rows, out] (+)= x[rows, in] @ W.T (+ bias). */
int ops_linear(const Matmul *m, const float *x, int rows, float *y, int accumulate,
               int threads) {
    if (rows == 0) return 0;
    if (m->weight && !conveyor_sgemm_ready()) return -3;
    if (m->weight && rows <= FEW_ROWS) {
        float *t = scratch_slot(SLOT_TRANSPOSE, (size_t)rows * m->out_dim);
        if (!t) return -1;
        conveyor_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m->out_dim, rows, m->in_dim, 1.f,
                    m->weight, m->in_dim, x, m->in_dim, 0.f, t, rows);
        transpose_into(t, rows, m->out_dim, y, accumulate);
    } else if (m->weight) {
        conveyor_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, m->out_dim, m->in_dim, 1.f,
                    x, m->in_dim, m->weight, m->in_dim, accumulate ? 1.f : 0.f, y, m->out_dim);
    } else if (m->wide == 2) { /* adds the bias itself */
        return int16_matmul(x, m->in_dim, rows, m->in_dim, (const int16_t *)m->codes,
                            m->scales, m->bias, m->out_dim, m->group_size, y, m->out_dim,
                            accumulate, threads);
    } else {
        int rc = int8_matmul(x, m->in_dim, rows, m->in_dim, m->codes, m->scales, m->biases,
                             m->out_dim, m->group_size, y, m->out_dim, accumulate, m->wide,
                             threads);
        if (rc) return rc;
    }
    if (m->bias) {
#pragma omp parallel for num_threads(threads) if (rows >= PAR_ROWS)
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < m->out_dim; j++) y[(long)r * m->out_dim + j] += m->bias[j];
    }
    return 0;
}

/* Several outputs of one input through one fused weight (q/k/v, gate/up):
 * the fused matmul goes to scratch, then each part is copied out contiguous.
 * outs[i] gets widths[i] columns. One kernel call instead of several keeps
 * both cores busy where narrow k/v projections alone left them half idle. */
int ops_linear_split(const Matmul *fused, const float *x, int rows, float **outs,
                     const int *widths, int parts, int threads) {
    if (fused->wide == 2) /* writes each part in place, no scratch */
        return int16_matmul_split(x, rows, fused->in_dim, (const int16_t *)fused->codes,
                                  fused->scales, fused->bias, fused->group_size, outs, widths,
                                  parts, threads);
    int width = fused->out_dim;
    float *t = scratch_slot(SLOT_SPLIT, (size_t)rows * width);
    if (!t) return -1;
    int rc = ops_linear(fused, x, rows, t, 0, threads);
    if (rc) return rc;
    for (int r = 0; r < rows; r++) {
        const float *row = t + (long)r * width;
        for (int p = 0, at = 0; p < parts; at += widths[p], p++)
            memcpy(outs[p] + (long)r * widths[p], row + at, sizeof(float) * widths[p]);
    }
    return 0;
}

/* out = x / rms(x) * w, per row of dim values. */
void ops_rms_norm(const float *x, long rows, int dim, const float *w, float eps, float *out,
                  int threads) {
#pragma omp parallel for num_threads(threads) if (rows * dim >= PAR_VALUES)
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        float ss = 0.f;
        for (int i = 0; i < dim; i++) ss += xr[i] * xr[i];
        float inv = 1.f / sqrtf(ss / dim + eps);
        for (int i = 0; i < dim; i++) o[i] = xr[i] * inv * w[i];
    }
}

/* out = (x - mean) / std * w + b, per row. */
void ops_layer_norm(const float *x, long rows, int dim, const float *w, const float *b,
                    float eps, float *out, int threads) {
#pragma omp parallel for num_threads(threads) if (rows >= PAR_ROWS)
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        float mean = 0.f, var = 0.f;
        for (int i = 0; i < dim; i++) mean += xr[i];
        mean /= dim;
        for (int i = 0; i < dim; i++) var += (xr[i] - mean) * (xr[i] - mean);
        float inv = 1.f / sqrtf(var / dim + eps);
        for (int i = 0; i < dim; i++) o[i] = (xr[i] - mean) * inv * w[i] + (b ? b[i] : 0.f);
    }
}

/* Rotate the first rot_dims of each head of x [rows, heads, head_dim] in place
 * by its token's angles: cos/sin [rows, rot_dims/2] (magnitude included).
 * Halves (rotate-half) or interleaved pairs (traditional). */
void ops_rope(float *x, int rows, int heads, int head_dim, int rot_dims, const float *cos_t,
              const float *sin_t, int traditional, int threads) {
    int half = rot_dims / 2;
#pragma omp parallel for num_threads(threads) if (rows >= PAR_ROWS)
    for (int r = 0; r < rows; r++) {
        const float *c = cos_t + (long)r * half, *s = sin_t + (long)r * half;
        for (int hd = 0; hd < heads; hd++) {
            float *v = x + ((long)r * heads + hd) * head_dim;
            if (traditional) {
                for (int i = 0; i < half; i++) {
                    float a = v[2 * i], b = v[2 * i + 1];
                    v[2 * i] = a * c[i] - b * s[i];
                    v[2 * i + 1] = b * c[i] + a * s[i];
                }
            } else {
                for (int i = 0; i < half; i++) {
                    float a = v[i], b = v[i + half];
                    v[i] = a * c[i] - b * s[i];
                    v[i + half] = b * c[i] + a * s[i];
                }
            }
        }
    }
}

enum { ACT_SILU = 0, ACT_GELU = 1, ACT_GELU_TANH = 2, ACT_RELU = 3 };

/* The clamps keep expf/tanhf finite, which -ffast-math lets the compiler assume. */
static inline float silu(float g) { return g / (1.f + expf(fminf(-g, 80.f))); }
static inline float gelu(float g) { return 0.5f * g * (1.f + erff(g * 0.70710678f)); }
static inline float gelu_tanh(float g) {
    float u = fmaxf(fminf(0.7978845608f * (g + 0.044715f * g * g * g), 40.f), -40.f);
    return 0.5f * g * (1.f + tanhf(u));
}
static inline float relu(float g) { return g > 0.f ? g : 0.f; }

/* One loop per activation, so each vectorises (libmvec's expf/erff/tanhf). */
#define ACT_LOOP(fn)                                                               \
    if (u) {                                                                       \
        _Pragma("omp parallel for num_threads(threads) if (n >= (1 << 18))")      \
        for (long i = 0; i < n; i++) g[i] = fn(g[i]) * u[i];                       \
    } else {                                                                       \
        _Pragma("omp parallel for num_threads(threads) if (n >= (1 << 18))")      \
        for (long i = 0; i < n; i++) g[i] = fn(g[i]);                              \
    }

/* g = act(g) * u in place (u NULL: g = act(g)); n values. Returns -1 for an
 * unknown activation. */
int ops_act_mul(float *g, const float *u, long n, int kind, int threads) {
    switch (kind) {
    case ACT_SILU: ACT_LOOP(silu); return 0;
    case ACT_GELU: ACT_LOOP(gelu); return 0;
    case ACT_GELU_TANH: ACT_LOOP(gelu_tanh); return 0;
    case ACT_RELU: ACT_LOOP(relu); return 0;
    }
    return -1;
}

/* ---- Encoder attention ---------------------------------------------------
 * Bidirectional attention over a right-padded batch, for encoders (BERT):
 * q, out [batch * length, heads, head_dim] and k, v [batch * length, kv_heads,
 * head_dim], row b's tokens at b * length + t. Each real token of row b
 * (t < lengths[b]) attends to the row's lengths[b] real keys (`causal`: to
 * those up to itself, for a decoder run as an encoder); padding queries get
 * zeros. One (row, head) pair is one unit of work: its keys are
 * copied transposed ([head_dim, keys]) so a tile of up to QUERY_TILE queries
 * by KEY_TILE keys accumulates in registers, and its values are read in place.
 */
#define QUERY_TILE 8  /* queries per tile, at most */
#define KEY_TILE 16
#define MAX_DIM_VECTORS 8  /* head_dim / 16 kept in registers, at most */

/* 16 floats in one value (GCC/clang vector extension: one AVX-512 register,
 * or two AVX2 ones where that is what the CPU has); `vload` reads 16
 * floats at any alignment. */
typedef float vf16 __attribute__((vector_size(64)));
typedef float vf16_any __attribute__((vector_size(64), aligned(4), may_alias));
static inline vf16 vload(const float *p) { return *(const vf16_any *)p; }

static float *attention_scratch(size_t n) {
    static _Thread_local float *buf;
    static _Thread_local size_t cap;
    if (n > cap) {
        free(buf);
        buf = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
        cap = buf ? n : 0;
    }
    return buf;
}

/* Scores of tq queries qs [tq][d] (scaled) against the first `keys` keys of
 * kt [d][padded] into s [tq][padded], KEY_TILE keys at a time. */
static inline __attribute__((always_inline)) void tile_scores(const float *qs, const float *kt,
                                                               int padded, int keys, float *s,
                                                               const int d, const int tq) {
    for (int j0 = 0; j0 < keys; j0 += KEY_TILE) {
        vf16 acc[QUERY_TILE];
        for (int r = 0; r < tq; r++) acc[r] = (vf16){0};
        for (int c = 0; c < d; c++) {
            vf16 key = vload(kt + (long)c * padded + j0);
            for (int r = 0; r < tq; r++) acc[r] += qs[r * d + c] * key;
        }
        for (int r = 0; r < tq; r++) *(vf16_any *)(s + (long)r * padded + j0) = acc[r];
    }
}

/* One (row, head): n real tokens; q/o rows `ldq` floats apart, k/v `ldk`;
 * `causal`: query i sees keys 0..i only.
 * kt [d][padded] and s [tq][padded] are scratch. `d` and `tq` (queries per
 * tile) are constants at the specialised call sites, so the loops over them
 * unroll and the accumulators stay in registers; the weighted sum of values
 * runs 16 dims at a time where d is a multiple of 16. */
static inline __attribute__((always_inline)) void attend_row_head(
    const float *q, const float *k, const float *v, float *o, int n, long ldq, long ldk,
    float scale, int causal, float *kt, float *s, const int d, const int tq) {
    int padded = (n + KEY_TILE - 1) / KEY_TILE * KEY_TILE;
    for (int j = 0; j < padded; j++)
        for (int c = 0; c < d; c++) kt[(long)c * padded + j] = j < n ? k[j * ldk + c] : 0.f;
    float qs[QUERY_TILE * 256];
    for (int i0 = 0; i0 < n; i0 += tq) {
        int rows = n - i0 < tq ? n - i0 : tq;
        int keys = causal ? i0 + rows : n;  /* keys this tile of queries may see */
        for (int r = 0; r < tq; r++)
            for (int c = 0; c < d; c++)
                qs[r * d + c] = r < rows ? q[(i0 + r) * ldq + c] * scale : 0.f;
        tile_scores(qs, kt, padded, keys, s, d, tq);
        float inv[QUERY_TILE];
        for (int r = 0; r < tq; r++) {
            float *row = s + (long)r * padded, m = row[0], sum = 0.f;
            if (r >= rows) {  /* a missing query: weights 0, nothing written */
                memset(row, 0, sizeof(float) * keys);
                continue;
            }
            int seen = causal ? i0 + r + 1 : n;
            for (int j = 1; j < seen; j++) m = row[j] > m ? row[j] : m;
            for (int j = 0; j < seen; j++) {
                row[j] = expf(row[j] - m);
                sum += row[j];
            }
            for (int j = seen; j < keys; j++) row[j] = 0.f;
            inv[r] = 1.f / sum;
        }
        if (d % 16 == 0 && d / 16 <= MAX_DIM_VECTORS) {
            vf16 acc[QUERY_TILE][MAX_DIM_VECTORS];
            for (int r = 0; r < tq; r++)
                for (int t = 0; t < d / 16; t++) acc[r][t] = (vf16){0};
            for (int j = 0; j < keys; j++) {
                const float *vr = v + j * ldk;
                for (int t = 0; t < d / 16; t++) {
                    vf16 val = vload(vr + 16 * t);
                    for (int r = 0; r < tq; r++) acc[r][t] += s[(long)r * padded + j] * val;
                }
            }
            for (int r = 0; r < rows; r++)
                for (int t = 0; t < d / 16; t++)
                    *(vf16_any *)(o + (i0 + r) * ldq + 16 * t) = acc[r][t] * inv[r];
        } else {
            for (int r = 0; r < rows; r++) {
                float *out = o + (i0 + r) * ldq;
                memset(out, 0, sizeof(float) * d);
                for (int j = 0; j < keys; j++) {
                    float p = s[(long)r * padded + j] * inv[r];
                    for (int c = 0; c < d; c++) out[c] += p * v[j * ldk + c];
                }
            }
        }
    }
}

/* Returns 0, -1 when scratch memory could not be had, -2 on bad arguments. */
int ops_encoder_attention(const float *q, const float *k, const float *v, float *out,
                          int batch, int length, const int *lengths, int heads, int kv_heads,
                          int head_dim, float scale, int causal, int threads) {
    if (kv_heads <= 0 || heads % kv_heads || head_dim <= 0 || head_dim > 256) return -2;
    int group = heads / kv_heads, jobs = batch * heads, failed = 0;
    long ldq = (long)heads * head_dim, ldk = (long)kv_heads * head_dim;
    int padded = (length + KEY_TILE - 1) / KEY_TILE * KEY_TILE;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (jobs > 1) \
    reduction(|| : failed)
    for (int job = 0; job < jobs; job++) {
        int b = job / heads, h = job % heads;
        int n = lengths ? lengths[b] : length;
        n = n < 0 ? 0 : n > length ? length : n;
        long first = (long)b * length;
        const float *qb = q + first * ldq + (long)h * head_dim;
        const float *kb = k + first * ldk + (long)(h / group) * head_dim;
        const float *vb = v + first * ldk + (long)(h / group) * head_dim;
        float *ob = out + first * ldq + (long)h * head_dim;
        for (int t = n; t < length; t++) memset(ob + t * ldq, 0, sizeof(float) * head_dim);
        if (n == 0) continue;
        float *kt = attention_scratch((size_t)(head_dim + QUERY_TILE) * padded);
        if (!kt) { failed = 1; continue; }
        float *s = kt + (long)head_dim * padded;
        switch (head_dim) {
        /* 8 queries a tile doubled the speed at head_dim 32 (4 left the FMA
         * units waiting on key loads); at 128 the accumulators would spill */
        case 32: attend_row_head(qb, kb, vb, ob, n, ldq, ldk, scale, causal, kt, s, 32, 8); break;
        case 64: attend_row_head(qb, kb, vb, ob, n, ldq, ldk, scale, causal, kt, s, 64, 8); break;
        case 128: attend_row_head(qb, kb, vb, ob, n, ldq, ldk, scale, causal, kt, s, 128, 4); break;
        default: attend_row_head(qb, kb, vb, ob, n, ldq, ldk, scale, causal, kt, s, head_dim, 4); break;
        }
    }
    return failed ? -1 : 0;
}
