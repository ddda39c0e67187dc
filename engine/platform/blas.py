"""Load an optimised BLAS into the process before MLX initialises.

MLX's Linux CPU wheel links a reference BLAS (~6 GFLOP/s fp32 matmul on a
2-core x86 box). MLX resolves its BLAS symbols at load time, so a library
loaded earlier with RTLD_GLOBAL wins: MKL's self-contained libmkl_rt brings
fp32 matmul to ~180 GFLOP/s. This module must not import mlx.

Set CONVEYOR_BLAS=off to skip it, or CONVEYOR_BLAS=/path/to/lib.so to choose.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

_loaded: str | None = None


def _candidates() -> list[Path]:
    prefixes = {Path(sys.prefix), Path(sys.base_prefix)}
    found: list[Path] = []
    for prefix in prefixes:
        found += sorted((prefix / "lib").glob("libmkl_rt.so*"))
    return found


def preload() -> str | None:
    """Preload the BLAS once; return its path, or None when none was loaded."""
    global _loaded
    if _loaded is not None or sys.platform != "linux":
        return _loaded
    if "mlx.core" in sys.modules:
        return None  # too late: MLX already bound its BLAS
    choice = os.environ.get("CONVEYOR_BLAS", "")
    if choice.lower() in ("off", "0", "none"):
        return None
    paths = [Path(choice)] if choice else _candidates()
    for path in paths:
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _loaded = str(path)
        break
    return _loaded


def loaded() -> str | None:
    """The BLAS library preloaded into this process, if any."""
    return _loaded


def sgemm_address() -> int | None:
    """The address of the preloaded BLAS's cblas_sgemm (what the native
    kernels multiply float32 matrices with), or None."""
    if _loaded is None:
        return None
    try:
        return ctypes.cast(ctypes.CDLL(_loaded).cblas_sgemm, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
