/* A llama decoder layer on host memory, in two halves around attention.
 *
 * MLX's CPU backend runs each element-wise op single-threaded and hands every
 * evaluation to its stream thread: with the matmuls and attention already in
 * C, the RMSNorms, RoPE, SiLU and residual adds around them cost a third of a
 * 64-row decode step (~1.7 ms a layer), mostly in dispatch and hand-offs.
 * Here they are plain loops between BLAS (or int8) matmuls, all on the
 * calling thread's OpenMP team, with no synchronisation in between.
 *
 *   layer_in:  xn = rmsnorm(h) * w_in;  q, k, v = xn @ Wq.T, Wk.T, Wv.T;  RoPE(q, k)
 *              (one call for q, k, v when their packed weights are fused)
 *   (the caller attends: q, k, v -> attn)
 *   layer_out: h += attn @ Wo.T;  xn = rmsnorm(h) * w_post;
 *              h += (silu(xn @ Wg.T) * (xn @ Wu.T)) @ Wd.T
 *
 * Activations are row-major float32 [tokens, features]. A matmul is either
 * float32 weights [out, in] through the loaded BLAS's cblas_sgemm (blas.h) or
 * a packed group-quantized weight through the int8 kernel (cpu_int8_matmul.c).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "int8_matmul.h"

typedef struct {
    const float *weight;   /* float32 [out, in], or NULL for a packed weight */
    const uint8_t *codes;  /* packed int8 layout (see cpu_int8_matmul.c) */
    const float *scales;
    const float *biases;
    const float *bias;     /* optional [out] */
    int out_dim, in_dim, group_size;
    int wide;              /* packed weight with int16 activations */
} Matmul;

/* Up to this many rows, BLAS computes y.T = W @ x.T and we transpose: MKL
 * then streams W as it lies instead of repacking it (measured 1.1-7x faster
 * at 64 rows for the default model's shapes; ~10% slower at 2048 rows). */
#define FEW_ROWS 512

/* A buffer of at least n floats, kept and grown across calls. The slots are
 * per calling thread: engines may step in several threads. */
enum { SLOT_TRANSPOSE, SLOT_QKV, SLOTS };

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

static float *scratch(size_t n) { return scratch_slot(SLOT_TRANSPOSE, n); }

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

static int matmul(const Matmul *m, const float *x, int rows, float *y, int accumulate,
                  int threads) {
    if (m->weight && !conveyor_sgemm_ready()) return -3;
    if (m->weight && rows <= FEW_ROWS) {
        float *t = scratch((size_t)rows * m->out_dim);
        if (!t) return -1;
        conveyor_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m->out_dim, rows, m->in_dim,
                       1.f, m->weight, m->in_dim, x, m->in_dim, 0.f, t, rows);
        transpose_into(t, rows, m->out_dim, y, accumulate);
    } else if (m->weight) {
        conveyor_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, m->out_dim, m->in_dim,
                       1.f, x, m->in_dim, m->weight, m->in_dim, accumulate ? 1.f : 0.f, y,
                       m->out_dim);
    } else {
        int rc = int8_matmul(x, m->in_dim, rows, m->in_dim, m->codes, m->scales, m->biases,
                             m->out_dim, m->group_size, y, m->out_dim, accumulate, m->wide,
                             threads);
        if (rc) return rc;
    }
    if (m->bias) {
#pragma omp parallel for num_threads(threads) if (rows >= 256)
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < m->out_dim; j++) y[(long)r * m->out_dim + j] += m->bias[j];
    }
    return 0;
}

static void rms_norm(const float *h, int rows, int dim, const float *w, float eps, float *out,
                     int threads) {
#pragma omp parallel for num_threads(threads) if (rows >= 256)
    for (int r = 0; r < rows; r++) {
        const float *x = h + (long)r * dim;
        float *o = out + (long)r * dim;
        float ss = 0.f;
        for (int i = 0; i < dim; i++) ss += x[i] * x[i];
        float inv = 1.f / sqrtf(ss / dim + eps);
        for (int i = 0; i < dim; i++) o[i] = x[i] * inv * w[i];
    }
}

