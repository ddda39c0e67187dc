"""numpy stand-ins for device kernels, so their Python plumbing (inputs,
layouts, template, the engine around them) is tested on the CPU: they
compute what the kernel computes from the same arguments. The kernels
themselves are checked against the portable path on the device (their
start-up `verify`, bench/gpu_check.py)."""

import mlx.core as mx
import numpy as np

from engine.platform.cpu import CpuPlatform
from engine.platform.kernel_constants import bits_float


class EmulatedCuda(CpuPlatform):
    """The CPU with the CUDA attention backend (its kernel emulated where a
    test patches `kvcache.attention.cuda._get_kernel`); `fuse_projections`
    as CUDA's when a subclass sets it."""

    def fast_attention(self, spec):
        from kvcache.attention import cuda

        return cuda.CudaAttention(spec), None


def rotate_with_tables(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, traditional: bool):
    """RoPE as the CUDA attention kernel applies it: x [N, heads, D] rotated
    with RoPE.cos_sin's rows [N, D/2]."""
    c, s = cos[:, None, :], sin[:, None, :]
    if traditional:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * c - b * s, b * c + a * s
        return out
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def _rows(src, n: int, stride: int, offset: int, heads: int, dim: int) -> np.ndarray:
    """[n, heads, dim] from packed rows of `src` (row i at i * stride + offset)."""
    flat = np.array(src.astype(mx.float32)).reshape(-1)
    return np.stack([flat[i * stride + offset:i * stride + offset + heads * dim]
                     for i in range(n)]).reshape(n, heads, dim)


