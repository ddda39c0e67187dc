"""The native CPU kernels: the library built at install for this CPU.

MLX gives no way to add a CPU kernel, so the few the engine needs (paged
attention, the integer matmul, the sampler's passes, the C forward) are C
files in kernels/, compiled by the build backend when the package is
installed (setup.py), once per CPU variant (engine/platform/kernel_variants.py),
into engine/platform/_kernels_<variant>.so. Nothing is compiled at run time:
`load()` picks the best variant this CPU runs and opens it with ctypes, or says
in one line why there is none; callers then keep their portable path.

CONVEYOR_KERNELS=off turns the kernels off; =baseline, =avx2 or =avx512 asks for
that variant (tests use it to check every variant this CPU can run).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path
from typing import NamedTuple

from engine.platform import blas, kernel_variants

LIBRARY_DIR = Path(__file__).parent
REBUILD = 'pip install -e . (or python setup.py build_ext --inplace)'


class Kernels(NamedTuple):
    """The outcome of loading: a library, or None and why."""

    library: ctypes.CDLL | None
    variant: str | None
    reason: str   # one line: what was loaded, or why nothing was


def library_path(variant: str) -> Path:
    return LIBRARY_DIR / f"{kernel_variants.library_name(variant)}.so"


@functools.lru_cache(maxsize=None)
def load(variant: str | None = None) -> Kernels:
    """The kernels' library for this CPU, or for `variant` if given (None
    where this CPU can't run it). Loaded once per variant; the BLAS that
    engine.platform.blas preloaded is handed to it for its float32 matmuls."""
    machine, flags = kernel_variants.machine(), kernel_variants.cpu_flags()
    if variant is None:
        choice = os.environ.get("CONVEYOR_KERNELS", "").strip().lower()
        if choice in ("off", "0", "none"):
            return Kernels(None, None, "native kernels turned off (CONVEYOR_KERNELS=off)")
        if choice:
            variant = choice
    if sys.platform != "linux":
        return Kernels(None, None, f"no native kernels on {sys.platform} (built on Linux only)")
    known = {v.name: v for v in kernel_variants.variants_for(machine)}
    if variant is None:
        variant = kernel_variants.choose_variant(machine, flags).name
    elif variant not in known:
        return Kernels(None, None, f"no native kernel variant {variant!r} on {machine} "
                                   f"(choose from {', '.join(known)})")
    elif not known[variant].cpu_flags <= flags:
        missing = " ".join(sorted(known[variant].cpu_flags - flags))
        return Kernels(None, None, f"this CPU can't run the {variant} kernels (no {missing})")
    return _open(variant)


def _open(variant: str) -> Kernels:
    path = library_path(variant)
    if not path.is_file():
        return Kernels(None, None, f"native kernels not built ({path.name} is missing: "
                                   f"install with {REBUILD})")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return Kernels(None, None, f"native kernels failed to load: {e}")
    lib.conveyor_kernels_digest.restype = ctypes.c_char_p
    if kernel_variants.KERNELS_DIR.is_dir():  # sources beside the build: check it is current
        built, current = lib.conveyor_kernels_digest().decode(), kernel_variants.sources_digest()
        if built != current:
            return Kernels(None, None, f"native kernels are older than their sources in "
                                       f"{kernel_variants.KERNELS_DIR}: rebuild with {REBUILD}")
    sgemm = blas.sgemm_address()
    lib.conveyor_set_sgemm.argtypes = [ctypes.c_void_p]
    lib.conveyor_set_sgemm(sgemm)
    return Kernels(lib, variant, f"native kernels: {variant} ({path.name})")


def library() -> ctypes.CDLL | None:
    """The library for this CPU, or None (`load().reason` says why)."""
    return load().library



def shares_blas_openmp() -> bool:
    """Whether the kernels' OpenMP calls reach the runtime engine.platform.blas
    loaded for MKL (one pool of threads for both)."""
    lib, runtime = library(), blas.openmp_runtime()
    if lib is None or runtime is None:
        return False
    lib.conveyor_openmp_function.restype = ctypes.c_void_p
    ours = lib.conveyor_openmp_function()
    theirs = ctypes.cast(ctypes.CDLL(runtime).omp_get_max_threads, ctypes.c_void_p).value
    return ours == theirs
