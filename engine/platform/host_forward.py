"""The CPU fast path: a model's own forward run on host (numpy) arrays, with
every shared layer bound to its C operation (kernels/cpu_ops.c).

A model file composes layers from models/layers with operators only, so the
same `Model.__call__` runs on MLX arrays (the portable path) or on numpy
arrays; here each layer instance gets a `host` function that does its math
in C, with its weights described once at bind time. Nothing here knows an
architecture: a model runs on this path if every module that holds weights
is a layer with a binder below, and otherwise on the portable path, said once.

`bind(..., weight_codes=G)` multiplies float Linear weights as 16-bit integer
codes (groups of G inputs, quantized once here) with int16 activations
(engine/platform/weight_codes.py); the MLX module keeps its float weights, so
its portable forward stays the float32 reference.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.platform import weight_codes
from engine.platform.cpu_ops import CpuOps, HostMatmul
from engine.platform.int8_linear import Int8Embedding, Int8Linear
from engine.platform.int8_matmul import concat, parts_of
from models.layers import (
    MLP,
    Activation,
    Attention,
    Embedding,
    GatedActivation,
    GatedMLP,
    Layer,
    LayerNorm,
    Linear,
    RMSNorm,
    RoPE,
    SoftCap,
)


class Unsupported(Exception):
    """A layer (or a setting of one) this path has no kernel for."""


def _host(a: mx.array) -> np.ndarray:
    """A float32 host copy/view of an MLX array."""
    if a.dtype != mx.float32:
        raise Unsupported(f"{a.dtype} weights (the CPU path multiplies float32 or integer codes)")
    return np.array(a, copy=False)


def _matmul(layer, codes: int | None = None) -> HostMatmul:
    """The layer's weight as the C code multiplies it; `codes` (a group size)
    turns a float weight into 16-bit codes for int16 activations."""
    bias = _host(layer.bias) if "bias" in layer else None
    if isinstance(layer, Int8Linear):
        return HostMatmul(layer.packed, bias)
    weight = _host(layer.weight)
    if codes is None:
        return HostMatmul(weight, bias)
    if not weight_codes.supports(codes, weight.shape[1], weight.shape[0]):
        raise Unsupported(f"16-bit codes for a {list(weight.shape)} weight in groups of {codes}")
    return HostMatmul(weight_codes.pack(weight, codes), bias)


def bind_linear(layer: Linear, ops: CpuOps, codes: int | None = None):
    m = _matmul(layer, codes)
    return lambda x: ops.linear(m, x)


def bind_rms_norm(layer: RMSNorm, ops: CpuOps):
    weight = np.ascontiguousarray(_host(layer.weight) + np.float32(layer.offset))
    eps = float(layer.eps)
    return lambda x: ops.rms_norm(x, weight, eps)


def bind_layer_norm(layer: LayerNorm, ops: CpuOps):
    weight = _host(layer.weight)
    bias = _host(layer.bias) if "bias" in layer else None
    eps = float(layer.eps)
    return lambda x: ops.layer_norm(x, weight, bias, eps)


def bind_activation(layer: Activation, ops: CpuOps):
    return lambda x: ops.act_mul(layer.name, x.copy())


def bind_softcap(layer: SoftCap):
    # Only the rows that get logits pass here (a few per step): numpy suffices.
    cap = np.float32(layer.cap)
    return lambda x: np.tanh(x / cap) * cap


def bind_gated_activation(layer: GatedActivation, ops: CpuOps):
    # The gate is a fresh projection output: act(gate) * up is written into it.
    return lambda gate, up: ops.act_mul(layer.name, gate, up)


class _RotaryTable:
    """cos/sin of one RoPE's angles for a step's positions, computed once per
    step and shared by q and k of every layer using an identical RoPE."""

    def __init__(self, rope: RoPE):
        self.rope = rope
        self.mscale = rope.mscale
        self.positions = None
        self.cos = self.sin = None

    def __call__(self, positions: np.ndarray):
        if positions is not self.positions:
            angles = self.rope.angles(positions)
            self.cos = np.ascontiguousarray(np.cos(angles) * self.mscale, np.float32)
            self.sin = np.ascontiguousarray(np.sin(angles) * self.mscale, np.float32)
            self.positions = positions
        return self.cos, self.sin


def bind_rope(layer: RoPE, ops: CpuOps, tables: dict):
    key = layer.schedule()
    table = tables.setdefault(key, _RotaryTable(layer))
    dims, traditional = layer.dims, layer.traditional
    if dims % 2:
        raise Unsupported(f"RoPE over an odd number of dims ({dims})")

    def rope(x, positions):
        cos, sin = table(positions)
        return ops.rope(x, cos, sin, dims, traditional)
    return rope


def bind_embedding(layer, ops: CpuOps):
    if isinstance(layer, Embedding):
        table = _host(layer.weight)
        scale = np.float32(layer.scale) if layer.scale else None

        def lookup(ids):
            x = table[ids]
            return x * scale if scale is not None else x
        return lookup
    # Quantized lookup in MLX (one small gather), handed back as host rows.
    return lambda ids: np.array(layer.forward(mx.array(ids)).astype(mx.float32))


def _fuse_checkpoint_codes(projections) -> HostMatmul | None:
    """One matmul over a checkpoint's integer codes of `projections` (same
    input, no bias), the layers then reading views into the fused copy so
    each weight stays in memory once; None where their tiles don't line up."""
    if not all(isinstance(p, Int8Linear) and "bias" not in p for p in projections):
        return None
    packed = [p.packed for p in projections]
    fused_packed = concat(packed)
    if fused_packed is None:
        return None
    for projection, part in zip(projections, parts_of(fused_packed, packed)):
        projection.share_packed(part)
    return HostMatmul(fused_packed)


