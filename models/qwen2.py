"""Qwen2 / Qwen2.5: the Llama decoder with biases on the q, k and v
projections (not on o_proj). Same checkpoint names as Llama."""

from __future__ import annotations

import dataclasses

from models import llama


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "qwen2"
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = True
    attention_bias: bool = True
    attention_out_bias: bool | None = False


class Model(llama.Model):
    pass
