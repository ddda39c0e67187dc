"""What every model file and shared layer builds on.

A shared layer's `forward` is the portable MLX math. A platform may attach a
host implementation to a layer (`layer.host`, numpy in and out, set by
engine/platform/host_forward.py); a call whose input is a numpy array then
runs it. Model files compose layers with operators only (`h + attn(...)`,
`x * scale`, reshapes, indexing), which numpy and MLX arrays both support, so
one model file runs on either path and never asks which one it is on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.nn as nn
import numpy as np


@dataclasses.dataclass
class BaseModelArgs:
    """Model arguments whose fields are config.json keys; unknown keys are ignored."""

    @classmethod
    def from_dict(cls, config: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


def is_host(x) -> bool:
    """True for an activation that lives in host memory (numpy)."""
    return isinstance(x, np.ndarray)


class Layer(nn.Module):
    """Base of the shared layers: MLX `forward`, optional bound `host`."""

    host = None  # set per instance by a platform's binder

    def __call__(self, x, *args, **kwargs):
        if self.host is not None and isinstance(x, np.ndarray):
            return self.host(x, *args, **kwargs)
        return self.forward(x, *args, **kwargs)

    def forward(self, x, *args, **kwargs):
        raise NotImplementedError

