/* y = x @ W.T for a float weight kept as 16-bit integer codes, on CPUs with
 * AVX-512 VNNI: int16 activations times int16 weights (vpdpwssd).
 *
 * cpu_int8_matmul.c multiplies a checkpoint's own 4/8-bit codes. A float
 * checkpoint (an encoder's, say) quantized to 8 bits at load moves its
 * outputs too far for some uses (all-MiniLM-L6-v2: cosine ~0.9998 to float32,
 * bench/RESULTS.md); these codes keep 12 bits a weight and 15 bits an
 * activation, each with a scale per group of G inputs, at the same speed as
 * the 8-bit codes with int16 activations (the codes are loaded as they are
 * instead of widened from bytes in registers):
 *   y[r,n] = sum_g  s[n,g] * dx[r,g] * sum_i q[n,i] * qx[r,i]
 * Symmetric codes (|q| <= 2047, |qx| <= 16383) need no bias term, and a
 * group's integer sum stays below 2^31 for G <= 64. A row's result depends
 * only on that row.
 *
 * Packed layouts (made by engine/platform/weight_codes.py):
 *   codes  [Np/16][K/2][16][2] int16 (16 outputs, 2 consecutive inputs each)
 *   scales [Np/16][K/G][16] float32
 * with Np = N rounded up to 32 (the padding outputs are never stored).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "int16_matmul.h"

#define CODES16_X_TOP 16383.f

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

#define C16_ROWS 4        /* rows of x per register tile */
#define C16_ROW_CHUNK 128 /* rows whose codes stay in L2 while all outputs pass */

/* x [M, K] -> int16 codes qx [Mp, K] and per-group scales dx [Mp, K/G];
 * rows M..Mp-1 are zero. Groups of a multiple of 16 go 16 values at a time
 * (a scalar loop here cost a fifth of a 1536-input matmul). */
static void quantize_rows16(const float *x, long ldx, int M, int Mp, int K, int G, int16_t *qx,
                            float *dx) {
    int groups = K / G;
    const __m512 sign = _mm512_set1_ps(-0.f);
#pragma omp for schedule(static)
    for (int r = 0; r < Mp; r++) {
        for (int g = 0; g < groups; g++) {
            int16_t *q = qx + (long)r * K + (long)g * G;
            float *d = dx + (long)r * groups + g;
            if (r >= M) {
                memset(q, 0, sizeof(int16_t) * G);
                *d = 0.f;
                continue;
            }
            const float *v = x + (long)r * ldx + (long)g * G;
            float amax = 0.f;
            if (G % 16 == 0) {
                __m512 m = _mm512_setzero_ps();
                for (int i = 0; i < G; i += 16)
                    m = _mm512_max_ps(m, _mm512_andnot_ps(sign, _mm512_loadu_ps(v + i)));
                amax = _mm512_reduce_max_ps(m);
            } else {
                for (int i = 0; i < G; i++) amax = fmaxf(amax, fabsf(v[i]));
            }
            float inv = amax > 0.f ? CODES16_X_TOP / amax : 0.f;
            if (G % 16 == 0) {
                __m512 scale = _mm512_set1_ps(inv);
                for (int i = 0; i < G; i += 16) {
                    /* rounds to nearest even, as lrintf does */
                    __m512i codes = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + i), scale));
                    _mm256_storeu_si256((__m256i *)(q + i), _mm512_cvtepi32_epi16(codes));
                }
            } else {
                for (int i = 0; i < G; i++) q[i] = (int16_t)lrintf(v[i] * inv);
            }
            *d = amax / CODES16_X_TOP;
        }
    }
}

