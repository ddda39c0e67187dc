"""Apple silicon (Metal): the portable MLX paths, with a KV budget sized
from the unified memory. No Metal kernel is verified yet (none can run on
the machines this is developed on), so attention stays portable."""

from __future__ import annotations

import mlx.core as mx

from engine.platform.base import Platform

KV_CACHE_FRACTION = 0.5  # of the device's memory


class MetalPlatform(Platform):
    name = "metal"
    max_num_batched_tokens = 8192

    def default_kv_cache_bytes(self) -> int:
        return int(mx.device_info()["memory_size"] * KV_CACHE_FRACTION)
