"""RoPE inside the CUDA attention kernels (cuda.py's scalar kernel and
cuda_tensor_core.py's store and attention launches): one device helper that
rotates the dims of a head a lane holds, with the step's cos/sin rows
[N, D/2] (float32, magnitude folded in, `RoPE.cos_sin`) for its packed token.

Non-traditional RoPE pairs dim j with j + D/2, held by the lane `partner`
lanes away (a shuffle within `mask`, which every lane of it must reach);
traditional RoPE pairs 2p with 2p + 1, both in one lane (P even, dim0 even).
"""

HEADER = """
template <int P, int TRAD, int D>
__device__ inline void rotate_span(float (&x)[P], const float* cos_rows, const float* sin_rows,
                                   int row, int dim0, int partner, unsigned mask) {
    // x holds dims [dim0, dim0 + P) of one head of packed token `row`.
    const float* c = cos_rows + (size_t)row * (D / 2);
    const float* s = sin_rows + (size_t)row * (D / 2);
    if (TRAD) {
        for (int e = 0; e + 1 < P; e += 2) {
            const int p = (dim0 + e) / 2;
            const float a = x[e], b = x[e + 1];
            x[e] = a * c[p] - b * s[p];
            x[e + 1] = b * c[p] + a * s[p];
        }
    } else {
        const bool low = dim0 < D / 2;
        const int first = dim0 % (D / 2);  // P divides D/2: a lane's dims share a half
        for (int e = 0; e < P; ++e) {
            const float other = __shfl_xor_sync(mask, x[e], partner);
            const int p = first + e;
            x[e] = low ? x[e] * c[p] - other * s[p] : x[e] * c[p] + other * s[p];
        }
    }
}
"""
