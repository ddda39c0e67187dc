"""The CUDA attention backend: kernels (mx.fast.cuda_kernel) store every
packed token's K/V into the pools in place and attend over its blocks in
place, for decode rows, prompt chunks and mixed steps alike. Half-precision
pools at head_dim 64/128 take the tensor-core form (cuda_tensor_core.py: a
store launch, then attention on the matrix units); other shapes take the
scalar kernel below.

The portable path scatters new K/V into the pools with MLX, which on CUDA
copies the whole pool on every write (0.25 ms into 0.25 GiB, 0.79 ms into
1 GiB on an H100), and gathers each context into a new array before SDPA
(on an H100 that gather cost ~4x the attention itself). Here one thread
block serves one (packed token, KV head): its WARPS warps split into sub-warps of
a few lanes per key (8 elements a lane, so a score takes log2(lanes)
shuffles), each walking runs of UNROLL keys of the token's block table (all
their loads issued before any is used) with an online softmax for the query
heads of the group; the partial results are merged through shared memory at
the end (the scalar form). Keys of the token's own chunk come from this step's k/v (rotated
here when the kernel applies RoPE), older ones from the pools; the first
sub-warp stores the token's own k/v into its slot. Rows of long prompt
chunks that start their sequence are only stored here: their attention is
MLX's fused causal attention (dense_prefill.py), far cheaper than one query
a thread block once a chunk has a few hundred tokens.

Why writing into an input is sound here (MLX arrays are otherwise values):
- MLX hands a custom kernel the buffer of an evaluated row-contiguous input
  as it is (only non-contiguous inputs are copied first). The pools are made
  contiguous and evaluated once (kvcache/paged_cache.py) and no MLX operation
  ever writes them on this backend, so each pool keeps one buffer for the
  engine's life and every launch writes that buffer.
- Order: a layer's pools are read and written only by that layer's
  launches in a step, and launches on the stream run in order; the step
  ends with an mx.eval before the next step is built. The tensor-core
  attention launch takes the store launch's (one-element) output as an
  input, so MLX cannot order it first; in a step of decode rows only it
  stores each row itself, behind a barrier of the row's own thread block
  (no other block reads that slot). Within the scalar launch no thread
  reads a slot written in that launch (a chunk's own keys are read from
  k_new/v_new); another sequence's blocks are never written (a block shared
  through the prefix cache is full, and writes go to a sequence's own
  newest block).
- `verify` runs the kernel against the reference math at the model's shape
  before the platform picks it (engine/platform/cuda.py); a mismatch or a
  compile failure leaves the portable path in use.

The platform picks this backend only for shapes within the kernel's limits
(`unsupported`) and once `available()` has verified it on this device.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from engine.platform.kernel_constants import float_bits
from kvcache.attention import cuda_rope, cuda_tensor_core, dense_prefill
from kvcache.attention.backend import AttentionBackend, split_qkv
from kvcache.attention.metadata import AttentionSpec, CommonAttentionMetadata

# Two warps a thread block: 8B x 256 rows 11,178 out tok/s against 10,640 with
# four (H200, bench/results/h200_s6_warps.log); the kernel alone 145 against
# 194 us a layer (h200_s6_main.log).
WARPS = 2
# Keys a sub-warp loads before computing on them: 2 against 4, 8B x 256 rows
# 12,619 and 12,753 against 12,570 and 12,492 out tok/s, alternating in one
# call (h200_s7_unroll.log); the kernel alone 129 against 152 us a layer.
UNROLL = 2
# Lanes per key: 8 elements a lane (16-byte loads in half precision), at most
# a warp. Fewer lanes a key mean fewer shuffles a score (log2 of the lanes);
# None picks that, a number forces it (bench/gpu_profile.py compares).
LANES_PER_KEY: int | None = None
SHARED_MEMORY = 48 << 10  # static shared memory a thread block may use
# Half-precision pools at head_dim 64/128 with up to 16 query heads a KV head
# go through the tensor-core form (cuda_tensor_core.py); TC_WARPS warps a
# thread block take alternate 16-key tiles.
TENSOR_CORES = True
TC_WARPS = 2
# The tensor-core form issues a step's K/V loads before the previous step's
# math (two steps in flight a warp); False: load, then compute, each step.
# H200, one 8B layer: 331 against 355 us at 256 x 1,024, 69 against 89 at
# 64 x 192, even at 256 x 192 (bench/results/h200_s9_pipeline.log).
TC_PIPELINE = True
# A thread block of the tensor-core form serves up to 16 // group consecutive
# rows of a chunk (their query heads fill the mma's 16 rows, and each key is
# read once for all of them); False: a row a block, as the scalar form.
ROW_GROUPS = True
# A prompt chunk's row runs take a warp each, walking all their keys with no
# merge, where the chunk's context is at most SOLO_SPAN tokens a row of it
# (its runs then fill the GPU by themselves); other runs (decode rows, a short
# chunk continuing a long context) have the block's warps split their keys.
# One 8B layer on an H200: 64 fresh 128-token chunks 427 us solo against 913
# split, 16 x 200 tokens 223 against 416 (h200_s10_verify_and_kernels.log);
# the 8B x 256 run 15,232 against 14,777 out tok/s (h200_s10_ablation_8b.log).
# 0: every run split.
SOLO_SPAN = 32
# A step of decode rows only stores each row's K/V inside the tensor-core
# attention launch (its block is the row's only reader), saving a store
# launch a layer; False: the store launch first, as for every other step.
STORE_OWN_DECODE = True

_SOURCE = """
    // SUB lanes (a sub-warp, SUB <= 32) share one key: each holds PER_LANE of
    // its D elements, so a score is summed in log2(SUB) shuffles and a warp
    // works on 32 / SUB keys at once. Every shuffle names its sub-warp's lanes
    // only: sub-warps of a warp may walk different keys.
    constexpr int PER_LANE = D / SUB;
    constexpr int SUBS = 32 / SUB;
    constexpr int WORKERS = NWARPS * SUBS;
    const int bk = blockIdx.x;
    const int i = bk / KVH;  // the packed token this thread block serves
    const int kvh = bk % KVH;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int sub_lane = lane % SUB;
    const int worker = warp * SUBS + lane / SUB;
    const unsigned sub_mask = SUB == 32 ? 0xffffffffu
                                        : ((1u << SUB) - 1u) << (lane / SUB * SUB);
    const int pos = positions[i];
    const size_t out_at = ((size_t)i * KVH * G + kvh * G) * D;
    if (pos < 0) {  // padding: stores nothing, attends nothing
        if (warp == 0)
            for (int g = 0; g < G; ++g)
                for (int j = lane; j < D; j += 32) out[out_at + (size_t)g * D + j] = T(0);
        return;
    }
    // Per-model constants arrive compiled in (floats as their bits), not as
    // arrays made on the host each call: see _launch for why.
    const float scale = __int_as_float(SCALE_BITS);
    const float softcap = __int_as_float(CAP_BITS);
    const int W = block_tables_shape[1];  // table width: a launch argument, not a compile
    const int window = WINDOW;  // keys within `window` positions (0: all)
    const int ctx = pos + 1;
    const int first_t = window > 0 && ctx > window ? ctx - window : 0;
    // A row whose attention runs elsewhere (a fresh prompt chunk:
    // dense_prefill.py) comes with its table row complemented: its K/V are
    // stored, nothing is attended.
    const int table_row = table_of[i];
    const bool store_only = table_row < 0;
    const int* table = block_tables + (size_t)(store_only ? ~table_row : table_row) * W;
    // Keys of this token's own chunk (positions p0 .. pos) are this step's:
    // read from k_new/v_new, never from the pools, which this launch writes.
    const int first = chunk_start[i];
    const int p0 = pos - (i - first);
    // Packed token r's q, k and v rows start at r * stride + offset (q, k_new
    // and v_new may be one fused q/k/v projection); this lane's share of head h
    // is D elements further per head, PER_LANE of them from sub_lane * PER_LANE.
    const int q_stride = Q_STRIDE, k_stride = K_STRIDE, v_stride = V_STRIDE;
    const int q_off = Q_OFF, k_off = K_OFF, v_off = V_OFF;
    const int lane_at = sub_lane * PER_LANE;

    // This token's K/V are stored into the pools here, in place (see the
    // module docstring for why that is sound), its key rotated first.
    if (worker == 0) {
        const int block = table[pos / BS];
        const size_t row = ((size_t)(block * BS + pos % BS) * KVH + kvh) * D + lane_at;
        const size_t k_at = (size_t)i * k_stride + k_off + (size_t)kvh * D + lane_at;
        const size_t v_at = (size_t)i * v_stride + v_off + (size_t)kvh * D + lane_at;
        float kx[PER_LANE];
        for (int e = 0; e < PER_LANE; ++e) kx[e] = static_cast<float>(k_new[k_at + e]);
        if (ROTATE) rotate_span<PER_LANE, TRAD, D>(kx, rope_cos, rope_sin, i, lane_at, SUB / 2,
                                                   sub_mask);
        T* k_out = (T*)k_pool;
        T* v_out = (T*)v_pool;
        for (int e = 0; e < PER_LANE; ++e) {
            k_out[row + e] = static_cast<T>(kx[e]);
            v_out[row + e] = v_new[v_at + e];
        }
    }
    if (store_only) return;  // uniform in the block: no sync skipped
    float qv[G][PER_LANE];
    for (int g = 0; g < G; ++g) {
        const size_t at = (size_t)i * q_stride + q_off + (size_t)(kvh * G + g) * D + lane_at;
        for (int e = 0; e < PER_LANE; ++e) qv[g][e] = static_cast<float>(q[at + e]);
        if (ROTATE)
            rotate_span<PER_LANE, TRAD, D>(qv[g], rope_cos, rope_sin, i, lane_at, SUB / 2,
                                           sub_mask);
        for (int e = 0; e < PER_LANE; ++e) qv[g][e] *= scale;
    }
    float m[G], l[G], acc[G][PER_LANE];
    for (int g = 0; g < G; ++g) {
        m[g] = -INFINITY; l[g] = 0.f;
        for (int e = 0; e < PER_LANE; ++e) acc[g][e] = 0.f;
    }
    // Each sub-warp takes UNROLL consecutive keys at a time and issues all
    // their K/V loads (one vector load per lane and row) before using any:
    // more bytes in flight, which is what attention over a cache waits on.
    struct alignas(sizeof(T) * PER_LANE) Lanes { T v[PER_LANE]; };
    for (int t0 = first_t + worker * UNROLL; t0 < ctx; t0 += WORKERS * UNROLL) {
        Lanes kl[UNROLL], vl[UNROLL];
        int fresh_row[UNROLL];  // packed row of a key of this step's chunk, else -1
        for (int u = 0; u < UNROLL; ++u) {
            const int t = t0 + u < ctx ? t0 + u : ctx - 1;
            const bool fresh = t >= p0;
            fresh_row[u] = fresh ? first + t - p0 : -1;
            if (fresh) {
                const size_t r = first + t - p0;
                kl[u] = *reinterpret_cast<const Lanes*>(
                    k_new + r * k_stride + k_off + (size_t)kvh * D + lane_at);
                vl[u] = *reinterpret_cast<const Lanes*>(
                    v_new + r * v_stride + v_off + (size_t)kvh * D + lane_at);
            } else {
                const int block = table[t / BS];
                const size_t row = ((size_t)(block * BS + t % BS) * KVH + kvh) * D + lane_at;
                kl[u] = *reinterpret_cast<const Lanes*>(k_pool + row);
                vl[u] = *reinterpret_cast<const Lanes*>(v_pool + row);
            }
        }
        // Keys from the pools were rotated when stored; this chunk's are
        // rotated here (uniform within the sub-warp: its lanes share the row).
        if (ROTATE)
            for (int u = 0; u < UNROLL; ++u)
                if (fresh_row[u] >= 0) {
                    float x[PER_LANE];
                    for (int e = 0; e < PER_LANE; ++e) x[e] = static_cast<float>(kl[u].v[e]);
                    rotate_span<PER_LANE, TRAD, D>(x, rope_cos, rope_sin, fresh_row[u],
                                                   lane_at, SUB / 2, sub_mask);
                    for (int e = 0; e < PER_LANE; ++e) kl[u].v[e] = static_cast<T>(x[e]);
                }
        // Scores of the run first, then one softmax rescale for the whole run
        // (not one a key): fewer exps and accumulator rescales.
        float sc[UNROLL][G];
        for (int u = 0; u < UNROLL; ++u)
            for (int g = 0; g < G; ++g) {
                float s = 0.f;
                for (int e = 0; e < PER_LANE; ++e)
                    s += qv[g][e] * static_cast<float>(kl[u].v[e]);
                for (int off = SUB / 2; off > 0; off >>= 1)
                    s += __shfl_xor_sync(sub_mask, s, off);
                if (softcap > 0.f) s = softcap * tanhf(s / softcap);
                sc[u][g] = t0 + u < ctx ? s : -INFINITY;
            }
        for (int g = 0; g < G; ++g) {
            float m_new = m[g];
            for (int u = 0; u < UNROLL; ++u) m_new = fmaxf(m_new, sc[u][g]);
            const float corr = __expf(m[g] - m_new);
            l[g] *= corr;
            for (int e = 0; e < PER_LANE; ++e) acc[g][e] *= corr;
            for (int u = 0; u < UNROLL; ++u) {
                const float p = __expf(sc[u][g] - m_new);
                l[g] += p;
                for (int e = 0; e < PER_LANE; ++e)
                    acc[g][e] += p * static_cast<float>(vl[u].v[e]);
            }
            m[g] = m_new;
        }
    }
    // The sub-warps' partial softmaxes, merged by warp 0.
    __shared__ float sm_m[WORKERS][G];
    __shared__ float sm_l[WORKERS][G];
    __shared__ float sm_acc[WORKERS][G][D];
    for (int g = 0; g < G; ++g) {
        if (sub_lane == 0) { sm_m[worker][g] = m[g]; sm_l[worker][g] = l[g]; }
        for (int e = 0; e < PER_LANE; ++e) sm_acc[worker][g][lane_at + e] = acc[g][e];
    }
    __syncthreads();
    if (warp == 0) {
        for (int g = 0; g < G; ++g) {
            float mx_ = -INFINITY;
            for (int w = 0; w < WORKERS; ++w) mx_ = fmaxf(mx_, sm_m[w][g]);
            float denom = 0.f;
            float wts[WORKERS];
            for (int w = 0; w < WORKERS; ++w) {
                wts[w] = sm_l[w][g] > 0.f ? __expf(sm_m[w][g] - mx_) : 0.f;
                denom += sm_l[w][g] * wts[w];
            }
            for (int j = lane; j < D; j += 32) {
                float o = 0.f;
                for (int w = 0; w < WORKERS; ++w) o += sm_acc[w][g][j] * wts[w];
                out[out_at + (size_t)g * D + j] = static_cast<T>(o / denom);
            }
        }
    }
