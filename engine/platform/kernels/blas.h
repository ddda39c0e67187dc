/* cblas_sgemm of the BLAS the engine loaded (engine/platform/blas.py).
 *
 * The kernels are built at install, when the BLAS a process will load is not
 * known (MKL, OpenBLAS, or one named by CONVEYOR_BLAS). So nothing links
 * against one: at load, engine/platform/native.py hands the address of the
 * loaded BLAS's cblas_sgemm to conveyor_set_sgemm, and C code calls it
 * through conveyor_sgemm (NULL until then: check conveyor_sgemm_ready()).
 */
#ifndef CONVEYOR_BLAS_H
#define CONVEYOR_BLAS_H

enum { CblasRowMajor = 101, CblasNoTrans = 111, CblasTrans = 112 };

typedef void (*conveyor_sgemm_fn)(int order, int transa, int transb, int m, int n, int k,
                                  float alpha, const float *a, int lda, const float *b,
                                  int ldb, float beta, float *c, int ldc);

extern conveyor_sgemm_fn conveyor_sgemm;

/* fn: a cblas_sgemm, or NULL to forget it. */
void conveyor_set_sgemm(void *fn);

static inline int conveyor_sgemm_ready(void) { return conveyor_sgemm != 0; }

#endif
