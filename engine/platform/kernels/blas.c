/* The one cblas_sgemm pointer every kernel of the library shares (blas.h). */
#include "blas.h"

conveyor_sgemm_fn conveyor_sgemm = 0;

void conveyor_set_sgemm(void *fn) { conveyor_sgemm = (conveyor_sgemm_fn)fn; }
