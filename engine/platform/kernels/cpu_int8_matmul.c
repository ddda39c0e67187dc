/* y = x @ W.T for a group-quantized W (4- or 8-bit codes, a scale and a bias
 * per group of G inputs), on CPUs with AVX-512 VNNI.
 *
 * Each row of x is quantized per group to int8 with its own scale (as
 * llama.cpp does for its Q8 activations), so one VNNI instruction multiplies
 * 16 outputs by 4 inputs in integers; per group the integer sums become
 * floats once:
 *   y[r,n] = sum_g  s[n,g] * dx[r,g] * sum_i q[n,i] * qx[r,i]
 *                 + b[n,g] * (sum_i x[r,i])
 * The bias term uses the exact float sum of x. A row's result depends only on
 * that row, never on the other rows of the batch.
 *
 * The "wide" variant quantizes activations to int16 instead (2^-15 of a
 * group's largest value instead of 2^-7: the default model's logits stay
 * within ~0.14 of the float32 path's, against ~5 for int8) and multiplies
 * pairs with vpdpwssd, half the rate of int8.
 *
 * Packed layouts (made by engine/platform/int8_matmul.py):
 *   codes  [Np/16][K/L][16][L] uint8  (16 outputs, L consecutive inputs each;
 *          L = 4 for int8 activations, 2 for wide)
 *   scales [Np/16][K/G][16] float32, biases the same
 * with Np = N rounded up to 32 (the padding outputs are never stored).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "int8_matmul.h"

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_VNNI 1
#else
#define HAVE_VNNI 0
#endif

int int8_matmul_supported(void) { return HAVE_VNNI; }

#if HAVE_VNNI

#define ROWS 4       /* rows of x per register tile */
#define ROW_CHUNK 128 /* rows whose int8 codes stay in L2 while all outputs pass */

/* x [M, K] -> codes qx [Mp, K] (int8, or int16 when wide), per-group scales
 * dx and sums xs [Mp, K/G]. Rows M..Mp-1 are zero. */
static void quantize_rows(const float *x, long ldx, int M, int Mp, int K, int G, int wide,
                          void *qx, float *dx, float *xs) {
    int groups = K / G;
    float top = wide ? 32767.f : 127.f;
#pragma omp for schedule(static)
    for (int r = 0; r < Mp; r++) {
        for (int g = 0; g < groups; g++) {
            long at = (long)r * K + (long)g * G;
            int8_t *q8 = (int8_t *)qx + at;
            int16_t *q16 = (int16_t *)qx + at;
            float *d = dx + (long)r * groups + g, *s = xs + (long)r * groups + g;
            if (r >= M) {
                memset(wide ? (void *)q16 : (void *)q8, 0, (size_t)G * (wide ? 2 : 1));
                *d = 0.f; *s = 0.f;
                continue;
            }
            const float *v = x + (long)r * ldx + (long)g * G;
            float amax = 0.f, sum = 0.f;
            for (int i = 0; i < G; i++) { amax = fmaxf(amax, fabsf(v[i])); sum += v[i]; }
            float inv = amax > 0.f ? top / amax : 0.f;
            if (wide)
                for (int i = 0; i < G; i++) q16[i] = (int16_t)lrintf(v[i] * inv);
            else
                for (int i = 0; i < G; i++) q8[i] = (int8_t)lrintf(v[i] * inv);
            *d = amax / top;
            *s = sum;
        }
    }
}

/* ROWS rows x 32 outputs (two 16-wide tiles). int8 activations: 4 inputs a
 * lane with vpdpbusd. Wide (int16) activations: codes widened to 16 bits in
 * registers, 2 inputs a lane with vpdpwssd. `wide` is a constant at each call
 * site, so the compiler emits two loops. */