"""

_INPUTS = {
    "scalar": ["q", "k_pool", "v_pool", "k_new", "v_new", "block_tables", "table_of",
               "positions", "chunk_start", "rope_cos", "rope_sin"],
    "store": ["k_new", "v_new", "block_tables", "table_of", "positions", "rope_cos",
              "rope_sin", "k_pool", "v_pool"],
    "tensor_cores": ["q", "k_pool", "v_pool", "k_new", "v_new", "block_tables", "table_of",
                     "positions", "rope_cos", "rope_sin", "stored", "groups"],
}
_kernels: dict[str, object] = {}


def _get_kernel(form: str = "scalar"):
    """The kernel of `form`: "scalar" (this file), or the tensor-core pair
    "store" then "tensor_cores" (cuda_tensor_core.py)."""
    if form not in _kernels:
        source, header = {"scalar": (_SOURCE, cuda_rope.HEADER),
                          "store": (cuda_tensor_core.STORE_SOURCE, cuda_tensor_core.HEADER),
                          "tensor_cores": (cuda_tensor_core.SOURCE, cuda_tensor_core.HEADER)}[form]
        _kernels[form] = mx.fast.cuda_kernel(
            name=f"conveyor_paged_attention_{form}", input_names=_INPUTS[form],
            output_names=["stored" if form == "store" else "out"], source=source,
            header=header)
    return _kernels[form]


def uses_tensor_cores(dtype, head_dim: int, group: int) -> bool:
    """Whether the tensor-core form serves this shape (cuda_tensor_core.py)."""
    return (TENSOR_CORES and dtype in (mx.bfloat16, mx.float16) and head_dim in (64, 128)
            and group <= 16)


def paged_attention(q: mx.array, k_pool: mx.array, v_pool: mx.array, k_new: mx.array,
                    v_new: mx.array, meta: CudaMetadata, scale: float, block_size: int,
                    n_kv_heads: int, softcap: float = 0.0, window: int = 0) -> mx.array:
    """Store every packed token's k_new, v_new [N, Hkv, D] into the pools
    ([slots * Hkv, D]) *in place* and attend q [N, H, D]: token i sees
    positions up to meta.positions[i] (the last `window` of them if window >
    0) of block table meta.tables[meta.table_of[i]]; its own chunk's keys
    come from k_new/v_new. Padding (position -1) gets zeros. The pools must
    be evaluated, contiguous arrays (MLX does not see the write)."""
    n, heads, dim = q.shape
    kv_row = n_kv_heads * dim
    return _launch(q, k_new.astype(k_pool.dtype), v_new.astype(v_pool.dtype),
                   (heads * dim, kv_row, kv_row, 0, 0, 0), None, k_pool, v_pool, meta, scale,
                   heads, dim, block_size, n_kv_heads, softcap, window)


def paged_attention_packed(qkv: mx.array, heads: int, dim: int, rope: tuple | None,
                           k_pool: mx.array, v_pool: mx.array, meta: CudaMetadata,
                           scale: float, block_size: int, n_kv_heads: int,
                           softcap: float = 0.0, window: int = 0) -> mx.array:
    """`paged_attention` straight from a fused projection qkv [N, (H + 2 Hkv) D]
    (each row q's heads, then k's, then v's), rotating q and k inside the
    kernel when `rope` = (cos, sin [N, D/2] float32, traditional) is given:
    no slice, reshape, copy or RoPE kernel between the matmul and attention."""
    q_end = heads * dim
    row = q_end + 2 * n_kv_heads * dim
    return _launch(qkv, qkv, qkv, (row, row, row, 0, q_end, q_end + n_kv_heads * dim), rope,
                   k_pool, v_pool, meta, scale, heads, dim, block_size, n_kv_heads, softcap,
                   window)


def _launch(q, k_new, v_new, layout: tuple, rope: tuple | None, k_pool, v_pool,
            meta: CudaMetadata, scale: float, heads: int, dim: int, block_size: int,
            n_kv_heads: int, softcap: float, window: int) -> mx.array:
    # layout: (q, k, v row strides, then their offsets), in elements.
    # Scale, cap, window and layout are a layer's constants: compiled in
    # (engine/platform/kernel_constants.py says why not as arrays).
    n, group = q.shape[0], heads // n_kv_heads
    cos, sin, traditional = rope if rope is not None else (_NO_ROPE, _NO_ROPE, False)
    shape = [("T", q.dtype), ("D", dim), ("G", group), ("KVH", n_kv_heads), ("BS", block_size),
             ("ROTATE", int(rope is not None)), ("TRAD", int(traditional)),
             ("SCALE_BITS", float_bits(scale)), ("CAP_BITS", float_bits(softcap)),
             ("WINDOW", int(window)),
             *zip(("Q_STRIDE", "K_STRIDE", "V_STRIDE", "Q_OFF", "K_OFF", "V_OFF"),
                  map(int, layout))]
    if not uses_tensor_cores(q.dtype, dim, group):
        return _get_kernel()(
            inputs=[q, k_pool, v_pool, k_new, v_new, meta.tables, meta.table_of, meta.positions,
                    meta.chunk_start, cos, sin],
            template=shape + [("NWARPS", WARPS), ("UNROLL", UNROLL),
                              ("SUB", lanes_per_key(dim, group))],
            grid=(n * n_kv_heads * 32 * WARPS, 1, 1), threadgroup=(32 * WARPS, 1, 1),
            output_shapes=[(n, heads, dim)], output_dtypes=[q.dtype])[0]
    groups = meta.groups if meta.groups is not None else decode_runs(n)
    # A step of decode rows only stores inside the attention launch (a
    # block's one row is the only reader of its slot); one with prompt rows
    # stores every token first, as a chunk's runs read each other's keys.
    store_own = meta.decode_only and STORE_OWN_DECODE
    stored = _NOT_STORED if store_own else _get_kernel("store")(
        inputs=[k_new, v_new, meta.tables, meta.table_of, meta.positions, cos, sin, k_pool,
                v_pool],
        template=shape, grid=(n * n_kv_heads * 32, 1, 1), threadgroup=(32, 1, 1),
        output_shapes=[(1,)], output_dtypes=[mx.int32])[0]
    return _get_kernel("tensor_cores")(
        inputs=[q, k_pool, v_pool, k_new, v_new, meta.tables, meta.table_of, meta.positions,
                cos, sin, stored, groups],
        template=shape + [("NWARPS", TC_WARPS), ("BF16", int(q.dtype == mx.bfloat16)),
                          ("PIPE", int(TC_PIPELINE)), ("STORE_OWN", int(store_own))],
        grid=(groups.shape[0] * n_kv_heads * 32, 1, 1),  # a warp an entry
        threadgroup=(32 * TC_WARPS, 1, 1),
        output_shapes=[(n, heads, dim)], output_dtypes=[q.dtype])[0]


_NO_ROPE = mx.zeros((1,), dtype=mx.float32)
_NOT_STORED = mx.zeros((1,), dtype=mx.int32)  # `stored` of a launch that stores itself


def lanes_per_key(head_dim: int, group: int) -> int:
    """8 elements a lane where the sub-warps' partial results fit in shared
    memory, else more lanes a key (fewer sub-warps), up to a warp."""
    if LANES_PER_KEY:
        return LANES_PER_KEY
    lanes = min(32, max(2, head_dim // 8))
    while lanes < 32 and _shared_bytes(head_dim, group, lanes) > SHARED_MEMORY:
        lanes *= 2
    return lanes


def _shared_bytes(head_dim: int, group: int, lanes: int) -> int:
    # Each sub-warp's partial softmax: max, sum and accumulator per query head.
    return WARPS * 32 // lanes * group * (head_dim + 2) * 4


def shared_bytes(spec: AttentionSpec) -> int:
    """Static shared memory a thread block of the kernel uses at `spec`."""
    return _shared_bytes(spec.head_dim, spec.group,
                         lanes_per_key(spec.head_dim, spec.group))


@dataclass
class CudaMetadata:
    """Per packed token: its sequence's block-table row, its position (-1 for
    padding) and the packed index of its chunk's first token."""

    tables: mx.array       # [chunks, W] int32
    table_of: mx.array     # [N] int32
    positions: mx.array    # [N] int32
    chunk_start: mx.array  # [N] int32
    # Fresh prompt chunks answered by dense causal attention (dense_prefill.py)
    dense: dense_prefill.DensePrefill | None = None
    # The tensor-core form's warps: runs of consecutive rows of one chunk,
    # each first_row * 32 + rows, a warp each (`warp_runs`); None: a row a block.
    groups: mx.array | None = None
    # Every row a decode row (its own chunk, one token): the tensor-core form
    # then stores inside its attention launch (STORE_OWN_DECODE).
    decode_only: bool = False
    # cos/sin rows of this step's positions, per RoPE schedule (shared by its layers)
    rope: dict = field(default_factory=dict, repr=False, compare=False)

    def rope_tables(self, rope, positions: mx.array) -> tuple[mx.array, mx.array]:
        key = rope.schedule()
        if key not in self.rope:
            self.rope[key] = rope.cos_sin(positions)
        return self.rope[key]

    @classmethod
    def from_common(cls, common: CommonAttentionMetadata, group: int, plan_dense: bool = False,
                    max_dense: int | None = None) -> CudaMetadata:
        """`group` (query heads a KV head) sizes the tensor-core form's row
        runs: a run must not hold more than 16 query heads, so it has no
        default. With `plan_dense`, fresh prompt chunks may be planned for
        dense attention (no longer than `max_dense` tokens where that is given)."""
        n, pad = len(common.slots), common.num_padding
        tables = mx.array(common.block_tables.astype(np.int32))
        if common.num_decode == n:  # decode rows only (every compiled step): row i is chunk i
            index = mx.arange(n, dtype=mx.int32)
            return cls(tables, index, mx.array(common.positions.astype(np.int32)), index,
                       groups=decode_runs(n), decode_only=True)
        real, lens = n - pad, common.chunk_lens
        table_of = np.zeros(n, np.int32)
        table_of[:real] = np.repeat(np.arange(common.num_chunks, dtype=np.int32), lens)
        chunk_start = np.zeros(n, np.int32)
        chunk_start[:real] = np.repeat(common.query_start[:-1], lens)
        positions = common.positions.astype(np.int32)
        positions[real:] = -1
        dense = None
        if plan_dense:
            dense = dense_prefill.plan(common.query_start, common.context_lens,
                                       common.num_decode, n, max_dense)
            if dense is not None:
                table_of[dense.rows] = ~table_of[dense.rows]  # store only (see the kernel)
        runs, solo = row_runs(common.query_start, n, group, table_of < 0, common.context_lens)
        return cls(tables, mx.array(table_of), mx.array(positions), mx.array(chunk_start),
                   dense, mx.array(warp_runs(runs, solo)))


