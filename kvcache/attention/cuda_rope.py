"""RoPE inside the CUDA attention kernels (cuda.py's scalar kernel and
cuda_tensor_core.py's store and attention launches): device helpers that
rotate the dims of a head a lane holds, with the step's cos/sin rows
[N, D/2] (float32, magnitude folded in, `RoPE.cos_sin`) for its packed token.

`rotate_span` takes a contiguous span of dims: non-traditional RoPE pairs
dim j with j + D/2, held by the lane `partner` lanes away (a shuffle within
`mask`, which every lane of it must reach); traditional RoPE pairs 2p with
2p + 1, both in one lane (P even, dim0 even). `rotate_chunks` takes the
tensor-core layout's 16-byte chunks, where both dims of every pair are in
the lane. Both rotate a pair with `rope_pair`.
"""

HEADER = """
// One RoPE pair (a, b) rotated by the angle whose cos/sin are c, s.
__device__ inline void rope_pair(float& a, float& b, float c, float s) {
    const float a0 = a, b0 = b;
    a = a0 * c - b0 * s;
    b = b0 * c + a0 * s;
}

template <int P, int TRAD, int D>
__device__ inline void rotate_span(float (&x)[P], const float* cos_rows, const float* sin_rows,
                                   int row, int dim0, int partner, unsigned mask) {
    // x holds dims [dim0, dim0 + P) of one head of packed token `row`.
    const float* c = cos_rows + (size_t)row * (D / 2);
    const float* s = sin_rows + (size_t)row * (D / 2);
    if (TRAD) {
        for (int e = 0; e + 1 < P; e += 2) {
            const int p = (dim0 + e) / 2;
            rope_pair(x[e], x[e + 1], c[p], s[p]);
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

// RoPE on the chunks of a head a lane holds for the score product: chunk
// 4v + t (8 dims each) as x[8v .. 8v + 7], t = lane % 4. Both dims of every
// pair are in the lane (j and j + D/2 are chunks v and v + KV/2; 2p and
// 2p + 1 share a chunk), so no shuffle; cos/sin [N, D/2] rows are read as float4.
template <int KV, int TRAD, int D>
__device__ inline void rotate_chunks(float (&x)[KV * 8], const float* cos_rows,
                                     const float* sin_rows, int row, int t) {
    const float4* c4 = reinterpret_cast<const float4*>(cos_rows + (size_t)row * (D / 2));
    const float4* s4 = reinterpret_cast<const float4*>(sin_rows + (size_t)row * (D / 2));
    if (TRAD) {
#pragma unroll
        for (int v = 0; v < KV; ++v) {  // pairs p = chunk * 4 + 0..3
            const float4 c = c4[4 * v + t], s = s4[4 * v + t];
            const float cc[4] = {c.x, c.y, c.z, c.w}, ss[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
            for (int k = 0; k < 4; ++k)
                rope_pair(x[8 * v + 2 * k], x[8 * v + 2 * k + 1], cc[k], ss[k]);
        }
    } else {
#pragma unroll
        for (int v = 0; v < KV / 2; ++v) {  // low-half chunk 4v + t: cos/sin index = its dims
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float4 c = c4[2 * (4 * v + t) + h], s = s4[2 * (4 * v + t) + h];
                const float cc[4] = {c.x, c.y, c.z, c.w}, ss[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const int e = 8 * v + 4 * h + k;
                    rope_pair(x[e], x[e + KV * 4], cc[k], ss[k]);
                }
            }
        }
    }
}
"""
