"""XLM-RoBERTa encoders (bge-m3's dense vectors, multilingual-e5-base/large),
and RoBERTa's, which are the same network.

BERT's blocks and checkpoint names (models/bert.py), under a `roberta.`
prefix. What differs is data: positions are numbered from the padding index
plus one (`pad_token_id`, 1), there is a single token type, and the
vocabulary is SentencePiece's (a Unigram model in tokenizer.json, which the
tokenizers library reads like any other).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx

from models import bert


@dataclass
class ModelArgs(bert.ModelArgs):
    model_type: str = "xlm-roberta"
    vocab_size: int = 250002
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1


# Heads an encoder does not use: the masked-LM head and classifiers.
_HEADS = re.compile(r"^(lm_head|classifier)\.")


class Model(bert.Model):
    """An XLM-RoBERTa encoder: `model(input_ids, attention_mask)` -> [B, T, D]."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        # Hugging Face numbers a right-padded row's tokens padding_idx + 1, + 2, ...
        self.position_offset = args.pad_token_id + 1

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map XLMRobertaModel / XLMRobertaForMaskedLM names onto this tree."""
        kept = {re.sub(r"^roberta\.", "", k): v for k, v in weights.items()
                if not _HEADS.match(k)}
        return super().sanitize(kept)