def emulated_cuda_kernel(form="scalar", ignore_window=False, calls=None):
    """What kvcache/attention/cuda.py's kernel of `form` computes, from the
    same inputs and template. "scalar": q/k/v read from their packed rows
    (rotated first when ROTATE), every packed token's K/V stored in place,
    then each token attends over its own window (padding, at position -1,
    gets zeros). The tensor-core pair splits that: "store" rotates and
    stores, "tensor_cores" rotates q and attends from the pools (storing
    first itself where STORE_OWN: a step of decode rows only). `calls` (a
    list) collects each launch's template, its form under "form"."""
    def kernel(inputs, template, output_shapes, output_dtypes, **launch):
        t = dict(template)
        if calls is not None:
            calls.append({**t, "form": form})
        assert launch["grid"][0] > 0, "an empty grid is an invalid CUDA launch"
        if form == "store":
            k_src, v_src, tables, table_of, positions, cos, sin, k_pool, v_pool = inputs
            _store(t, k_src, v_src, tables, table_of, positions, cos, sin, k_pool, v_pool)
            return [mx.array([1], dtype=mx.int32)]
        if form == "tensor_cores":
            (q_src, k_pool, v_pool, k_src, v_src, tables, table_of, positions, cos, sin, _,
             runs) = inputs
            _check_runs(np.array(runs), np.array(table_of), np.array(positions), t["G"],
                        t["NWARPS"], launch["grid"][0] // (32 * t["KVH"]))
            if t["STORE_OWN"]:  # decode rows only: each its own chunk, a run alone
                assert list(np.array(table_of)) == list(range(len(table_of)))
                assert (np.array(runs) & 31).max() == 1
                _store(t, k_src, v_src, tables, table_of, positions, cos, sin, k_pool, v_pool)
        else:
            q_src, k_pool, v_pool, k_src, v_src, tables, table_of, positions, _, cos, sin = inputs
            _store(t, k_src, v_src, tables, table_of, positions, cos, sin, k_pool, v_pool)
        n = output_shapes[0][0]
        q = _rows(q_src, n, t["Q_STRIDE"], t["Q_OFF"], t["KVH"] * t["G"], t["D"])
        if t["ROTATE"]:
            q = rotate_with_tables(q, np.array(cos), np.array(sin), bool(t["TRAD"]))
        out = _attend(t, q, k_pool, v_pool, tables, table_of, positions, ignore_window)
        return [mx.array(out).astype(output_dtypes[0])]
    return kernel


def _check_runs(groups, table_of, positions, group, warps, grid_warps):
    """The tensor-core form's `groups` (cuda.warp_runs): a run a warp, a
    block's warps naming one run (split) or runs of their own (solo, spare
    warps -1); the runs (cuda.row_runs) cover every row that attends exactly
    once, each within one chunk and 16 // group rows; the grid has a warp an
    entry."""
    assert len(groups) % warps == 0 and grid_warps == len(groups)
    runs = []
    for block in groups.reshape(-1, warps):
        if (block == block[0]).all():
            runs.append(block[0])
        else:
            assert len(set(block[block >= 0])) == (block >= 0).sum(), block
            runs.extend(block[block >= 0])
    runs = np.array(runs)
    first, count = runs >> 5, runs & 31
    if count.min() == 0:  # the one empty run of a step with no attending row
        assert len(runs) == 1 and (table_of < 0).all(), runs
        return
    covered = np.concatenate([np.arange(f, f + c) for f, c in zip(first, count)])
    attends = np.flatnonzero(table_of >= 0)
    assert sorted(covered) == list(attends), (covered, attends)
    assert count.max() <= max(1, 16 // group)
    for f, c in zip(first, count):
        assert len(set(table_of[f:f + c])) == 1
        assert c == 1 or list(positions[f:f + c]) == list(range(positions[f], positions[f] + c))


def _slots(t, tables, table_of):
    """Each packed token's slots by position, and which rows only store."""
    tables, table_of = np.array(tables), np.array(table_of)
    store_only = table_of < 0  # complemented: store K/V, attend nothing
    table_of = np.where(store_only, ~table_of, table_of)
    bs = t["BS"]
    return [(tables[r][:, None] * bs + np.arange(bs)).reshape(-1) for r in table_of], store_only


def _store(t, k_src, v_src, tables, table_of, positions, cos, sin, k_pool, v_pool):
    kvh, dim, n = t["KVH"], t["D"], positions.shape[0]
    k_new = _rows(k_src, n, t["K_STRIDE"], t["K_OFF"], kvh, dim)
    v_new = _rows(v_src, n, t["V_STRIDE"], t["V_OFF"], kvh, dim)
    if t["ROTATE"]:
        k_new = rotate_with_tables(k_new, np.array(cos), np.array(sin), bool(t["TRAD"]))
    pools = [np.asarray(k_pool), np.asarray(v_pool)]  # the pools' memory, as the GPU's
    slot_of, _ = _slots(t, tables, table_of)
    for i, pos in enumerate(np.array(positions)):
        if pos >= 0:
            for pool, new in zip(pools, (k_new, v_new)):
                pool[slot_of[i][pos] * kvh:(slot_of[i][pos] + 1) * kvh] = new[i]


def _attend(t, q, k_pool, v_pool, tables, table_of, positions, ignore_window):
    kvh, group, window = t["KVH"], t["G"], t["WINDOW"]
    pools = [np.asarray(k_pool), np.asarray(v_pool)]
    scale, cap = bits_float(t["SCALE_BITS"]), bits_float(t["CAP_BITS"])
    slot_of, store_only = _slots(t, tables, table_of)
    out = np.zeros(q.shape, np.float32)
    for i, pos in enumerate(np.array(positions)):
        first = max(pos + 1 - window, 0) if window and not ignore_window else 0
        slots = slot_of[i][first:pos + 1]
        for h in range(kvh * group if pos >= 0 and not store_only[i] else 0):
            s = pools[0][slots * kvh + h // group] @ q[i, h] * scale
            s = cap * np.tanh(s / cap) if cap else s
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ pools[1][slots * kvh + h // group]
    return out


def emulated_add_rms_norm_kernel(calls=None):
    """What engine/platform/cuda_norm.py's kernel computes: h = x + delta in
    the activation dtype, and h's RMSNorm times the weight."""
    def kernel(inputs, template, output_shapes, output_dtypes, **launch):
        x, delta, weight = inputs
        t = dict(template)
        if calls is not None:
            calls.append(t)
        h = (x + delta).astype(output_dtypes[0])
        hf = np.array(h.astype(mx.float32))
        r = 1 / np.sqrt((hf * hf).mean(axis=-1, keepdims=True) + bits_float(t["EPS_BITS"]))
        y = hf * r * np.array(weight.astype(mx.float32))
        return [h, mx.array(y).astype(output_dtypes[1])]
    return kernel