/* C16_ROWS rows x 32 outputs (two 16-wide tiles), 2 inputs a lane. */
static inline void tile16(const int16_t *w0, const int16_t *w1, const float *s0,
                          const float *s1, const int16_t *qx, const float *dx, int K, int G,
                          const float *bias, float *y, long ldy, int rows, __mmask16 m0,
                          __mmask16 m1, int accumulate) {
    int groups = K / G, steps = G / 2;
    __m512 f0[C16_ROWS], f1[C16_ROWS];
    for (int r = 0; r < C16_ROWS; r++) { f0[r] = _mm512_setzero_ps(); f1[r] = _mm512_setzero_ps(); }
    const int32_t *xr[C16_ROWS]; /* one 32-bit word holds a lane's two inputs */
    for (int r = 0; r < C16_ROWS; r++) xr[r] = (const int32_t *)(qx + (long)r * K);
    for (int g = 0; g < groups; g++) {
        __m512i a0[C16_ROWS], a1[C16_ROWS];
        for (int r = 0; r < C16_ROWS; r++) { a0[r] = _mm512_setzero_si512(); a1[r] = _mm512_setzero_si512(); }
        const int16_t *p0 = w0 + (long)g * steps * 32, *p1 = w1 + (long)g * steps * 32;
        int word = g * steps;
        for (int kk = 0; kk < steps; kk++) {
            __m512i W0 = _mm512_load_si512((const void *)(p0 + kk * 32));
            __m512i W1 = _mm512_load_si512((const void *)(p1 + kk * 32));
            for (int r = 0; r < C16_ROWS; r++) {
                __m512i X = _mm512_set1_epi32(xr[r][word + kk]);
                a0[r] = _mm512_dpwssd_epi32(a0[r], W0, X);
                a1[r] = _mm512_dpwssd_epi32(a1[r], W1, X);
            }
        }
        __m512 S0 = _mm512_load_ps(s0 + g * 16), S1 = _mm512_load_ps(s1 + g * 16);
        for (int r = 0; r < C16_ROWS; r++) {
            __m512 D = _mm512_set1_ps(dx[(long)r * groups + g]);
            f0[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a0[r]), D), S0, f0[r]);
            f1[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a1[r]), D), S1, f1[r]);
        }
    }
    /* The bias is added here, in registers: a pass of its own over y cost as
     * much as a tenth of the matmul. */
    __m512 B0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
    __m512 B1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
    for (int r = 0; r < rows; r++) {
        f0[r] = _mm512_add_ps(f0[r], B0);
        f1[r] = _mm512_add_ps(f1[r], B1);
        if (accumulate) {
            f0[r] = _mm512_add_ps(f0[r], _mm512_maskz_loadu_ps(m0, y + (long)r * ldy));
            f1[r] = _mm512_add_ps(f1[r], _mm512_maskz_loadu_ps(m1, y + (long)r * ldy + 16));
        }
        _mm512_mask_storeu_ps(y + (long)r * ldy, m0, f0[r]);
        _mm512_mask_storeu_ps(y + (long)r * ldy + 16, m1, f1[r]);
    }
}

static __mmask16 tail_mask16(int n0, int N) {
    int left = N - n0;
    if (left >= 16) return (__mmask16)0xFFFF;
    if (left <= 0) return 0;
    return (__mmask16)((1u << left) - 1u);
}

/* Where outputs [start, start + width) of the weight go: y [M, ldy], from
 * its column 0. */
typedef struct {
    float *y;
    long ldy;
    int start, width;
} C16Part;

/* The weight's N outputs, cut into parts that each start on a multiple of
 * 32 (so a 32-output pair never straddles two), written part by part. */
