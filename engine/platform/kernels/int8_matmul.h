/* The integer matmul of cpu_int8_matmul.c, for other kernels of the library. */
#ifndef CONVEYOR_INT8_MATMUL_H
#define CONVEYOR_INT8_MATMUL_H

#include <stdint.h>

/* 1 where this build has the AVX-512 VNNI kernel; int8_matmul returns -2 where not. */
int int8_matmul_supported(void);

/* y = x @ W.T (y += with `accumulate`) for a packed W; see cpu_int8_matmul.c. */
int int8_matmul(const float *x, long ldx, int M, int K, const uint8_t *codes,
                const float *scales, const float *biases, int N, int G, float *y, long ldy,
                int accumulate, int wide, int threads);

#endif
