"""Each row's k largest logits on the CPU through a small C helper (cpu_top_k.c).

MLX's CPU argpartition over [64, 49152] logits took ~32 ms, a third of a
sampled decode step; the helper takes a few. Built at first use like the other
CPU kernels (engine/native.py); None where it can't be built.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("cpu_top_k.c")


class CpuTopK:
    def __init__(self, library: Path, threads: int):
        self._fn = ctypes.CDLL(str(library)).top_k_ids
        self._fn.restype = ctypes.c_int
        p, i = ctypes.c_void_p, ctypes.c_int
        self._fn.argtypes = [p, i, i, i, p, i]
        self.threads = threads

    def __call__(self, x: np.ndarray, k: int) -> np.ndarray:
        """[rows, k] int32: each row's k largest entries' ids, largest first
        (ties: lower id first)."""
        x = np.ascontiguousarray(x, np.float32)
        rows, vocab = x.shape
        if not 0 < k <= vocab:
            raise ValueError(f"k must be in 1..{vocab}, got {k}")
        ids = np.empty((rows, k), np.int32)
        if self._fn(x.ctypes.data, rows, vocab, k, ids.ctypes.data, self.threads) != 0:
            raise MemoryError("top-k: no scratch memory")
        return ids


@functools.lru_cache(maxsize=1)
def load() -> CpuTopK | None:
    from engine.model_store import cache_dir
    from engine.native import build_library, openmp_link_args

    library = build_library("cpu_top_k", SOURCE, ["-O3", "-march=native", "-fopenmp"],
                            [*openmp_link_args(), "-lm"], cache_dir() / "kernels")
    return None if library is None else CpuTopK(library, os.cpu_count() or 1)
