"""The sampler's whole-vocabulary passes on the CPU in C (cpu_sampling.c).

Over [64, 49152] logits MLX's CPU argpartition took ~32 ms and the
inverse-CDF draw ~18 ms of a sampled decode step; the helpers take a few.
They are part of the native library built at install (engine/platform/
native.py); `load()` is None where there is none.
"""

from __future__ import annotations

import ctypes
import functools
import os

import numpy as np


class CpuSampling:
    def __init__(self, library: ctypes.CDLL, threads: int):
        """`library`: the native kernels (engine.platform.native.library())."""
        lib = library
        p, i = ctypes.c_void_p, ctypes.c_int
        self._top_k, self._softmax = lib.top_k_ids, lib.softmax_rows
        self._top_k.argtypes = [p, i, i, i, p, i]
        self._softmax.argtypes = [p, i, i, p, p, p, p, i]
        self._top_k.restype = self._softmax.restype = ctypes.c_int
        self.threads = threads

    def softmax(self, x: np.ndarray, temperatures: np.ndarray,
                uniforms: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(logsumexp of each row of x / temperature [rows], and with
        `uniforms` [rows] in (0, 1) each row's inverse-CDF draw [rows] int32)."""
        x = np.ascontiguousarray(x, np.float32)
        rows, vocab = x.shape
        inv = np.ascontiguousarray(1.0 / np.asarray(temperatures, np.float32), np.float32)
        lse = np.empty(rows, np.float32)
        ids = np.empty(rows, np.int32) if uniforms is not None else None
        u = None if uniforms is None else np.ascontiguousarray(uniforms, np.float32)
        rc = self._softmax(x.ctypes.data, rows, vocab, inv.ctypes.data,
                           None if u is None else u.ctypes.data, lse.ctypes.data,
                           None if ids is None else ids.ctypes.data, self.threads)
        if rc != 0:
            raise MemoryError("softmax: no scratch memory")
        return lse, ids

    def top_k(self, x: np.ndarray, k: int) -> np.ndarray:
        """[rows, k] int32: each row's k largest entries' ids, largest first
        (ties: lower id first)."""
        x = np.ascontiguousarray(x, np.float32)
        rows, vocab = x.shape
        if not 0 < k <= vocab:
            raise ValueError(f"k must be in 1..{vocab}, got {k}")
        ids = np.empty((rows, k), np.int32)
        if self._top_k(x.ctypes.data, rows, vocab, k, ids.ctypes.data, self.threads) != 0:
            raise MemoryError("top-k: no scratch memory")
        return ids


@functools.lru_cache(maxsize=4)
def load(threads: int | None = None) -> CpuSampling | None:
    """The helpers on `threads` threads (default: every core), or None where
    there are no native kernels."""
    from engine.platform import native

    library = native.library()
    return None if library is None else CpuSampling(library, threads or os.cpu_count() or 1)
