"""The llama forward on the CPU in host memory (cpu_llama.c), for speed.

Same math as models/llama.py, the portable MLX path that tests compare it
against. Each layer is two C calls around the cache view's host attention
(`view.attend_host(q, k, v, scale)`, numpy in and out), so a step has no MLX
evaluation until the LM head: MLX's CPU backend spent ~1.7 ms a layer of a
64-row decode step on the element-wise ops and hand-offs between kernels.

Weights stay where the loaded model has them: float32 MLX arrays are read
through numpy views (cblas_sgemm from the preloaded BLAS), int8-packed layers
(engine/platform/int8_linear.py) through their packed codes. `HostLlama.build`
returns None where this path can't run (no native kernels or BLAS, other
dtypes or layer kinds), and the engine keeps the MLX forward.
"""

from __future__ import annotations

import ctypes
import functools
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.platform.int8_linear import Int8Embedding, Int8Linear
from engine.platform.int8_matmul import concat
from models.layers.linear import Linear

_F32 = ctypes.POINTER(ctypes.c_float)


class _Matmul(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("codes", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("biases", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("out_dim", ctypes.c_int), ("in_dim", ctypes.c_int),
                ("group_size", ctypes.c_int), ("wide", ctypes.c_int)]


def _host(a: mx.array) -> np.ndarray:
    """A numpy view of an evaluated float32 MLX array (no copy)."""
    return np.array(a, copy=False)


def _pointer(a: np.ndarray, keep: list[np.ndarray]) -> int:
    """a's data address; `keep` holds a for as long as the C code may read it."""
    keep.append(a)
    return a.ctypes.data


def _packed_matmul(w, bias: int | None, keep: list[np.ndarray]) -> _Matmul:
    return _Matmul(None, _pointer(w.codes, keep), _pointer(w.scales, keep),
                   _pointer(w.biases, keep), bias, w.out_dim, w.in_dim, w.group_size,
                   int(w.wide))


def _matmul(layer, keep: list[np.ndarray]) -> _Matmul:
    """A linear layer (or tied embedding) as the C code multiplies it."""
    bias = _pointer(_host(layer.bias), keep) if "bias" in layer else None
    if isinstance(layer, (Int8Linear, Int8Embedding)):
        return _packed_matmul(layer.packed, bias, keep)
    weight = _host(layer.weight)
    return _Matmul(_pointer(weight, keep), None, None, None, bias, weight.shape[0],
                   weight.shape[1], 0, 0)


def _fused_qkv(attn, keep: list[np.ndarray]) -> _Matmul | None:
    """Packed q/k/v weights as one matmul (no biases), else None."""
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    if not all(isinstance(x, Int8Linear) and "bias" not in x for x in layers):
        return None
    fused = concat([x.packed for x in layers])
    return None if fused is None else _packed_matmul(fused, None, keep)


class _Layer:
    """One decoder layer's weights as the C code takes them; keeps the numpy
    arrays alive for as long as the pointers are used."""

    def __init__(self, block):
        attn, mlp = block.self_attn, block.mlp
        self.keep: list[np.ndarray] = []
        self.q, self.k, self.v, self.o = (_matmul(getattr(attn, n), self.keep)
                                          for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.qkv = _fused_qkv(attn, self.keep)
        self.gate, self.up, self.down = (_matmul(getattr(mlp, n), self.keep)
                                         for n in ("gate_proj", "up_proj", "down_proj"))
        self.norm_in = _pointer(_host(block.input_layernorm.weight), self.keep)
        self.norm_post = _pointer(_host(block.post_attention_layernorm.weight), self.keep)
        self.eps_in = block.input_layernorm.eps
        self.eps_post = block.post_attention_layernorm.eps


def _supported(model) -> bool:
    layers = model.layers
    if not layers or model.model.norm.weight.dtype != mx.float32:
        return False
    rope = layers[0].self_attn.rope
    if rope.dims != model.args.head_dim:
        return False
    parts = [model.model.embed_tokens if model.args.tie_word_embeddings else model.lm_head]
    for block in layers:
        parts += [getattr(block.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        parts += [getattr(block.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    return all(_host_layer(p) for p in parts)


def _host_layer(layer) -> bool:
    """Weights the C code can multiply: float32 or int8-packed."""
    if isinstance(layer, (Int8Linear, Int8Embedding)):
        return True
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return False
    return isinstance(layer, (Linear, nn.Linear, nn.Embedding)) and \
        layer.weight.dtype == mx.float32 and layer.weight.ndim == 2


@functools.lru_cache(maxsize=1)
def _library():
    """The native kernels with the C forward's functions typed, or None
    (no native kernels, or no BLAS for its float32 matmuls)."""
    from engine.platform import blas, native

    lib = native.library()
    if lib is None or blas.sgemm_address() is None:
        return None
    m = ctypes.POINTER(_Matmul)
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.layer_in.argtypes = [p, i, i, p, f, m, m, m, m, p, p, i, i, i, i, p, p, p, p, i]
    lib.layer_out.argtypes = [p, p, i, i, m, p, f, m, m, m, p, p, p, i]
    lib.layer_in.restype = lib.layer_out.restype = ctypes.c_int
    lib.lm_head.argtypes = [p, i, p, i, p, f, m, p, p, i]
    lib.lm_head.restype = ctypes.c_int
    return lib


class HostLlama:
    """Callable like Model with a list of cache views that offer `attend_host`."""

    def __init__(self, model, lib, threads: int):
        self.model, self.lib, self.threads = model, lib, threads
        args = model.args
        self.dim, self.heads, self.kv_heads = args.hidden_size, args.num_attention_heads, \
            args.num_key_value_heads
        self.head_dim, self.hidden = args.head_dim, args.intermediate_size
        self.scale = args.head_dim ** -0.5
        self.layers = [_Layer(b) for b in model.layers]
        rope = model.layers[0].self_attn.rope
        self.traditional = bool(rope.traditional)
        self.inv_freq = np.array(rope.angle_rates(), np.float64)
        self.embed = model.model.embed_tokens
        self.table = None if isinstance(self.embed, Int8Embedding) else _host(self.embed.weight)
        self.norm = _host(model.model.norm.weight)
        self.norm_eps = model.model.norm.eps
        self.keep: list[np.ndarray] = []
        self.head = _matmul(self.embed if args.tie_word_embeddings else model.lm_head, self.keep)

    @classmethod
    def build(cls, model) -> HostLlama | None:
        if not _supported(model):
            return None
        lib = _library()
        return None if lib is None else cls(model, lib, os.cpu_count() or 1)

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        if self.table is not None:
            return self.table[ids]
        return np.array(self.embed(mx.array(ids)).astype(mx.float32))

    def __call__(self, input_ids: np.ndarray, positions: np.ndarray, views,
                 logits_index: np.ndarray) -> mx.array:
        """Logits [len(logits_index), vocab] (lazy MLX) for packed tokens."""
        n, lib, t = len(input_ids), self.lib, self.threads
        h = np.ascontiguousarray(self._embed(input_ids), np.float32)
        angles = positions.astype(np.float64)[:, None] * self.inv_freq[None, :]
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        xn = np.empty((n, self.dim), np.float32)  # each RMSNorm's output
        q = np.empty((n, self.heads, self.head_dim), np.float32)
        k = np.empty((n, self.kv_heads, self.head_dim), np.float32)
        v = np.empty_like(k)
        g = np.empty((n, self.hidden), np.float32)
        u = np.empty_like(g)
        ptr = _ptr
        for layer, view in zip(self.layers, views):
            rc = lib.layer_in(ptr(h), n, self.dim, layer.norm_in, layer.eps_in, layer.qkv,
                              layer.q, layer.k, layer.v, ptr(cos), ptr(sin), self.heads,
                              self.kv_heads, self.head_dim, self.traditional, ptr(xn), ptr(q),
                              ptr(k), ptr(v), t)
            _check(rc)
            out = np.ascontiguousarray(view.attend_host(q, k, v, self.scale), np.float32)
            rc = lib.layer_out(ptr(out), ptr(h), n, self.dim, layer.o, layer.norm_post,
                               layer.eps_post, layer.gate, layer.up, layer.down, ptr(xn),
                               ptr(g), ptr(u), t)
            _check(rc)
        index = np.ascontiguousarray(logits_index, np.int32)
        last = np.empty((len(index), self.dim), np.float32)
        logits = np.empty((len(index), self.head.out_dim), np.float32)
        _check(lib.lm_head(ptr(h), self.dim, ptr(index), len(index), ptr(self.norm),
                           self.norm_eps, self.head, ptr(last), ptr(logits), t))
        return mx.array(logits)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _check(rc: int) -> None:
    if rc == -3:
        raise RuntimeError("CPU forward: the native kernels were given no cblas_sgemm")
    if rc != 0:
        raise MemoryError("CPU forward: no scratch memory")
