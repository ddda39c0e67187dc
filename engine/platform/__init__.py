"""The one place that knows the device: CPU (+ BLAS, native kernels), CUDA,
Metal or portable MLX, chosen once per engine (`current_platform()`) and
passed down. Importing this package loads nothing (engine/__init__.py must
preload the BLAS before MLX is first imported)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.platform.base import Platform


def current_platform() -> Platform:
    """The platform of MLX's default device (one object per device)."""
    from engine.platform.base import Platform

    return Platform.detect()
