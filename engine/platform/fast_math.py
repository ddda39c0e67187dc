"""e^x for MLX's CPU backend, vectorised (the sampler's softmax on the CPU).

MLX's CPU backend evaluates exp one scalar at a time (~12-25 ns an element),
which made a softmax over the vocabulary cost as much as a step's matmuls.
This replacement uses only +, -, *, / and abs, which compiled kernels
vectorise.
Two rules learnt by measuring (mlx 0.32.4, x86-64):
- mx.compile fuses chains of at most ~11 element-wise ops; a longer chain
  is cut into pieces that run as slow strided loops, so each function below
  is one short stage, and a computation longer than that is two stages.
- maximum/minimum compile to branches (NaN checks) that mispredict on real
  data; clamps are written with abs, which is branch-free.
mx.exp stays the reference; tests compare the two.
"""

from __future__ import annotations

import mlx.core as mx

# e^y on [-1, 0]: degree-7 Chebyshev interpolant in monomial form.
_EXP_C = (0.9999999995114079, 0.9999999374035076, 0.49999867939792075, 0.16665600674653547,
          0.04162415464268321, 0.008240356910079072, 0.0012740899603045364,
          0.00012118171798647381)
_EXP_FLOOR = 32.0  # e^x is computed for x >= -32 (e^-32 = 1.3e-14) and held there below


def _estrin(c, z):
    """c[0] + c[1] z + ... + c[n] z^n with a shallow (Estrin) evaluation tree."""
    terms = [c[i] + c[i + 1] * z if i + 1 < len(c) else c[i] for i in range(0, len(c), 2)]
    power = z * z
    while len(terms) > 1:
        terms = [terms[i] + power * terms[i + 1] if i + 1 < len(terms) else terms[i]
                 for i in range(0, len(terms), 2)]
        power = power * power
    return terms[0]


@mx.compile
def exp_shifted_arg(s: mx.array, shift: mx.array) -> mx.array:
    # max(s - shift, -32) / 32, in [-1, 0] when shift >= s
    d = s - shift
    return ((d - _EXP_FLOOR) + mx.abs(d + _EXP_FLOOR)) * (0.5 / _EXP_FLOOR)


@mx.compile
def exp_from_arg(y: mx.array) -> mx.array:
    # e^(32 y) = (e^y)^32
    p = _estrin(_EXP_C, y)
    for _ in range(5):
        p = p * p
    return p


def exp_nonpositive(x: mx.array) -> mx.array:
    """e^x for x <= 0, relative error < 2e-5; e^-32 for any x below -32."""
    return exp_from_arg(exp_shifted_arg(x, mx.array(0.0, dtype=x.dtype)))