static inline void tile(const uint8_t *w0, const uint8_t *w1, const float *s0, const float *s1,
                        const float *b0, const float *b1, const void *qx, const float *dx,
                        const float *xs, int K, int G, float *y, long ldy, int rows,
                        __mmask16 m0, __mmask16 m1, int accumulate, const int wide,
                        const int R) {
    int groups = K / G, lanes = wide ? 2 : 4, steps = G / lanes, bytes = 16 * lanes;
    __m512 f0[ROWS], f1[ROWS];
    for (int r = 0; r < R; r++) { f0[r] = _mm512_setzero_ps(); f1[r] = _mm512_setzero_ps(); }
    const int32_t *xr[ROWS];  /* one 32-bit word holds a lane's inputs */
    for (int r = 0; r < R; r++)
        xr[r] = (const int32_t *)((const char *)qx + (long)r * K * (wide ? 2 : 1));
    for (int g = 0; g < groups; g++) {
        __m512i a0[ROWS], a1[ROWS];
        for (int r = 0; r < R; r++) { a0[r] = _mm512_setzero_si512(); a1[r] = _mm512_setzero_si512(); }
        const uint8_t *p0 = w0 + (long)g * steps * bytes, *p1 = w1 + (long)g * steps * bytes;
        int word = g * steps;
        for (int kk = 0; kk < steps; kk++) {
            __m512i W0, W1;
            if (wide) {
                W0 = _mm512_cvtepu8_epi16(_mm256_load_si256((const __m256i *)(p0 + kk * 32)));
                W1 = _mm512_cvtepu8_epi16(_mm256_load_si256((const __m256i *)(p1 + kk * 32)));
            } else {
                W0 = _mm512_load_si512((const void *)(p0 + kk * 64));
                W1 = _mm512_load_si512((const void *)(p1 + kk * 64));
            }
            for (int r = 0; r < R; r++) {
                __m512i X = _mm512_set1_epi32(xr[r][word + kk]);
                if (wide) {
                    a0[r] = _mm512_dpwssd_epi32(a0[r], W0, X);
                    a1[r] = _mm512_dpwssd_epi32(a1[r], W1, X);
                } else {
                    a0[r] = _mm512_dpbusd_epi32(a0[r], W0, X);
                    a1[r] = _mm512_dpbusd_epi32(a1[r], W1, X);
                }
            }
        }
        __m512 S0 = _mm512_load_ps(s0 + g * 16), S1 = _mm512_load_ps(s1 + g * 16);
        __m512 B0 = _mm512_load_ps(b0 + g * 16), B1 = _mm512_load_ps(b1 + g * 16);
        for (int r = 0; r < R; r++) {
            __m512 D = _mm512_set1_ps(dx[(long)r * groups + g]);
            __m512 XS = _mm512_set1_ps(xs[(long)r * groups + g]);
            f0[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a0[r]), D), S0, f0[r]);
            f1[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a1[r]), D), S1, f1[r]);
            f0[r] = _mm512_fmadd_ps(B0, XS, f0[r]);
            f1[r] = _mm512_fmadd_ps(B1, XS, f1[r]);
        }
    }
    for (int r = 0; r < rows; r++) {
        if (accumulate) {
            f0[r] = _mm512_add_ps(f0[r], _mm512_maskz_loadu_ps(m0, y + (long)r * ldy));
            f1[r] = _mm512_add_ps(f1[r], _mm512_maskz_loadu_ps(m1, y + (long)r * ldy + 16));
        }
        _mm512_mask_storeu_ps(y + (long)r * ldy, m0, f0[r]);
        _mm512_mask_storeu_ps(y + (long)r * ldy + 16, m1, f1[r]);
    }
}

static __mmask16 tail_mask(int n0, int N) {
    int left = N - n0;
    if (left >= 16) return (__mmask16)0xFFFF;
    if (left <= 0) return 0;
    return (__mmask16)((1u << left) - 1u);
}

/* y = x @ W.T, or y += x @ W.T with `accumulate`.
 * Returns 0 on success, -1 if scratch memory could not be had. */
int int8_matmul(const float *x, long ldx, int M, int K, const uint8_t *codes,
                const float *scales, const float *biases, int N, int G, float *y, long ldy,
                int accumulate, int wide, int threads) {
    int Mp = (M + ROWS - 1) / ROWS * ROWS, groups = K / G, pairs = (N + 31) / 32;
    size_t width = wide ? 2 : 1;
    void *qx = aligned_alloc(64, ((size_t)Mp * K * width + 63) / 64 * 64);
    float *dx = malloc(sizeof(float) * (size_t)Mp * groups);
    float *xs = malloc(sizeof(float) * (size_t)Mp * groups);
    if (!qx || !dx || !xs) { free(qx); free(dx); free(xs); return -1; }
    long tile_codes = (long)K * 16, tile_scales = (long)groups * 16;
#pragma omp parallel num_threads(threads)
    {
        quantize_rows(x, ldx, M, Mp, K, G, wide, qx, dx, xs);
        /* the implicit barrier of the omp for above orders the codes before use */
        for (int c0 = 0; c0 < Mp; c0 += ROW_CHUNK) {
            int c1 = c0 + ROW_CHUNK < Mp ? c0 + ROW_CHUNK : Mp;
#pragma omp for schedule(static) nowait
            for (int p = 0; p < pairs; p++) {
                int t0 = 2 * p, t1 = 2 * p + 1;
                __mmask16 m0 = tail_mask(t0 * 16, N), m1 = tail_mask(t1 * 16, N);
                for (int r = c0; r < c1; r += ROWS) {
                    int rows = M - r < ROWS ? M - r : ROWS;
                    if (rows <= 0) break;
                    const uint8_t *c0w = codes + t0 * tile_codes, *c1w = codes + t1 * tile_codes;
                    const float *s0 = scales + t0 * tile_scales, *s1 = scales + t1 * tile_scales;
                    const float *b0 = biases + t0 * tile_scales, *b1 = biases + t1 * tile_scales;
                    float *yr = y + (long)r * ldy + t0 * 16;
                    long g0 = (long)r * groups;
                    const char *xq = (const char *)qx + (long)r * K * width;
                    /* Constant `wide` and row counts let the compiler emit one loop
                     * each; a one-row step (single stream) then does no work for
                     * the padding rows (ROWS-1 of every ROWS multiply-adds). */
#define TILE(W, R) tile(c0w, c1w, s0, s1, b0, b1, xq, dx + g0, xs + g0, K, G, yr, ldy, \
                        rows, m0, m1, accumulate, W, R)
                    if (wide) {
                        if (rows == 1) TILE(1, 1); else TILE(1, ROWS);
                    } else {
                        if (rows == 1) TILE(0, 1); else TILE(0, ROWS);
                    }
#undef TILE
                }
            }
        }
    }
    free(qx); free(dx); free(xs);
    return 0;
}

#else

int int8_matmul(const float *x, long ldx, int M, int K, const uint8_t *codes,
                const float *scales, const float *biases, int N, int G, float *y, long ldy,
                int accumulate, int wide, int threads) {
    (void)accumulate; (void)wide; (void)x; (void)ldx; (void)M; (void)K; (void)codes; (void)scales; (void)biases;
    (void)N; (void)G; (void)y; (void)ldy; (void)threads;
    return -2;
}

#endif
