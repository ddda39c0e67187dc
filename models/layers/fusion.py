"""One matmul where a layer has several over the same input: q/k/v become
`qkv_proj` and gate/up become `gate_up_proj` (the forms Phi-3 checkpoints
already have, which Attention and GatedMLP read).

A platform whose per-kernel cost is high (MLX on CUDA launches each op on
its own) asks for this after loading: a Llama layer then runs 12 kernels
instead of 15, and the wide matmul uses the GPU better than three narrow ones.
Only projections of one kind fuse: float weights of one dtype, or quantized
ones with equal bits, group size and mode; biases on all or on none.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from models.layers.attention import Attention
from models.layers.linear import Linear
from models.layers.mlp import GatedMLP


def fuse_projections(model: nn.Module) -> int:
    """Fuse every layer's q/k/v and gate/up projections that can be fused, in
    place; returns how many groups were fused."""
    fused = 0
    for _, module in model.named_modules():
        if isinstance(module, Attention) and "q_proj" in module:
            fused += _replace(module, ("q_proj", "k_proj", "v_proj"), "qkv_proj")
        elif isinstance(module, GatedMLP) and "gate_proj" in module:
            fused += _replace(module, ("gate_proj", "up_proj"), "gate_up_proj")
    return fused


def _replace(module: nn.Module, names: tuple[str, ...], fused_name: str) -> int:
    combined = concatenate([module[name] for name in names])
    if combined is None:
        return 0
    mx.eval(combined.parameters())  # the parts are freed as soon as they are dropped
    for name in names:
        delattr(module, name)
    setattr(module, fused_name, combined)
    return 1


def concatenate(parts: list[nn.Module]) -> nn.Module | None:
    """One linear layer whose output rows are the parts' rows in order, or
    None where the parts differ in kind."""
    first = parts[0]
    with_bias = ["bias" in p for p in parts]
    if any(with_bias) and not all(with_bias):
        return None
    if all(type(p) is Linear for p in parts):
        if len({p.weight.dtype for p in parts}) != 1:
            return None
        out = Linear(first.weight.shape[1], sum(p.weight.shape[0] for p in parts),
                     bias=with_bias[0])
    elif all(type(p) is nn.QuantizedLinear for p in parts):
        kinds = {(p.bits, p.group_size, p.mode, "biases" in p) for p in parts}
        if len(kinds) != 1:
            return None
        # Built at its fused size and then given the parts' arrays (the
        # constructor's random weights are lazy: never computed).
        out = nn.QuantizedLinear(first.scales.shape[1] * first.group_size,
                                 sum(p.scales.shape[0] for p in parts), with_bias[0],
                                 first.group_size, first.bits, mode=first.mode)
        for key in ("scales", "biases"):
            if key in first:
                out[key] = mx.concatenate([p[key] for p in parts], axis=0)
    else:
        return None
    out.weight = mx.concatenate([p.weight for p in parts], axis=0)
    if with_bias[0]:
        out.bias = mx.concatenate([p.bias for p in parts], axis=0)
    return out


def unfused_parameters(model: nn.Module) -> list[tuple[str, mx.array]]:
    """The model's parameters under the names they had before
    `fuse_projections` (each fused array split back into its parts, row
    slices of the same weights), for an oracle that loads them by name."""
    from mlx.utils import tree_flatten

    parts: dict[str, list[tuple[str, int]]] = {}
    for path, module in model.named_modules():
        if isinstance(module, Attention) and "qkv_proj" in module:
            q, kv = module.n_heads * module.head_dim, module.n_kv_heads * module.head_dim
            parts[f"{path}.qkv_proj"] = [("q_proj", q), ("k_proj", kv), ("v_proj", kv)]
        elif isinstance(module, GatedMLP) and "gate_up_proj" in module:
            half = module.gate_up_proj.weight.shape[0] // 2
            parts[f"{path}.gate_up_proj"] = [("gate_proj", half), ("up_proj", half)]
    out = []
    for name, value in tree_flatten(model.parameters()):
        owner, _, leaf = name.rpartition(".")
        if owner not in parts:
            out.append((name, value))
            continue
        parent, start = owner.rpartition(".")[0], 0
        for part, rows in parts[owner]:
            out.append((f"{parent}.{part}.{leaf}", value[start:start + rows]))
            start += rows
    return out
