"""The CUDA attention backend: decode rows through a kernel that reads K/V
blocks in place (mx.fast.cuda_kernel); prompt chunks on the portable path.

The portable path gathers every sequence's context into a new array before
attention; on an H100 that gather cost ~4x the attention itself. Here one
thread block handles one (sequence, KV head): its 4 warps walk the block
table, each warp taking runs of UNROLL tokens (all their loads issued before
any is used), with an online softmax for all the query heads of the group,
and the warps' partial results are merged through shared memory at the end.
K/V rows are read straight from the pools, and the row's new token is
stored into them by the kernel itself. A layer's sliding window starts the
walk at its first key (blocks before it are never read: they may already be
freed), and soft-capping (CAPPED) maps each score through cap * tanh(s / cap)
before the softmax. Both are checked at start-up only for models that use
them (the AttentionSpec says which).

The platform (engine/platform/cuda.py) picks this backend only for shapes
within the kernel's limits (`unsupported`) and once `available()` has
matched the kernel against the portable path on this device, at the
model's own shape; everywhere else the portable backend runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from kvcache.attention.metadata import AttentionSpec, CommonAttentionMetadata
from kvcache.attention.portable import PortableAttention, PortableMetadata, attend_prompts
from kvcache.attention.sdpa import attention, key_mask

WARPS = 4
UNROLL = 4  # tokens a warp loads before computing on them
SHARED_MEMORY = 48 << 10  # static shared memory a thread block may use

_SOURCE = """
    constexpr int PER_LANE = D / 32;
    const int bk = blockIdx.x;
    const int b = bk / KVH;
    const int kvh = bk % KVH;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int ctx = context_lens[b];
    const float scale = scale_in[0];
    const int W = width_in[0];  // data, not a template value: one compile serves all widths
    // A sliding window (window_in > 0) sees only the latest window_in keys.
    const int first = window_in[0] > 0 && ctx > window_in[0] ? ctx - window_in[0] : 0;
    const float cap = softcap_in[0];

    float qv[G][PER_LANE];
    for (int g = 0; g < G; ++g)
        for (int i = 0; i < PER_LANE; ++i)
            qv[g][i] = static_cast<float>(q[((size_t)b * KVH * G + kvh * G + g) * D
                                            + lane * PER_LANE + i]) * scale;
    // This row's new token (position ctx - 1) is stored into the pools here,
    // in place: an MLX scatter on CUDA copies the whole pool. Within this
    // launch it is read from k_new/v_new, never back from the pools.
    const size_t new_at = ((size_t)b * KVH + kvh) * D + lane * PER_LANE;
    if (warp == 0) {
        const int t = ctx - 1;
        const int block = block_tables[(size_t)b * W + t / BS];
        const size_t row = ((size_t)(block * BS + t % BS) * KVH + kvh) * D + lane * PER_LANE;
        T* k_out = (T*)k_pool;
        T* v_out = (T*)v_pool;
        for (int i = 0; i < PER_LANE; ++i) {
            k_out[row + i] = k_new[new_at + i];
            v_out[row + i] = v_new[new_at + i];
        }
    }
    float m[G], l[G], acc[G][PER_LANE];
    for (int g = 0; g < G; ++g) {
        m[g] = -INFINITY; l[g] = 0.f;
        for (int i = 0; i < PER_LANE; ++i) acc[g][i] = 0.f;
    }
    // Each warp takes UNROLL consecutive tokens at a time and issues all their
    // K/V loads (one vector load per lane and row) before using any: more
    // bytes in flight per warp, which is what decode attention waits on.
    struct alignas(sizeof(T) * PER_LANE) Lanes { T v[PER_LANE]; };
    for (int t0 = first + warp * UNROLL; t0 < ctx; t0 += NWARPS * UNROLL) {
        Lanes kl[UNROLL], vl[UNROLL];
        for (int u = 0; u < UNROLL; ++u) {
            const int t = t0 + u < ctx ? t0 + u : ctx - 1;
            const int block = block_tables[(size_t)b * W + t / BS];
            const size_t row = ((size_t)(block * BS + t % BS) * KVH + kvh) * D
                               + lane * PER_LANE;
            const bool fresh = t == ctx - 1;
            kl[u] = *reinterpret_cast<const Lanes*>(fresh ? k_new + new_at : k_pool + row);
            vl[u] = *reinterpret_cast<const Lanes*>(fresh ? v_new + new_at : v_pool + row);
        }
        // Scores of the run first, then one softmax rescale for the whole run
        // (not one a token): a quarter of the exps and accumulator rescales.
        float sc[UNROLL][G];
        for (int u = 0; u < UNROLL; ++u)
            for (int g = 0; g < G; ++g) {
                float s = 0.f;
                for (int i = 0; i < PER_LANE; ++i)
                    s += qv[g][i] * static_cast<float>(kl[u].v[i]);
                for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
                if (CAPPED) s = cap * tanhf(s / cap);
                sc[u][g] = t0 + u < ctx ? s : -INFINITY;
            }
        for (int g = 0; g < G; ++g) {
            float m_new = m[g];
            for (int u = 0; u < UNROLL; ++u) m_new = fmaxf(m_new, sc[u][g]);
            const float corr = __expf(m[g] - m_new);
            l[g] *= corr;
            for (int i = 0; i < PER_LANE; ++i) acc[g][i] *= corr;
            for (int u = 0; u < UNROLL; ++u) {
                const float p = __expf(sc[u][g] - m_new);
                l[g] += p;
                for (int i = 0; i < PER_LANE; ++i)
                    acc[g][i] += p * static_cast<float>(vl[u].v[i]);
            }
            m[g] = m_new;
        }
    }
    __shared__ float sm_m[NWARPS][G];
    __shared__ float sm_l[NWARPS][G];
    __shared__ float sm_acc[NWARPS][G][D];
    for (int g = 0; g < G; ++g) {
        if (lane == 0) { sm_m[warp][g] = m[g]; sm_l[warp][g] = l[g]; }
        for (int i = 0; i < PER_LANE; ++i) sm_acc[warp][g][lane * PER_LANE + i] = acc[g][i];
    }
    __syncthreads();
    if (warp == 0) {
        for (int g = 0; g < G; ++g) {
            float mx_ = -INFINITY;
            for (int w = 0; w < NWARPS; ++w) mx_ = fmaxf(mx_, sm_m[w][g]);
            float denom = 0.f;
            float wts[NWARPS];
            for (int w = 0; w < NWARPS; ++w) {
                wts[w] = sm_l[w][g] > 0.f ? __expf(sm_m[w][g] - mx_) : 0.f;
                denom += sm_l[w][g] * wts[w];
            }
            for (int i = 0; i < PER_LANE; ++i) {
                float o = 0.f;
                for (int w = 0; w < NWARPS; ++w) o += sm_acc[w][g][lane * PER_LANE + i] * wts[w];
                out[((size_t)b * KVH * G + kvh * G + g) * D + lane * PER_LANE + i] =
                    static_cast<T>(o / denom);
            }
        }
    }
