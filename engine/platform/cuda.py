"""NVIDIA GPUs (the mlx-cuda wheel): quantized weights stay quantized,
decode attention reads the pools in place through a verified kernel, and
pure-decode steps run as compiled graphs."""

from __future__ import annotations

from engine.platform.base import Platform
from kvcache.attention.backend import AttentionBackend
from kvcache.attention.metadata import AttentionSpec


class CudaPlatform(Platform):
    name = "cuda"
    # Every K/V write through MLX copies its whole pool here (an MLX scatter on
    # CUDA is not done in place), so a prompt step costs a copy of the whole
    # budget: keep it modest unless told otherwise.
    kv_cache_bytes = 4 << 30
    # On an H100 8192 made a 256 x 128-token prefill take 4 steps instead of 8
    # and the 8B decode-heavy run 21% faster (bench/results/h100_prefill_budget.log).
    max_num_batched_tokens = 8192
    compile_decode = True
    # The host's ~1.5 ms of scheduling and batch building a step (8B, 256 rows)
    # overlaps the GPU's forward instead of following it.
    async_scheduling = True

    def fast_attention(self, spec: AttentionSpec) -> tuple[AttentionBackend | None, str | None]:
        from kvcache.attention import cuda

        why_not = cuda.unsupported(spec)
        if why_not is not None:
            return None, why_not
        if not cuda.available(spec):
            return None, "the CUDA attention kernel did not match the portable path here"
        return cuda.CudaAttention(spec), None