def _fuse(projections, codes: int | None) -> tuple[HostMatmul, list[int]] | None:
    """The projections of one input as one matmul and each one's width, where
    that keeps one copy of every weight: a checkpoint's integer codes (fused,
    then viewed by the layers) or 16-bit codes made here (which exist only in
    the fused form). Float weights are not fused. One wide matmul keeps both
    cores busy where narrow ones (k, v) left them half idle."""
    fused = _fuse_checkpoint_codes(projections)
    if fused is not None:
        return fused, [p.packed.out_dim for p in projections]
    if codes is None:
        return None
    parts = [_matmul(m, codes) for m in projections]
    fused = HostMatmul.fused(parts)
    return None if fused is None else (fused, [p.out_dim for p in parts])


def bind_attention(layer: Attention, ops: CpuOps, codes: int | None = None):
    """Attention keeps its generic forward (projections, norms, RoPE, cache),
    each part on its own binding; q/k/v are one matmul where `_fuse` allows,
    or as the checkpoint has them (`qkv_proj`)."""
    heads = (layer.n_heads, layer.n_kv_heads, layer.n_kv_heads)
    if "qkv_proj" in layer:
        fused = _matmul(layer.qkv_proj, codes)
        widths = [h * layer.head_dim for h in heads]
    else:
        fused = _fuse([layer.q_proj, layer.k_proj, layer.v_proj], codes)
        if fused is None:
            return None
        fused, widths = fused
    layer.project_host = _split_projection(ops, fused, widths, heads, layer.head_dim)
    return None


def _split_projection(ops: CpuOps, fused: HostMatmul, widths, heads, head_dim: int):
    """q, k, v from one matmul, each written to its own contiguous array."""
    def project(x):
        outs = ops.linear_split(fused, x, widths)
        return tuple(o.reshape(-1, h, head_dim) for o, h in zip(outs, heads))
    return project


