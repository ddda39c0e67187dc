"""Load an optimised BLAS into the process before MLX initialises.

MLX's Linux CPU wheel links a reference BLAS (~6 GFLOP/s fp32 matmul on a
2-core x86 box). MLX resolves its BLAS symbols at load time, so a library
loaded earlier with RTLD_GLOBAL wins: MKL's self-contained libmkl_rt brings
fp32 matmul to ~180 GFLOP/s. This module must not import mlx.

With MKL, one OpenMP runtime serves MKL's threads and the native kernels'
(engine/platform/native.py, built with -fopenmp): MKL's own, Intel's libiomp5,
which also implements GNU's and LLVM's OpenMP entry points. It is loaded here
with RTLD_GLOBAL before MKL, so the kernels' OpenMP calls bind to it when their
library is opened later. Two runtimes each keep threads spinning after their
work, fighting for the same cores. GNU's libgomp for both
(MKL_THREADING_LAYER=GNU) was as fast on an idle 2-core box but 2-5x slower
whenever other processes wanted the cores: its waiting threads spin without
yielding. Any MKL_THREADING_LAYER but INTEL is left to MKL (with GNU, MKL and
the kernels then share libgomp).

Set CONVEYOR_BLAS=off to skip it, or CONVEYOR_BLAS=/path/to/lib.so to choose.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

_loaded: str | None = None
_serves_mlx = False
_openmp: str | None = None


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
        sharing = "mkl" in path.name and _load_mkl_openmp(path)
        try:
            lib = ctypes.CDLL(str(path), mode=mode)
        except OSError:
            continue
        if sharing:
            _pin_mkl_threading(lib, path)
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


def _load_mkl_openmp(mkl: Path) -> bool:
    """Load MKL's OpenMP runtime (beside libmkl_rt) into the global scope,
    unless the user chose another threading layer; whether it was."""
    if os.environ.get("MKL_THREADING_LAYER", "INTEL").upper() != "INTEL":
        return False
    try:
        ctypes.CDLL(str(mkl.parent / "libiomp5.so"), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return True


def _pin_mkl_threading(lib: ctypes.CDLL, mkl: Path) -> None:
    """Keep MKL on Intel's runtime: left to itself (even with
    MKL_THREADING_LAYER=INTEL), MKL switches to GNU's layer when it finds
    libgomp in the process, which the kernels' library brings along."""
    global _openmp
    try:
        lib.MKL_Set_Threading_Layer(0)  # MKL_THREADING_INTEL
    except AttributeError:
        return
    _openmp = str(mkl.parent / "libiomp5.so")


def limit_threads(threads: int) -> None:
    """Cap the BLAS's own threads (MKL's; other libraries are left as they
    are), for a process that shares the machine's cores with others."""
    path = loaded()
    if path is None or "mkl" not in Path(path).name:
        return
    try:
        ctypes.CDLL(path).MKL_Set_Num_Threads(ctypes.c_int(threads))
    except AttributeError:
        pass


def openmp_runtime() -> str | None:
    """The OpenMP runtime loaded for MKL and the kernels to share, if any."""
    return _openmp


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
