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
_serves_mlx = False


def _candidates() -> list[Path]:
    prefixes = {Path(sys.prefix), Path(sys.base_prefix)}
    found: list[Path] = []
    for prefix in prefixes:
        found += sorted((prefix / "lib").glob("libmkl_rt.so*"))
    return found


def preload() -> str | None:
    """Load the BLAS once; return its path, or None when none was found.

    Before MLX is imported it is loaded globally, so MLX's own matmuls bind to
    it too. After (someone imported mlx.core first) it is loaded for
    Conveyor's kernels alone: the CPU fast path runs the same either way, and
    only the portable MLX path keeps MLX's reference BLAS (`serves_mlx()`)."""
    global _loaded, _serves_mlx
    if _loaded is not None or sys.platform != "linux":
        return _loaded
    choice = os.environ.get("CONVEYOR_BLAS", "")
    if choice.lower() in ("off", "0", "none"):
        return None
    early = "mlx.core" not in sys.modules
    mode = ctypes.RTLD_GLOBAL if early else ctypes.RTLD_LOCAL
    paths = [Path(choice)] if choice else _candidates()
    for path in paths:
        try:
            ctypes.CDLL(str(path), mode=mode)
        except OSError:
            continue
        _loaded, _serves_mlx = str(path), early
        break
    return _loaded


def loaded() -> str | None:
    """The optimised BLAS loaded into this process, if any (preloading it
    first where it was not yet)."""
    return _loaded if _loaded is not None else preload()


def serves_mlx() -> bool:
    """Whether MLX's own matmuls use that BLAS (it was loaded before MLX)."""
    return _serves_mlx


def sgemm_address() -> int | None:
    """The address of the loaded BLAS's cblas_sgemm (what the native kernels
    multiply float32 matrices with), or None."""
    path = loaded()
    if path is None:
        return None
    try:
        return ctypes.cast(ctypes.CDLL(path).cblas_sgemm, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
