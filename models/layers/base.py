"""Pieces every model file shares."""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.core as mx


@dataclasses.dataclass
class BaseModelArgs:
    """Model arguments whose fields are config.json keys; unknown keys are ignored."""

    @classmethod
    def from_dict(cls, config: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


def causal_attention(q, k, v, scale: float):
    """Attention of one packed sequence over itself ([N, heads, head_dim]),
    used when no cache is given (a whole prompt, tests, oracles)."""
    out = mx.fast.scaled_dot_product_attention(
        q.transpose(1, 0, 2)[None], k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None],
        scale=scale, mask="causal")
    return out[0].transpose(1, 0, 2)
