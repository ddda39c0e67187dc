"""NVIDIA GPUs (the mlx-cuda wheel): quantized weights stay quantized,
decode attention reads the pools in place through a verified kernel, and
pure-decode steps run as compiled graphs."""

from __future__ import annotations

import mlx.core as mx

from engine.platform.base import DeviceMemory, Platform
from kvcache.attention.backend import AttentionBackend
from kvcache.attention.metadata import AttentionSpec


class CudaPlatform(Platform):
    name = "cuda"
    # The KV budget only where the driver does not report the GPU's memory
    # (the memory plan takes memory_utilization of it otherwise).
    kv_cache_bytes = 4 << 30
    # On an H100 8192 made a 256 x 128-token prefill take 4 steps instead of 8
    # and the 8B decode-heavy run 21% faster (bench/results/h100_prefill_budget.log).
    max_num_batched_tokens = 8192
    compile_decode = True
    # The host's ~1.5 ms of scheduling and batch building a step (8B, 256 rows)
    # overlaps the GPU's forward instead of following it.
    async_scheduling = True
    # MLX launches each op on its own (~10-20 us of host time apiece on the
    # H200's host): fused q/k/v and gate/up take 3 of a Llama layer's 15.
    fuse_projections = True

    def prepare_model(self, model) -> None:
        """Fused projections (the base class), and each residual add with the
        RMSNorm after it as one kernel where that kernel is verified here."""
        super().prepare_model(model)
        from engine.platform import cuda_norm

        cuda_norm.bind(model)

    def device_memory(self) -> DeviceMemory | None:
        """The GPU's memory from mx.device_info(): total_memory, and free_memory
        as NVML sees it (every process on the GPU; cudaMemGetInfo where NVML is
        missing). In use is what is not free, after MLX hands back the buffers
        it keeps for reuse; this process's live arrays where free is unknown."""
        mx.clear_cache()
        info = mx.device_info()
        total = int(info.get("total_memory") or info.get("memory_size") or 0)
        if total <= 0:
            return None
        free = info.get("free_memory")
        in_use = total - int(free) if free is not None else mx.get_active_memory()
        return DeviceMemory(total, in_use, "GPU memory")

    def fast_attention(self, spec: AttentionSpec) -> tuple[AttentionBackend | None, str | None]:
        from kvcache.attention import cuda

        why_not = cuda.unsupported(spec)
        if why_not is not None:
            return None, why_not
        if not cuda.available(spec):
            return None, "the CUDA attention kernel did not match the portable path here"
        return cuda.CudaAttention(spec), None