static int int16_matmul_parts(const float *x, long ldx, int M, int K, const int16_t *codes,
                              const float *scales, const float *bias, int G,
                              const C16Part *parts, int n_parts, int accumulate, int threads) {
    if (G <= 0 || G > 64 || G % 2 || K % G) return -2;
    int N = parts[n_parts - 1].start + parts[n_parts - 1].width;
    int Mp = (M + C16_ROWS - 1) / C16_ROWS * C16_ROWS, groups = K / G, pairs = (N + 31) / 32;
    int16_t *qx = aligned_alloc(64, ((size_t)Mp * K * sizeof(int16_t) + 63) / 64 * 64);
    float *dx = malloc(sizeof(float) * (size_t)Mp * groups);
    if (!qx || !dx) { free(qx); free(dx); return -1; }
    long tile_codes = (long)K * 16, tile_scales = (long)groups * 16;
#pragma omp parallel num_threads(threads)
    {
        quantize_rows16(x, ldx, M, Mp, K, G, qx, dx);
        /* the implicit barrier of the omp for above orders the codes before use */
        for (int c0 = 0; c0 < Mp; c0 += C16_ROW_CHUNK) {
            int c1 = c0 + C16_ROW_CHUNK < Mp ? c0 + C16_ROW_CHUNK : Mp;
#pragma omp for schedule(static) nowait
            for (int p = 0; p < pairs; p++) {
                int t0 = 2 * p, t1 = 2 * p + 1, col = 32 * p;
                const C16Part *part = parts;
                while (part + 1 < parts + n_parts && col >= part[1].start) part++;
                int local = col - part->start;
                __mmask16 m0 = tail_mask16(local, part->width);
                __mmask16 m1 = tail_mask16(local + 16, part->width);
                for (int r = c0; r < c1; r += C16_ROWS) {
                    int rows = M - r < C16_ROWS ? M - r : C16_ROWS;
                    if (rows <= 0) break;
                    tile16(codes + t0 * tile_codes, codes + t1 * tile_codes,
                           scales + t0 * tile_scales, scales + t1 * tile_scales,
                           qx + (long)r * K, dx + (long)r * groups, K, G,
                           bias ? bias + col : NULL, part->y + (long)r * part->ldy + local,
                           part->ldy, rows, m0, m1, accumulate);
                }
            }
        }
    }
    free(qx); free(dx);
    return 0;
}

/* y = x @ W.T (+ bias [N] if not NULL), or y += that with `accumulate`.
 * Returns 0 on success, -1 if scratch memory could not be had, -2 for a group
 * size over 64 or odd. */
int int16_matmul(const float *x, long ldx, int M, int K, const int16_t *codes,
                 const float *scales, const float *bias, int N, int G, float *y, long ldy,
                 int accumulate, int threads) {
    C16Part all = {y, ldy, 0, N};
    return int16_matmul_parts(x, ldx, M, K, codes, scales, bias, G, &all, 1, accumulate,
                              threads);
}

/* A fused weight's outputs straight into one array per part (q, k, v):
 * outs[i] [M, widths[i]], every width but the last a multiple of 32. The
 * activations are quantized once, and nothing is copied after. */
int int16_matmul_split(const float *x, int M, int K, const int16_t *codes, const float *scales,
                       const float *bias, int G, float **outs, const int *widths, int n_parts,
                       int threads) {
    C16Part parts[8];
    if (n_parts < 1 || n_parts > 8) return -2;
    for (int i = 0, start = 0; i < n_parts; start += widths[i], i++) {
        if (i < n_parts - 1 && widths[i] % 32) return -2;
        parts[i] = (C16Part){outs[i], widths[i], start, widths[i]};
    }
    return int16_matmul_parts(x, K, M, K, codes, scales, bias, G, parts, n_parts, 0, threads);
}

#else

int int16_matmul(const float *x, long ldx, int M, int K, const int16_t *codes,
                 const float *scales, const float *bias, int N, int G, float *y, long ldy,
                 int accumulate, int threads) {
    (void)x; (void)ldx; (void)M; (void)K; (void)codes; (void)scales; (void)bias; (void)N;
    (void)G;
    (void)y; (void)ldy; (void)accumulate; (void)threads;
    return -2;
}

int int16_matmul_split(const float *x, int M, int K, const int16_t *codes, const float *scales,
                       const float *bias, int G, float **outs, const int *widths, int n_parts,
                       int threads) {
    (void)x; (void)M; (void)K; (void)codes; (void)scales; (void)bias; (void)G; (void)outs;
    (void)widths; (void)n_parts; (void)threads;
    return -2;
}

#endif