"""

_kernel = None


def _get_kernel():
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(
            name="conveyor_paged_decode_attention",
            input_names=["q", "k_pool", "v_pool", "k_new", "v_new", "block_tables",
                         "context_lens", "scale_in", "width_in", "window_in", "softcap_in"],
            output_names=["out"], source=_SOURCE)
    return _kernel


def paged_decode_attention(q: mx.array, k_pool: mx.array, v_pool: mx.array, k_new: mx.array,
                           v_new: mx.array, block_tables: mx.array, context_lens: mx.array,
                           scale: float, block_size: int, n_kv_heads: int,
                           window: int | None = None, softcap: float | None = None) -> mx.array:
    """q: [B, H, D]; pools: [slots * Hkv, D]; k_new, v_new: [B, Hkv, D], each
    row's new token, which the kernel stores into the pools *in place* at
    position context_lens - 1 (MLX does not see that write: the pools must be
    live, contiguous arrays); block_tables: [B, W] int32; context_lens: [B]
    int32 (tokens to attend, the new one included); `window`: attend only the
    latest `window` of them; `softcap`: scores become softcap * tanh(s / softcap)."""
    batch, heads, dim = q.shape
    width = block_tables.shape[1]
    return _get_kernel()(
        inputs=[q, k_pool, v_pool, k_new.astype(k_pool.dtype), v_new.astype(v_pool.dtype),
                block_tables, context_lens,
                mx.array([scale], dtype=mx.float32), mx.array([width], dtype=mx.int32),
                mx.array([window or 0], dtype=mx.int32),
                mx.array([softcap or 1.0], dtype=mx.float32)],
        template=[("T", q.dtype), ("D", dim), ("G", heads // n_kv_heads), ("KVH", n_kv_heads),
                  ("BS", block_size), ("NWARPS", WARPS), ("UNROLL", UNROLL),
                  ("CAPPED", int(softcap is not None))],
        grid=(batch * n_kv_heads * 32 * WARPS, 1, 1), threadgroup=(32 * WARPS, 1, 1),
        output_shapes=[(batch, heads, dim)], output_dtypes=[q.dtype])[0]


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
    if WARPS * spec.group * (spec.head_dim + 2) * 4 > SHARED_MEMORY:
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
    """Compare with gather + SDPA on random data, with the options the spec's
    model uses (a window crossing block edges, a cap low enough to bend the
    scores); any error means 'no'."""
    windows = (None, 20) if spec.sliding_window else (None,)
    caps = (None, 2.0) if spec.softcap else (None,)
    try:
        return all(_matches(spec, window, cap) for window in windows for cap in caps)
    except Exception as exc:  # a compile or launch failure: fall back
        print(f"conveyor: CUDA paged attention unavailable ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return False


def _matches(spec: AttentionSpec, window: int | None, softcap: float | None) -> bool:
    rng = np.random.default_rng(0)
    dtype, bs, kvh, g, d = (spec.kv_dtype, spec.block_size, spec.num_kv_heads,
                            spec.group, spec.head_dim)
    lens = np.array([1, 17, 33, 90, 96], dtype=np.int32)
    batch, width = len(lens), -(-int(lens.max()) // bs)
    blocks = batch * width + 2
    k_pool = mx.array(rng.normal(size=(blocks * bs * kvh, d)), dtype=dtype)
    v_pool = mx.array(rng.normal(size=(blocks * bs * kvh, d)), dtype=dtype)
    tables = rng.permutation(blocks)[:batch * width].reshape(batch, width).astype(np.int32)
    q = mx.array(rng.normal(size=(batch, kvh * g, d)), dtype=dtype)
    k_new = mx.array(rng.normal(size=(batch, kvh, d)), dtype=dtype)
    v_new = mx.array(rng.normal(size=(batch, kvh, d)), dtype=dtype)
    slots = (tables[:, :, None] * bs + np.arange(bs)).reshape(batch, -1)
    new_rows = (slots[np.arange(batch), lens - 1][:, None] * kvh + np.arange(kvh)).reshape(-1)
    # The reference sees the new tokens written the portable way.
    k_ref, v_ref = mx.array(k_pool), mx.array(v_pool)
    k_ref[mx.array(new_rows)] = k_new.reshape(-1, d)
    v_ref[mx.array(new_rows)] = v_new.reshape(-1, d)
    mx.eval(k_pool, v_pool, k_ref, v_ref)
    got = paged_decode_attention(q, k_pool, v_pool, k_new, v_new, mx.array(tables),
                                 mx.array(lens), d**-0.5, bs, kvh, window, softcap)
    mx.eval(got)
    rows = slots[:, None, :] * kvh + np.arange(kvh)[None, :, None]
    mask = key_mask(np.arange(slots.shape[1]), lens[:, None, None] - 1, window)[:, None]
    ref = attention(q[:, :, None, :], k_ref[mx.array(rows)], v_ref[mx.array(rows)], d**-0.5,
                    mx.array(mask), softcap)[:, :, 0, :]
    err = mx.abs(got.astype(mx.float32) - ref.astype(mx.float32)).max().item()
    # ... and the pools now hold the new tokens, written in place.
    stored = mx.abs(k_pool[mx.array(new_rows)] - k_new.reshape(-1, d)).max().item() + \
        mx.abs(v_pool[mx.array(new_rows)] - v_new.reshape(-1, d)).max().item()
    return err < 2e-2 and stored == 0


@dataclass
class CudaMetadata(PortableMetadata):
    """The portable metadata, with the decode rows' arrays for the kernel."""

    decode_block_tables: mx.array | None = None  # [Bd, W] int32
    decode_context_lens: mx.array | None = None  # [Bd] int32, the new token included


