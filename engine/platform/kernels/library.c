/* What a build of the kernel library says about itself: which variant it is
 * (engine/platform/kernel_variants.py) and a digest of the sources it was
 * built from, so the loader can refuse a build older than its sources. */
#ifndef CONVEYOR_KERNELS_DIGEST
#error "built by setup.py, which defines CONVEYOR_KERNELS_DIGEST and CONVEYOR_KERNELS_VARIANT"
#endif

const char *conveyor_kernels_digest(void) { return CONVEYOR_KERNELS_DIGEST; }

const char *conveyor_kernels_variant(void) { return CONVEYOR_KERNELS_VARIANT; }

#include <omp.h>

/* The omp_get_max_threads this library's OpenMP calls reach: which runtime
 * serves them (engine/platform/blas.py has them share MKL's). */
void *conveyor_openmp_function(void) { return (void *)&omp_get_max_threads; }
