"""Apple silicon (Metal): the portable MLX paths, with a KV budget planned
from the unified memory. No Metal kernel is verified yet (none can run on
the machines this is developed on), so attention stays portable."""

from __future__ import annotations

import mlx.core as mx

from engine.platform.base import DeviceMemory, Platform


class MetalPlatform(Platform):
    name = "metal"
    max_num_batched_tokens = 8192

    def device_memory(self) -> DeviceMemory | None:
        """The unified memory Metal lets the GPU keep resident
        (max_recommended_working_set_size: macOS keeps the rest for itself),
        of which this process's MLX arrays are in use."""
        info = mx.device_info()
        capacity = int(info.get("max_recommended_working_set_size")
                       or info.get("memory_size") or 0)
        if capacity <= 0:
            return None
        return DeviceMemory(capacity, mx.get_active_memory(), "GPU working set")
