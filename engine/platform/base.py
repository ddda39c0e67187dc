"""The device MLX computes on, decided once per engine and passed down.

`Platform.detect()` (or `engine.platform.current_platform()`) picks one of
CpuPlatform (engine/platform/cpu.py), CudaPlatform, MetalPlatform, or this
portable base. The engine hands it to the loader (weight format, integer
matmuls, buffer cache), the KV cache (which attention backend), the model
runner (compiled decode steps, the host forward), the sampler (which
helpers) and the embedder (its CPU fast path). No other module asks which device it
is on; a subclass overrides only what its device does better, and what it
cannot do falls back to the portable pieces defined here, said once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from engine.errors import ConveyorError, ModelLoadError, RequestError
from kvcache.attention.backend import AttentionBackend
from kvcache.attention.metadata import AttentionSpec
from kvcache.attention.portable import PortableAttention

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
CPU_MATMULS = ("float32", "int16", "int8")
_logged: set[str] = set()
_detected: dict[str, Platform] = {}


def log(message: str) -> None:
    """Print `conveyor: message` to stderr, as every start-up line is."""
    print(f"conveyor: {message}", file=sys.stderr, flush=True)


def log_once(message: str) -> None:
    """`log(message)` the first time it is seen."""
    if message not in _logged:
        _logged.add(message)
        log(message)


@dataclass(frozen=True)
class WeightFormat:
    dtype: mx.Dtype
    keep_quantized: bool
    reason: str


@dataclass(frozen=True)
class SamplerKernels:
    """How the sampler runs its whole-vocabulary passes."""

    # e^x as the vectorised polynomial of engine/platform/fast_math.py (MLX's
    # CPU exp runs one scalar at a time).
    fast_exp: bool = False
    # C helpers over host memory (engine/platform/cpu_sampling.py), or None.
    host: Any = None


PORTABLE_SAMPLING = SamplerKernels()


@dataclass(frozen=True)
class DeviceMemory:
    """What the memory plan (engine/core/memory_plan.py) counts on, in bytes:
    the KV pool may take utilization x `capacity`, less `in_use` and a step's
    activations."""

    capacity: int
    in_use: int
    name: str  # as the printed plan names it ("GPU memory", "available RAM")


def dtype_name(dtype: mx.Dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


class Platform:
    """Portable MLX: correct on any device, with no device-specific tricks."""

    name = "portable"
    kv_cache_bytes = 2 << 30       # the KV budget where the device's memory is unknown
    # Share of device_memory().capacity the engine may fill (vLLM's
    # gpu_memory_utilization): weights, a step's activations and the KV pool.
    memory_utilization = 0.9
    kv_cache_ceiling: int | None = None  # the most KV a default plan gives (None: no limit)
    profile_tokens: int | None = None  # the plan's dummy step, if shorter than a full one
    max_num_batched_tokens = 2048  # default tokens a step
    compile_decode = False         # compile pure-decode steps (when the backend allows)
    async_scheduling = False       # plan step N+1 while the device runs step N
    keeps_quantized = True         # quantized weights stay quantized by default
    # Group sizes MLX's quantized matmul takes here (others are dequantized at load).
    quantized_group_sizes = (32, 64, 128)
    # Element-wise math (exp, erf, sigmoid) through the vectorised versions in
    # engine/platform/fast_math.py: MLX's CPU evaluates those one scalar at a time.
    fast_math = False

    # q/k/v and gate/up as one matmul each (models/layers/fusion.py), where
    # every kernel launch costs the host more than the narrow matmuls save.
    fuse_projections = False

    def __init__(self, device: mx.Device):
        self.device = device

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device})"

    @staticmethod
    def detect() -> Platform:
        """The platform of MLX's default device, made once per device."""
        device = mx.default_device()
        key = str(device)
        if key not in _detected:
            from engine.platform.cpu import CpuPlatform
            from engine.platform.cuda import CudaPlatform
            from engine.platform.metal import MetalPlatform

            cuda = getattr(mx, "cuda", None)  # absent from some builds
            if device == mx.cpu:
                kind = CpuPlatform
            elif mx.metal.is_available():
                kind = MetalPlatform
            elif cuda is not None and cuda.is_available():
                kind = CudaPlatform
            else:
                kind = Platform
            _detected[key] = kind(device)
        return _detected[key]

    def describe(self) -> str:
        """Where this runs, as the one-time log lines name it."""
        return self.name

    def log_once(self, message: str) -> None:
        log_once(message)

    # -- loading -----------------------------------------------------------
    def default_dtype(self, config: dict) -> mx.Dtype:
        """Compute dtype when the user names none: the checkpoint's own."""
        name = config.get("torch_dtype") or config.get("dtype") or "float16"
        return DTYPES.get(str(name), mx.float16)

    def weight_format(self, quantized: bool, config: dict, dtype: str | None,
                      keep_quantized: bool | None) -> WeightFormat:
        """Which dtype the weights get and whether quantized ones stay so."""
        if dtype is not None and dtype not in DTYPES:
            raise ConveyorError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        if keep_quantized is None:
            keep_quantized = quantized and self.keeps_quantized
        chosen = self.default_dtype(config) if dtype is None else DTYPES[dtype]
        if quantized and not keep_quantized:
            what = (f"quantized weights dequantized to {dtype_name(chosen)} "
                    "(--keep-quantized keeps them)")
        elif quantized:
            what = f"quantized weights kept, activations {dtype_name(chosen)}"
        else:
            what = f"weights in {dtype_name(chosen)}"
        return WeightFormat(chosen, keep_quantized, f"{self.describe()}: {what}")

    def integer_matmul(self, fmt: WeightFormat, choice: str | None) -> tuple[Any, bool] | None:
        """(kernel, wide activations) when quantized codes should be
        multiplied as integers, else None (dequantize). CPU only."""
        check_cpu_matmul(choice)
        if choice in ("int16", "int8"):
            raise ModelLoadError(f"cpu_matmul={choice} runs on the CPU with float32 compute")
        return None

    def prepare_model(self, model) -> None:
        """This device's forms of a model's layers, made once before it runs:
        fused projections where the platform asks for them."""
        if self.fuse_projections:
            from models.layers.fusion import fuse_projections

            fuse_projections(model)

    def prepare_memory(self) -> None:
        """Tune MLX's allocator before a model runs (nothing by default)."""

    # -- the engine --------------------------------------------------------
    def device_memory(self) -> DeviceMemory | None:
        """The device's memory now, or None where it is unknown (the plan then
        takes the fixed `kv_cache_bytes`)."""
        return None

    def peak_bytes_during(self, prepare: Callable[[], Callable[[], None]]) -> int:
        """The most bytes a dummy step held at once beyond what was held before
        it ran, by MLX's allocator: `prepare()` allocates what the step needs
        beforehand (its pool) and returns what runs it. All of it goes back to
        the device afterwards, before the real pool is allocated."""
        run = prepare()
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        run()
        peak = mx.get_peak_memory() - base
        del run  # the dummy pool with it
        mx.clear_cache()
        return max(0, peak)

    def attention_backend(self, spec: AttentionSpec,
                          paged_kernel: bool | None = None) -> AttentionBackend:
        """The fastest attention backend that serves `spec` here; the
        portable one when `paged_kernel` is False or none fits (said once)."""
        if paged_kernel is not False:
            backend, why_not = self.fast_attention(spec)
            if backend is not None:
                return backend
            if why_not:
                self.log_once(f"{why_not}: attention runs on the portable MLX path (slower)")
        return PortableAttention(spec)

    def fast_attention(self, spec: AttentionSpec) -> tuple[AttentionBackend | None, str | None]:
        """This device's own attention backend for `spec`, or (None, why not)."""
        return None, None

    def host_forward(self, model, backend: AttentionBackend, wanted: bool | None = None):
        """A forward over host memory with `forward(ids, positions, views,
        logits_index) -> logits`, or None to keep the model's MLX forward;
        `wanted=True` makes its absence an error."""
        if wanted:
            raise RequestError(HOST_FORWARD_NEEDS)
        return None

    def sampler_kernels(self) -> SamplerKernels:
        return PORTABLE_SAMPLING

    def bind_encoder(self, model, cpu_matmul: str | None = None, required: bool = False):
        """Bind an encoder's layers to this device's host kernels once:
        (ops, matmul kind), or (None, None) for the portable MLX path. Only
        the CPU has such kernels."""
        if required or cpu_matmul is not None:
            raise ModelLoadError("the embedding fast path and cpu_matmul are for the CPU")
        return None, None


HOST_FORWARD_NEEDS = ("host_forward: the CPU fast path runs on the CPU only, with its "
                      "attention kernel and the preloaded BLAS")


def check_cpu_matmul(choice: str | None) -> None:
    if choice is not None and choice not in CPU_MATMULS:
        raise ModelLoadError(f"unknown cpu_matmul {choice!r}; choose from {', '.join(CPU_MATMULS)}")
