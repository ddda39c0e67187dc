"""Which device MLX runs on, and which weight format is fastest there.

On the Linux CPU only MLX's fp32 matmul is fast (with the preloaded BLAS;
bf16, fp16 and 4/8-bit matmuls run at 1–6 GFLOP/s against ~180), so quantized
checkpoints leave MLX's quantized layers at load: dequantized to fp32, or kept
as integer codes for Conveyor's own kernel (engine/loader.py decides). On a GPU,
quantized weights stay quantized (less memory traffic) and float weights keep
their dtype.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import mlx.core as mx

from engine.platform import blas

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_logged: set[str] = set()


@dataclass(frozen=True)
class WeightFormat:
    dtype: mx.Dtype
    keep_quantized: bool
    reason: str


def device_name() -> str:
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def on_cpu() -> bool:
    return device_name() == "cpu"


def log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        print(f"conveyor: {message}", file=sys.stderr)


def _config_dtype(config: dict) -> mx.Dtype:
    name = config.get("torch_dtype") or config.get("dtype") or "float16"
    return DTYPES.get(str(name), mx.float16)


def choose_weight_format(quantized: bool, config: dict, dtype: str | None,
                         keep_quantized: bool | None) -> WeightFormat:
    if dtype is not None and dtype not in DTYPES:
        from engine.errors import ConveyorError
        raise ConveyorError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    cpu = on_cpu()
    if keep_quantized is None:
        keep_quantized = quantized and not cpu
    if dtype is None:
        chosen = mx.float32 if cpu else _config_dtype(config)
    else:
        chosen = DTYPES[dtype]
    where = "cpu" + (" + " + blas.loaded().rsplit("/", 1)[-1] if blas.loaded() else "")
    if cpu and not blas.loaded():
        where += " (no optimised BLAS found: matmuls will be slow)"
    if quantized and not keep_quantized:
        what = f"quantized weights dequantized to {_name(chosen)} (--keep-quantized keeps them)"
    elif quantized:
        what = f"quantized weights kept, activations {_name(chosen)}"
    else:
        what = f"weights in {_name(chosen)}"
    return WeightFormat(chosen, keep_quantized,
                        f"{where if cpu else device_name()}: {what}")


def _name(dtype: mx.Dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def raise_cpu_cache_limit(limit: int = 2 << 30) -> None:
    """MLX's CPU buffer cache defaults to 32 MiB: larger arrays (a step's
    activations, gathered K/V) went back to the OS after every use and were
    page-faulted in again (~30 ms for a 44 MB array). Raise it, never lower it."""
    try:
        limit = min(limit, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8)
    except (ValueError, OSError):
        pass
    previous = mx.set_cache_limit(limit)
    if previous > limit:
        mx.set_cache_limit(previous)
