/* The 16-bit-code matmul of cpu_int16_matmul.c, for other kernels of the library. */
#ifndef CONVEYOR_INT16_MATMUL_H
#define CONVEYOR_INT16_MATMUL_H

#include <stdint.h>

/* y = x @ W.T (+ bias) (y += with `accumulate`) for 16-bit codes; -2 where this
 * build has no AVX-512 VNNI kernel. See cpu_int16_matmul.c. */
int int16_matmul(const float *x, long ldx, int M, int K, const int16_t *codes,
                 const float *scales, const float *bias, int N, int G, float *y, long ldy,
                 int accumulate, int threads);

/* A fused weight's outputs straight into one array per part (q, k, v). */
int int16_matmul_split(const float *x, int M, int K, const int16_t *codes, const float *scales,
                       const float *bias, int G, float **outs, const int *widths, int n_parts,
                       int threads);

#endif