def row_runs(query_start: np.ndarray, n: int, group: int,
             store_only: np.ndarray | None = None,
             context_lens: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The tensor-core form's row runs for N packed rows: each chunk's rows in
    runs of up to 16 // group (a run's query heads fill the 16 rows of one
    mma, so a prompt chunk's run reads each key once for all its rows), each
    padding row alone, store-only rows in none; a run is first_row * 32 +
    rows. Also which runs go solo (SOLO_SPAN), decided per chunk from its own
    length and context only, so a request's arithmetic does not depend on
    the rest of its step."""
    per = max(1, 16 // group) if ROW_GROUPS else 1
    starts, lens = query_start[:-1], np.diff(query_start)
    runs = -(-lens // per)
    chunk = np.repeat(np.arange(len(lens)), runs)
    index = np.arange(int(runs.sum())) - np.repeat(np.cumsum(runs) - runs, runs)
    first = starts[chunk] + index * per
    count = np.minimum(per, lens[chunk] - index * per)
    alone = np.zeros(len(lens), bool)
    if context_lens is not None and SOLO_SPAN:
        alone = (lens > 1) & (context_lens <= SOLO_SPAN * lens)
    solo = alone[chunk]
    if store_only is not None:
        keep = ~store_only[first]  # a chunk's rows all store only or none
        first, count, solo = first[keep], count[keep], solo[keep]
    padding = np.arange(int(query_start[-1]), n)
    out = np.concatenate([first * 32 + count, padding * 32 + 1])
    solo = np.concatenate([solo, np.zeros(len(padding), bool)])
    if out.size == 0:
        # Every row store only and no padding (dense chunks filling a bucket,
        # e.g. one 256-token prompt alone): an empty grid is an invalid CUDA
        # launch, so one run of no rows, which returns at once (row 0 is
        # store only).
        out, solo = np.zeros(1), np.zeros(1, bool)
    return out.astype(np.int32), solo


def warp_runs(runs: np.ndarray, solo: np.ndarray, warps: int | None = None) -> np.ndarray:
    """The kernel's `groups`: a run for each warp of each thread block. A
    split run fills its block's warps (they split its keys); solo runs are
    packed `warps` to a block (consecutive runs of a chunk share its keys in
    the block's cache), the last block's spare warps -1 (idle)."""
    warps = warps or TC_WARPS
    alone = runs[solo]
    alone = np.concatenate([alone, np.full(-len(alone) % warps, -1)])
    return np.concatenate([np.repeat(runs[~solo], warps), alone]).astype(np.int32)


def decode_runs(rows: int) -> mx.array:
    """`groups` of a step of decode rows only: each row a split run."""
    return mx.repeat(mx.arange(rows, dtype=mx.int32) * 32 + 1, TC_WARPS)


# The shape gpu_check reports on: a Llama-style group of 4, head_dim 128.
DEFAULT_SPEC = AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=128, block_size=16,
                             kv_dtype=mx.bfloat16)
_verified: dict[AttentionSpec, bool] = {}


def unsupported(spec: AttentionSpec) -> str | None:
    """Why the kernel cannot serve this shape, or None if it may (verify decides)."""
    if spec.head_dim not in (32, 64, 128, 256):  # whole, power-of-two vector loads a lane
        return f"the CUDA attention kernel needs head_dim 32, 64, 128 or 256, not {spec.head_dim}"
    if spec.num_kv_heads <= 0 or spec.num_heads % spec.num_kv_heads:
        return f"{spec.num_heads} query heads do not split evenly over {spec.num_kv_heads} KV heads"
    if shared_bytes(spec) > SHARED_MEMORY:
        return (f"the CUDA attention kernel's shared memory does not fit {spec.group} query "
                f"heads per KV head at head_dim {spec.head_dim}")
    return None


def available(spec: AttentionSpec = DEFAULT_SPEC) -> bool:
    """True once the kernel has matched the portable path on this device at
    this shape (checked once per shape)."""
    if spec not in _verified:
        _verified[spec] = unsupported(spec) is None and verify(spec)
    return _verified[spec]


def verify(spec: AttentionSpec = DEFAULT_SPEC) -> bool:
    """Compare with the portable path's math (scatter, then attention over
    each token's gathered context) on random data: decode rows, prompt chunks
    continuing a context, and padding; the pools must then hold every new
    token, written in place. Any error means 'no'."""
    # The sliding window and the score cap are checked too where the model
    # uses them (a window crossing block edges, a cap low enough to bend scores).
    windows = (0, 20) if spec.sliding_window else (0,)
    caps = (0.0, 2.0) if spec.softcap else (0.0,)
    # The fused-projection entry with RoPE inside (non-traditional pairs for
    # every case, traditional once where the head allows it) against mx.fast.rope.
    # Each also as a step of decode rows only (they store inside the attention).
    cases = [(cap, window, rope, decode) for window in windows for cap in caps
             for rope in (None, "neox") for decode in (False, True)]
    cases += [(0.0, 0, "traditional", False), (0.0, 0, "traditional", True)]
    try:
        return all(_verify(spec, *case) < 2e-2 for case in cases)
    except Exception as exc:  # a compile or launch failure: fall back
        print(f"conveyor: CUDA paged attention unavailable ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return False


def _verify(spec: AttentionSpec, softcap: float = 0.0, window: int = 0,
            rope_kind: str | None = None, decode_only: bool = False) -> float:
    """The largest difference from the reference (inf if a stored row differs).
    With `rope_kind`, q/k/v arrive as one fused projection and the kernel
    rotates them ("neox" or "traditional" pairs); the reference rotates with
    RoPE's MLX path first. `decode_only`: a step of decode rows and padding,
    as a compiled decode step launches it."""
    rng = np.random.default_rng(0)
    dtype, bs, kvh, g, d = (spec.kv_dtype, spec.block_size, spec.num_kv_heads, spec.group,
                            spec.head_dim)
    # (tokens already cached, tokens this step): decode rows first, then chunks.
    # The 23- and 17-row chunks go solo (a warp a run), the 5-row one on a
    # 300-token context splits its runs' keys (SOLO_SPAN).
    chunks = [(0, 1), (16, 1), (89, 1), (0, 23), (40, 17), (300, 5)]
    if decode_only:
        chunks = [(0, 1), (16, 1), (89, 1), (300, 1)]
    lengths = [n for _, n in chunks]
    width = -(-max(c + n for c, n in chunks) // bs)
    blocks = len(chunks) * width + 2
    tables = rng.permutation(blocks)[:len(chunks) * width].reshape(len(chunks), width)
    pad = 3
    n = sum(lengths) + pad
    positions = np.concatenate([np.arange(c, c + k) for c, k in chunks] + [np.full(pad, -1)])
    table_of = np.concatenate([np.full(k, j) for j, (_, k) in enumerate(chunks)]
                              + [np.zeros(pad, int)])
    starts = np.cumsum([0] + lengths)[:-1]
    chunk_start = np.concatenate([np.full(k, s) for s, k in zip(starts, lengths)]
                                 + [np.zeros(pad, int)])
    # Prompt chunks of 23 and 17 rows also end in partial row runs.
    query_start = np.cumsum([0] + lengths)
    contexts = np.array([c + k for c, k in chunks])
    groups = decode_runs(n) if decode_only else mx.array(
        warp_runs(*row_runs(query_start, n, g, context_lens=contexts)))
    meta = CudaMetadata(mx.array(tables.astype(np.int32)), mx.array(table_of.astype(np.int32)),
                        mx.array(positions.astype(np.int32)),
                        mx.array(chunk_start.astype(np.int32)), groups=groups,
                        decode_only=decode_only)
    k_pool = mx.array(rng.normal(size=(blocks * bs * kvh, d)), dtype=dtype)
    v_pool = mx.array(rng.normal(size=(blocks * bs * kvh, d)), dtype=dtype)
    q = mx.array(rng.normal(size=(n, kvh * g, d)), dtype=dtype)
    k_new = mx.array(rng.normal(size=(n, kvh, d)), dtype=dtype)
    v_new = mx.array(rng.normal(size=(n, kvh, d)), dtype=dtype)
    real = positions >= 0
    rope = None
    if rope_kind is not None:
        from models.layers.rope import RoPE

        rope = RoPE(d, 10000.0, traditional=rope_kind == "traditional")
        qkv = mx.concatenate([q.reshape(n, -1), k_new.reshape(n, -1), v_new.reshape(n, -1)],
                             axis=1)
        rotate_at = mx.array(np.maximum(positions, 0).astype(np.int32))
        q, k_new = rope(q, rotate_at), rope(k_new, rotate_at)  # the reference's inputs
    slots = tables[table_of, positions // bs] * bs + positions % bs
    new_rows = (slots[real][:, None] * kvh + np.arange(kvh)).reshape(-1)
    # The reference sees the new tokens written the portable way.
    k_ref, v_ref = mx.array(k_pool), mx.array(v_pool)
    k_ref[mx.array(new_rows)] = k_new[:int(real.sum())].reshape(-1, d)
    v_ref[mx.array(new_rows)] = v_new[:int(real.sum())].reshape(-1, d)
    mx.eval(k_pool, v_pool, k_ref, v_ref)
    if rope is None:
        got = paged_attention(q, k_pool, v_pool, k_new, v_new, meta, d**-0.5, bs, kvh,
                              softcap, window)
    else:
        tables_ = (*meta.rope_tables(rope, rotate_at), rope.traditional)
        got = paged_attention_packed(qkv, kvh * g, d, tables_, k_pool, v_pool, meta, d**-0.5,
                                     bs, kvh, softcap, window)
    mx.eval(got)
    err = 0.0
    for i in range(n):
        if positions[i] < 0:
            err = max(err, mx.abs(got[i].astype(mx.float32)).max().item())
            continue
        first = max(0, positions[i] + 1 - window) if window else 0
        ts = np.arange(first, positions[i] + 1)
        rows = (tables[table_of[i], ts // bs] * bs + ts % bs)[:, None] * kvh + np.arange(kvh)
        keys = k_ref[mx.array(rows)].astype(mx.float32)       # [T, Hkv, D]
        values = v_ref[mx.array(rows)].astype(mx.float32)
        qi = q[i].astype(mx.float32).reshape(kvh, g, d)
        scores = mx.einsum("hgd,thd->hgt", qi, keys) * d**-0.5
        if softcap:
            scores = softcap * mx.tanh(scores / softcap)
        ref = mx.einsum("hgt,thd->hgd", mx.softmax(scores, axis=-1), values).reshape(-1, d)
        err = max(err, mx.abs(got[i].astype(mx.float32) - ref).max().item())
    # ... and the pools now hold the new tokens, written in place.
    stored = mx.abs(k_pool[mx.array(new_rows)] - k_ref[mx.array(new_rows)]).max().item() + \
        mx.abs(v_pool[mx.array(new_rows)] - v_ref[mx.array(new_rows)]).max().item()
    # A key rotated in the kernel may differ from mx.fast.rope's by its last bit.
    return err if stored <= (0 if rope is None else 0.05) else float("inf")


class CudaAttention(AttentionBackend):
    """Every packed token (decode rows, prompt chunks, padding) through the
    in-place kernel: no MLX scatter into a pool and no gather of a context."""

    name = "cuda"
    # Kernel rows may be padding (they read and write the scratch block), so a
    # decode step can be padded to a bucket of rows and compiled once per bucket.
    compiled_decode = True

    def build(self, common: CommonAttentionMetadata) -> CudaMetadata:
        # Dense attention knows no window or cap: a capped model keeps every
        # row in the kernel, a windowed one its chunks longer than a window.
        return CudaMetadata.from_common(common, self.spec.group,
                                        plan_dense=not self.spec.softcap,
                                        max_dense=self.spec.shortest_window)

    def decode_graph_inputs(self, meta: CudaMetadata) -> tuple[mx.array, ...]:
        """The arrays a compiled decode step takes (see decode_metadata)."""
        return meta.tables, meta.positions

    def decode_metadata(self, rows: int, tables: mx.array, positions: mx.array,
                        ) -> CudaMetadata:
        """Metadata of a decode-only step of `rows` rows (row i is token i, its
        own chunk), inside a compiled graph."""
        index = mx.arange(rows, dtype=mx.int32)
        return CudaMetadata(tables, index, positions, index, groups=decode_runs(rows),
                            decode_only=True)

    def attend(self, view, q: mx.array, k: mx.array, v: mx.array, scale: float,
               window: int | None = None, softcap: float | None = None) -> mx.array:
        cache = view.cache
        out = paged_attention(q.astype(cache.dtype), cache.k[view.layer], cache.v[view.layer],
                              k, v, view.meta, scale, cache.block_size, cache.n_kv_heads,
                              softcap or 0.0, window or 0).astype(q.dtype)
        if view.meta.dense is not None:
            _check_dense_fits(view.meta.dense, window, softcap)
            out = dense_prefill.attend(view.meta.dense, out, q, k, v, scale)
        return out

    def packs_qkv(self, rope) -> bool:
        # The kernel rotates whole heads (a lane holds an even number of elements).
        return rope is None or rope.dims == self.spec.head_dim

    def attend_packed(self, view, qkv: mx.array, heads: int, rope, positions: mx.array,
                      scale: float, window: int | None = None,
                      softcap: float | None = None) -> mx.array:
        cache = view.cache
        tables = None if rope is None else (*view.meta.rope_tables(rope, positions),
                                            rope.traditional)
        out = paged_attention_packed(qkv.astype(cache.dtype), heads, self.spec.head_dim, tables,
                                     cache.k[view.layer], cache.v[view.layer], view.meta, scale,
                                     cache.block_size, cache.n_kv_heads, softcap or 0.0,
                                     window or 0).astype(qkv.dtype)
        if view.meta.dense is not None:
            _check_dense_fits(view.meta.dense, window, softcap)
            q, k, v = split_qkv(qkv, heads, cache.n_kv_heads, self.spec.head_dim)
            out = dense_prefill.attend(view.meta.dense, out, q, k, v, scale, rope)
        return out


def _check_dense_fits(plan: dense_prefill.DensePrefill, window: int | None,
                      softcap: float | None) -> None:
    # build() plans from the spec (no cap, chunks within the shortest window);
    # a layer outside that would get unwindowed or uncapped rows: refuse.
    if softcap or (window and plan.longest > window):
        raise RuntimeError(f"dense prefill planned for a layer it cannot serve (window "
                           f"{window}, cap {softcap}, a chunk of {plan.longest} tokens)")