/* Rotate each head of x [rows, heads, head_dim] by its token's angles:
 * cos/sin [rows, head_dim/2]. Halves (rotate-half) or interleaved pairs. */
static void rope(float *x, int rows, int heads, int head_dim, const float *cos_t,
                 const float *sin_t, int traditional, int threads) {
    int half = head_dim / 2;
#pragma omp parallel for num_threads(threads) if (rows >= 256)
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

/* SiLU(g) * u, in place into g. Vectorised by gcc (libmvec's expf); the
 * clamp keeps expf finite, which -ffast-math lets the compiler assume. */
static void silu_mul(float *g, const float *u, long n, int threads) {
#pragma omp parallel for num_threads(threads) if (n >= (1 << 18))
    for (long i = 0; i < n; i++) g[i] = g[i] / (1.f + expf(fminf(-g[i], 80.f))) * u[i];
}

/* q, k, v from one fused weight [Nq + Nk + Nv, dim]: one kernel call instead
 * of three (the 192-wide k and v alone kept the two cores half idle). */
static int fused_qkv(const Matmul *wqkv, const float *xn, int rows, float *q, int nq,
                     float *k, float *v, int nkv, int threads) {
    int width = wqkv->out_dim;
    float *t = scratch_slot(SLOT_QKV, (size_t)rows * width);
    if (!t) return -1;
    int rc = matmul(wqkv, xn, rows, t, 0, threads);
    if (rc) return rc;
    for (int r = 0; r < rows; r++) {
        const float *row = t + (long)r * width;
        memcpy(q + (long)r * nq, row, sizeof(float) * nq);
        memcpy(k + (long)r * nkv, row + nq, sizeof(float) * nkv);
        memcpy(v + (long)r * nkv, row + nq + nkv, sizeof(float) * nkv);
    }
    return 0;
}

/* wqkv: the fused q/k/v weight, or NULL to use wq, wk, wv. */
int layer_in(const float *h, int rows, int dim, const float *norm_w, float eps,
             const Matmul *wqkv, const Matmul *wq, const Matmul *wk, const Matmul *wv,
             const float *cos_t, const float *sin_t, int heads, int kv_heads, int head_dim,
             int traditional, float *xn, float *q, float *k, float *v, int threads) {
    rms_norm(h, rows, dim, norm_w, eps, xn, threads);
    int rc;
    if (wqkv) {
        rc = fused_qkv(wqkv, xn, rows, q, heads * head_dim, k, v, kv_heads * head_dim, threads);
    } else {
        rc = matmul(wq, xn, rows, q, 0, threads);
        if (!rc) rc = matmul(wk, xn, rows, k, 0, threads);
        if (!rc) rc = matmul(wv, xn, rows, v, 0, threads);
    }
    if (rc) return rc;
    rope(q, rows, heads, head_dim, cos_t, sin_t, traditional, threads);
    rope(k, rows, kv_heads, head_dim, cos_t, sin_t, traditional, threads);
    return 0;
}

int layer_out(const float *attn, float *h, int rows, int dim, const Matmul *wo,
              const float *norm_w, float eps, const Matmul *wg, const Matmul *wu,
              const Matmul *wd, float *xn, float *g, float *u, int threads) {
    int rc = matmul(wo, attn, rows, h, 1, threads);
    if (rc) return rc;
    rms_norm(h, rows, dim, norm_w, eps, xn, threads);
    rc = matmul(wg, xn, rows, g, 0, threads);
    if (!rc) rc = matmul(wu, xn, rows, u, 0, threads);
    if (rc) return rc;
    silu_mul(g, u, (long)rows * wg->out_dim, threads);
    return matmul(wd, g, rows, h, 1, threads);
}

/* Logits of the rows that need them: rmsnorm(h[index]) @ head.T -> logits [n, vocab];
 * xn [n, dim] is scratch. */
int lm_head(const float *h, int dim, const int32_t *index, int n, const float *norm_w,
            float eps, const Matmul *head, float *xn, float *logits, int threads) {
    for (int i = 0; i < n; i++)
        rms_norm(h + (long)index[i] * dim, 1, dim, norm_w, eps, xn + (long)i * dim, 1);
    return matmul(head, xn, n, logits, 0, threads);
}
