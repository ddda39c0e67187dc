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
#define PAR_ROWS 256 /* element-wise loops use the team from this many rows */

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
#pragma omp parallel for num_threads(threads) if (rows >= PAR_ROWS)
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
