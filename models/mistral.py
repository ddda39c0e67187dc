"""Mistral: the Llama decoder where `sliding_window` (4096 in Mistral 7B
v0.1; null from v0.2 on) limits every layer to that many latest tokens, as
transformers' Mistral does. Same checkpoint names as Llama."""

from __future__ import annotations

import dataclasses

from models import llama


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "mistral"

    def __post_init__(self):
        if self.layer_types is None and self.sliding_window is not None:
            self.layer_types = ["sliding_attention"] * self.num_hidden_layers
        super().__post_init__()


class Model(llama.Model):
    pass
