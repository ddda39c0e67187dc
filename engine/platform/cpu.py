"""The Linux CPU: MLX's fp32 matmuls through the preloaded BLAS, plus
Conveyor's native kernels (attention, integer matmuls, the llama forward in
host memory, the sampler's helpers) wherever they build and fit.

Only MLX's fp32 matmul is fast here (bf16, fp16 and 4/8-bit matmuls run at
1-6 GFLOP/s against ~180), so quantized checkpoints leave MLX's quantized
layers at load: dequantized to fp32, or kept as integer codes for
Conveyor's own kernel.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from engine.errors import ModelLoadError, RequestError
from engine.platform import blas, host_memory
from engine.platform.base import (
    DeviceMemory,
    Platform,
    SamplerKernels,
    WeightFormat,
    check_cpu_matmul,
)
from kvcache.attention import cpu as cpu_attention
from kvcache.attention.backend import AttentionBackend
from kvcache.attention.metadata import AttentionSpec

BUFFER_CACHE_BYTES = 2 << 30


class CpuPlatform(Platform):
    name = "cpu"
    kv_cache_bytes = 2 << 30        # where the available RAM is unknown
    # RAM is shared with the OS, its page cache, other processes and this
    # one's Python heap (which grows with the requests in flight): the KV pool
    # takes half of what is available once the weights are loaded, so the
    # other half stays free for them.
    memory_utilization = 0.5
    # ... and at most this much unless a utilization is given: MLX writes
    # zeros over the whole pool at start-up (every page touched: ~0.5 s a GiB
    # on the 2-core development box), and 4 GiB already holds 93k tokens of
    # the default model (45 KiB a token in float32), 91 requests of 1,024.
    kv_cache_ceiling = 4 << 30
    # The memory plan's dummy step, scaled up to a full one: the CPU path's
    # activations grow linearly with the tokens (its attention kernel reads
    # the pools in place: no tokens x context scores). For the default model
    # 64 tokens scale to ~205 MiB against 188 MiB measured over a whole
    # 2048-token step, which would add seconds to every start.
    profile_tokens = 64
    # A 2048-row step already runs the matmuls at full speed.
    max_num_batched_tokens = 2048
    keeps_quantized = False
    quantized_group_sizes = (16, 32, 64, 128)  # the CPU's MLX kernels take any
    fast_math = True

    def __init__(self, device: mx.Device):
        super().__init__(device)
        # OpenMP threads of every kernel an engine built here uses (attention,
        # layers, integer matmuls, sampler): see share_machine.
        self.threads = os.cpu_count() or 1
        self._memory_prepared = False

    def share_machine(self, cpus: int) -> None:
        """This process gets `cpus` of the machine's cores, others (Ray actors
        of a CPU each) the rest: its kernels and BLAS run on that many
        threads, and its KV pool takes that share of the RAM it would take
        alone (processes starting together all see the same RAM free).
        Before an engine is built here."""
        cores = os.cpu_count() or 1
        self.threads = max(1, min(cpus, cores))
        blas.limit_threads(self.threads)
        self.memory_utilization = type(self).memory_utilization * self.threads / cores

    def describe(self) -> str:
        where = "cpu" + (" + " + blas.loaded().rsplit("/", 1)[-1] if blas.loaded() else "")
        if not blas.loaded():
            where += " (no optimised BLAS found: matmuls will be slow)"
        elif not blas.serves_mlx():
            where += " (mlx was imported before engine: the portable MLX path keeps its " \
                     "reference BLAS; the CPU fast path is unaffected)"
        return where

    def default_dtype(self, config: dict) -> mx.Dtype:
        return mx.float32

    def integer_matmul(self, fmt: WeightFormat, choice: str | None) -> tuple[Any, bool] | None:
        """"int16" (the default where the kernel builds: AVX-512 VNNI and a C
        compiler) quantizes activations to 16 bits per group: the default
        model's logits stay within ~0.14 (of ~33) of float32's. "int8" is
        llama.cpp's scheme, ~1.5x faster again, but it moves them by up to ~5
        (bench/cpu_matmul_quality.py)."""
        check_cpu_matmul(choice)
        if choice == "float32" or fmt.dtype != mx.float32:
            if choice in ("int16", "int8"):
                raise ModelLoadError(f"cpu_matmul={choice} runs on the CPU with float32 compute "
                                     "(drop --dtype / --keep-quantized)")
            return None
        from engine.platform import int8_matmul

        kernel = int8_matmul.load(self.threads)
        if kernel is None:
            if choice is not None:
                raise ModelLoadError(f"cpu_matmul={choice} needs a CPU with AVX-512 VNNI and a "
                                     "C compiler (cc/gcc/clang on PATH)")
            return None
        return kernel, choice != "int8"

    def prepare_memory(self) -> None:
        """MLX's CPU buffer cache defaults to 32 MiB: larger arrays (a step's
        activations, gathered K/V) went back to the OS after every use and
        were page-faulted in again (~30 ms for a 44 MB array). Raise it,
        never lower it."""
        if self._memory_prepared:
            return
        self._memory_prepared = True
        limit = BUFFER_CACHE_BYTES
        try:
            limit = min(limit, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8)
        except (ValueError, OSError):
            pass
        previous = mx.set_cache_limit(limit)
        if previous > limit:
            mx.set_cache_limit(previous)

    def device_memory(self) -> DeviceMemory | None:
        """The RAM available now, after the weights were loaded (so nothing
        counts as in use): the plan gives the KV pool its share of it."""
        available = host_memory.available_bytes()
        return None if available is None else DeviceMemory(available, 0, "available RAM")

    def peak_bytes_during(self, prepare: Callable[[], Callable[[], None]]) -> int:
        """The host forward's buffers are numpy's, which MLX's allocator does
        not see: the rise of this process's resident memory instead."""
        return host_memory.resident_growth(prepare()) or 0

    def fast_attention(self, spec: AttentionSpec) -> tuple[AttentionBackend | None, str | None]:
        why_not = cpu_attention.unsupported(spec)
        if why_not is not None:
            return None, why_not
        from engine.platform import native

        kernels = native.load()
        if kernels.library is None:
            return None, kernels.reason
        try:
            kernel = cpu_attention.CpuPagedAttention(
                kernels.library, spec.head_dim, spec.block_size, self.threads,
                cpu_attention.host_dtype(spec.kv_dtype))
        except ValueError as exc:  # a shape the kernel does not take
            return None, str(exc)
        return cpu_attention.CpuAttention(spec, kernel), None

    def host_forward(self, model, backend: AttentionBackend, wanted: bool | None = None):
        """The CPU fast path (engine/platform/host_forward.py): the model's own
        forward on host arrays, every shared layer on its C kernel, around the
        attention backend's host path; None (said once) where a layer has no
        kernel, and an error then if `wanted`."""
        if wanted is False:
            return None
        from engine.platform import cpu_ops
        from engine.platform.host_forward import HostForward

        if not backend.host_attention:
            forward, why = None, "the attention backend has no host path"
        else:
            forward, why = HostForward.build(model, cpu_ops.load(self.threads))
        if forward is None:
            if wanted:
                raise RequestError(f"host_forward: {why}")
            self.log_once(f"CPU fast path off: {why}; running the portable MLX path (slower)")
        else:
            self.log_once("CPU fast path: every layer on its C kernel")
        return forward

    # Encoder weights as 16-bit codes in groups of this many inputs (embeddings
    # stay within cosine 0.99999 of float32; engine/platform/weight_codes.py).
    encoder_weight_group = 32

    def bind_encoder(self, model, cpu_matmul: str | None = None, required: bool = False):
        """The encoder on the CPU fast path: integer codes where the integer
        kernel runs, else (or for shapes off the group size) float32; the
        portable path, said once, where neither binds."""
        from engine.platform import cpu_ops
        from engine.platform.host_forward import bind

        ops = cpu_ops.load(self.threads)
        why = "the CPU kernels are not available (no native library or no BLAS)"
        if ops is not None:
            choices = [cpu_matmul] if cpu_matmul else ["int16", "float32"] \
                if ops.integer_codes else ["float32"]
            for matmul in choices:
                why = bind(model, ops, weight_codes=self.encoder_weight_group
                           if matmul == "int16" else None)
                if why is None:
                    kind = "integer codes, int16 activations" if matmul == "int16" \
                        else "float32"
                    self.log_once(f"embeddings: CPU fast path, every layer on its C kernel "
                                  f"({kind} matmuls)")
                    return ops, matmul
        if required or cpu_matmul is not None:
            raise ModelLoadError(f"embedding fast path: {why}")
        self.log_once(f"embeddings: CPU fast path off: {why}; running the portable MLX path "
                      "(slower)")
        return None, None

    def sampler_kernels(self) -> SamplerKernels:
        from engine.platform import cpu_sampling

        return SamplerKernels(fast_exp=self.fast_math, host=cpu_sampling.load(self.threads))
