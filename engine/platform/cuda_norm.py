"""The residual add and the RMSNorm after it as one CUDA kernel.

A decoder layer adds attention's output to its input and normalises the sum
for the MLP: MLX launches the add and mx.fast.rms_norm apart, and on CUDA each
launch costs the host ~10-20 us (MLX encodes op by op). One thread block a
row computes h = x + delta (rounded to the activation dtype, as MLX's add
leaves it), writes it, and normalises it from registers it already holds.
`verify` compares it with MLX's add + rms_norm before a platform binds it.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np

from engine.platform.kernel_constants import float_bits

THREADS = 256
PER_THREAD = 32  # rows up to THREADS * PER_THREAD wide (8192) stay in registers

# A thread moves VEC consecutive elements a load (16 bytes in half precision,
# where the width allows): element-wise loads left the kernel at 12.6 us a
# call for 256 rows of 4,096 on an H200 (0.84 ms of an 8B decode step, 10.8
# ms of a 8,192-token prompt step: bench/results/h200_s10_trace.log), several
# times what its bytes take.
_SOURCE = """
    constexpr int NV = D / VEC;                 // vector loads a row
    constexpr int PER = (NV + NT - 1) / NT;     // ... a thread
    struct alignas(sizeof(T) * VEC) Pack { T e[VEC]; };
    const int row = blockIdx.x;
    const int tid = threadIdx.x;
    const Pack* xr = reinterpret_cast<const Pack*>(x + (size_t)row * D);
    const Pack* dr = reinterpret_cast<const Pack*>(delta + (size_t)row * D);
    Pack* hr = reinterpret_cast<Pack*>(h_out + (size_t)row * D);
    Pack* yr = reinterpret_cast<Pack*>(y_out + (size_t)row * D);
    const Pack* wr = reinterpret_cast<const Pack*>(weight);
    float hv[PER][VEC];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int j = tid + k * NT;
        if (j < NV) {
            const Pack a = xr[j], b = dr[j];
            Pack h;
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                h.e[e] = static_cast<T>(static_cast<float>(a.e[e]) + static_cast<float>(b.e[e]));
                hv[k][e] = static_cast<float>(h.e[e]);
                ss += hv[k][e] * hv[k][e];
            }
            hr[j] = h;
        }
    }
    __shared__ float partial[NT / 32];
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, off);
    if (tid % 32 == 0) partial[tid / 32] = ss;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < NT / 32; ++w) total += partial[w];
    const float r = rsqrtf(total / D + __int_as_float(EPS_BITS));
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int j = tid + k * NT;
        if (j < NV) {
            const Pack w = wr[j];
            Pack y;
#pragma unroll
            for (int e = 0; e < VEC; ++e)
                y.e[e] = static_cast<T>(hv[k][e] * r * static_cast<float>(w.e[e]));
            yr[j] = y;
        }
    }
"""

_kernel = None


def _get_kernel():
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(
            name="conveyor_add_rms_norm", input_names=["x", "delta", "weight"],
            output_names=["h_out", "y_out"], source=_SOURCE)
    return _kernel


def add_rms_norm(x: mx.array, delta: mx.array, weight: mx.array, eps: float,
                 ) -> tuple[mx.array, mx.array]:
    """(x + delta, rms_norm(x + delta) * weight) for x, delta [..., D]."""
    dim = x.shape[-1]
    rows = x.size // dim
    h, y = _get_kernel()(
        # eps compiled in (engine/platform/kernel_constants.py says why).
        inputs=[x, delta.astype(x.dtype), weight.astype(x.dtype)],
        template=[("T", x.dtype), ("D", dim), ("NT", THREADS), ("VEC", vector_width(dim)),
                  ("EPS_BITS", float_bits(eps))],
        grid=(rows * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[x.shape, x.shape], output_dtypes=[x.dtype, x.dtype])
    return h, y


def bind(model) -> int:
    """Give every RMSNorm of `model` whose width and dtype the kernel serves
    (verified) the fused add; returns how many were bound."""
    from models.layers.norm import RMSNorm

    bound = 0
    for _, norm in model.named_modules():
        if isinstance(norm, RMSNorm) and available(norm.weight.shape[0], norm.weight.dtype):
            norm.fused_add = add_rms_norm
            bound += 1
    return bound


def vector_width(dim: int) -> int:
    """Elements a thread loads at once: 8 where every row starts 16-byte
    aligned in half precision (MLX's buffers are), else one."""
    return 8 if dim % 8 == 0 else 1


def supported(dim: int) -> bool:
    return 0 < dim <= THREADS * PER_THREAD


_verified: dict[tuple, bool] = {}


def available(dim: int, dtype: mx.Dtype) -> bool:
    """True once the kernel has matched MLX's add + rms_norm at this width
    and dtype on this device (checked once each)."""
    key = (dim, dtype)
    if key not in _verified:
        _verified[key] = supported(dim) and verify(dim, dtype)
    return _verified[key]


def verify(dim: int, dtype: mx.Dtype) -> bool:
    # numpy's generator, not MLX's: seeding MLX here would reset the user's draws.
    rng = np.random.default_rng(0)
    try:
        x = mx.array(rng.normal(size=(5, dim)), dtype=dtype)
        delta = mx.array(rng.normal(size=(5, dim)), dtype=dtype)
        weight = mx.array(1 + 0.1 * rng.normal(size=dim), dtype=dtype)
        h, y = add_rms_norm(x, delta, weight, 1e-5)
        want_h = x + delta
        want_y = mx.fast.rms_norm(want_h, weight, 1e-5)
        same_h = mx.array_equal(h, want_h).item()
        # Relative to each value: normalised rows reach |y| ~ 4-5, where one
        # unit in bfloat16's last place is 0.03, so an absolute bound refused
        # a correct kernel at some widths (3,072 at bfloat16: Phi-3's).
        want = want_y.astype(mx.float32)
        err = (mx.abs(y.astype(mx.float32) - want) / (1 + mx.abs(want))).max().item()
        return bool(same_h) and err < 1e-2
    except Exception as exc:  # a compile or launch failure: keep MLX's two ops
        print(f"conveyor: CUDA add+RMSNorm kernel unavailable ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return False