def bind_gated_mlp(layer: GatedMLP, ops: CpuOps, codes: int | None = None):
    """gate and up as one matmul, the activation written into the gate's
    fresh output: the checkpoint's own (`gate_up_proj`), or fused where
    `_fuse` allows."""
    if "gate_up_proj" in layer:
        fused = _matmul(layer.gate_up_proj, codes)
        widths = [fused.out_dim // 2] * 2
    else:
        fused = _fuse([layer.gate_proj, layer.up_proj], codes)
        if fused is None:
            return None
        fused, widths = fused
    down, kind = _matmul(layer.down_proj, codes), layer.act.name

    def mlp(x):
        gate, up = ops.linear_split(fused, x, widths)
        return ops.linear(down, ops.act_mul(kind, gate, up))
    return mlp


def bind_mlp(layer: MLP, ops: CpuOps, codes: int | None = None):
    """down(act(up(x))) with the activation in place on up's fresh output
    (the Activation layer's own binding has to copy its input)."""
    up, down, kind = _matmul(layer.up_proj, codes), _matmul(layer.down_proj, codes), \
        layer.act.name
    return lambda x: ops.linear(down, ops.act_mul(kind, ops.linear(up, x)))


def _binders(ops: CpuOps, tables: dict, codes: int | None):
    return {
        Linear: lambda m: bind_linear(m, ops, codes),
        Int8Linear: lambda m: bind_linear(m, ops),
        RMSNorm: lambda m: bind_rms_norm(m, ops),
        LayerNorm: lambda m: bind_layer_norm(m, ops),
        Activation: lambda m: bind_activation(m, ops),
        GatedActivation: lambda m: bind_gated_activation(m, ops),
        SoftCap: bind_softcap,
        RoPE: lambda m: bind_rope(m, ops, tables),
        Embedding: lambda m: bind_embedding(m, ops),
        Int8Embedding: lambda m: bind_embedding(m, ops),
        Attention: lambda m: bind_attention(m, ops, codes),
        GatedMLP: lambda m: bind_gated_mlp(m, ops, codes),
        MLP: lambda m: bind_mlp(m, ops, codes),
    }


def _own_arrays(module: nn.Module) -> list[str]:
    return [k for k, v in module.items() if isinstance(v, mx.array)]


def bind(model: nn.Module, ops: CpuOps, *, weight_codes: int | None = None) -> str | None:
    """Bind every layer of `model` to its host operation. Returns None on
    success, else why the model can't run here (and leaves it unbound).
    `weight_codes` (a group size, at most 64): float Linear weights run as
    16-bit codes with int16 activations (where the integer kernel runs here)."""
    if weight_codes is not None and not ops.integer_codes:
        return "integer codes need the AVX-512 VNNI kernel, which this CPU lacks"
    binders, bound = _binders(ops, {}, weight_codes), []
    try:
        for name, module in model.named_modules():
            binder = binders.get(type(module))
            if binder is None:
                # Modules that only compose others (blocks, composite layers)
                # need no kernel; one with weights or math of its own does.
                leaf_op = isinstance(module, Layer) and not module.children()
                if leaf_op or _own_arrays(module):
                    raise Unsupported(f"layer {name or 'model'} ({type(module).__name__}) "
                                      "has no CPU kernel")
                continue
            host = binder(module)
            bound.append(module)
            if host is not None:
                module.host = host
            if isinstance(module, (Embedding, Int8Embedding)):
                head = HostMatmul(module.packed) if isinstance(module, Int8Embedding) \
                    else HostMatmul(_host(module.weight))
                module.host_as_linear = lambda x, head=head: ops.linear(head, x)
    except Unsupported as exc:
        unbind(bound)
        return str(exc)
    return None


def unbind(modules) -> None:
    for module in modules:
        module.host = None
        if hasattr(module, "project_host"):
            module.project_host = None
        if hasattr(module, "host_as_linear"):
            module.host_as_linear = None


class HostForward:
    """The model runner's CPU forward: packed numpy inputs and the cache's
    per-layer views (which offer `attend_host`), logits out as MLX."""

    def __init__(self, model: nn.Module, ops: CpuOps):
        self.model = model
        self.ops = ops  # what the layers were bound to (its `threads` among them)

    @classmethod
    def build(cls, model: nn.Module, ops: CpuOps | None) -> tuple[HostForward | None, str]:
        """(the forward, "") or (None, why not)."""
        if ops is None:
            return None, "the CPU kernels are not available"
        why = bind(model, ops)
        return (None, why) if why else (cls(model, ops), "")

    def __call__(self, input_ids: np.ndarray, positions: np.ndarray, views,
                 logits_index: np.ndarray) -> mx.array:
        logits = self.model(np.asarray(input_ids), np.asarray(positions), views,
                            logits_index=np.asarray(logits_index))
        return mx.array(logits)
