"""Qwen3 (dense): the Llama decoder with an RMSNorm on each head's queries and
keys before RoPE. Same checkpoint names, plus `self_attn.q_norm` / `k_norm`."""

from __future__ import annotations

import dataclasses

from models import llama


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "qwen3"
    rope_theta: float = 1000000.0
    qk_norm: bool = True


class Model(llama.Model):
    pass
