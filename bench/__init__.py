"""Benchmarks: Conveyor against peers measured in the same run (see RESULTS.md)."""

# `python -m bench.<script>` imports this package first: load the optimised BLAS
# before any script imports MLX (see engine/blas.py).
from engine.platform import blas as _blas

_blas.preload()