class CudaAttention(PortableAttention):
    """Decode rows through the in-place kernel, the rest through the portable path."""

    name = "cuda"
    # Kernel rows may be padding (they read and write the scratch block), so a
    # decode step can be padded to a bucket of rows and compiled once per bucket.
    compiled_decode = True
    metadata_class = CudaMetadata

    def build(self, common: CommonAttentionMetadata) -> CudaMetadata:
        meta = self._common_part(common)
        nd = common.num_decode
        if nd:
            meta.decode_block_tables = mx.array(common.tables(0, nd).astype(np.int32))
            meta.decode_context_lens = mx.array(common.context_lens[:nd].astype(np.int32))
        return meta

    def decode_graph_inputs(self, meta: CudaMetadata) -> tuple[mx.array, ...]:
        """The arrays a compiled decode step takes (see decode_metadata)."""
        return meta.decode_block_tables, meta.decode_context_lens

    def decode_metadata(self, rows: int, tables: mx.array, context_lens: mx.array,
                        ) -> CudaMetadata:
        """Metadata of a decode-only step of `rows` rows, inside a compiled graph."""
        return CudaMetadata(None, num_decode=rows, decode_block_tables=tables,
                            decode_context_lens=context_lens)

    def attend(self, view, q: mx.array, k: mx.array, v: mx.array, scale: float,
               window: int | None = None, softcap: float | None = None) -> mx.array:
        meta, cache = view.meta, view.cache
        nd, hkv = meta.num_decode, cache.n_kv_heads
        if nd < k.shape[0]:
            # Decode rows store their K/V inside the kernel; the rest (prompt
            # chunks, padding) through MLX first, so the kernel gets the live pools.
            cache.write(view.layer, meta.write_rows[nd * hkv:], k[nd:], v[nd:])
        outs = []
        if nd:
            od = paged_decode_attention(
                q[:nd].astype(cache.dtype), cache.k[view.layer], cache.v[view.layer], k[:nd],
                v[:nd], meta.decode_block_tables, meta.decode_context_lens, scale,
                cache.block_size, hkv, window, softcap)
            outs.append(od.astype(q.dtype))
        return attend_prompts(view, q, scale, outs, window, softcap)
