"""GGUF files written for tests with the `gguf` package's GGUFWriter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from bench.gguf_quantize import quantize


def byte_level_vocab(size: int) -> dict:
    """A "gpt2" tokenizer's metadata: 256 byte tokens, <s> and </s>, then
    two-letter merges up to `size` tokens."""
    from test_gguf_import import _byte_chars

    pairs = [a + b for a in "abcdefghijklmnop" for b in "etaoinshrdlu"][:size - 258]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": _byte_chars() + ["<s>", "</s>"] + pairs,
            "tokenizer.ggml.merges": [f"{p[0]} {p[1]}" for p in pairs],
            "tokenizer.ggml.token_type": [1] * 256 + [3, 3] + [1] * len(pairs),
            "tokenizer.ggml.bos_token_id": 256, "tokenizer.ggml.eos_token_id": 257}


def _kind(value) -> tuple[GGUFValueType, GGUFValueType | None]:
    if isinstance(value, bool):
        return GGUFValueType.BOOL, None
    if isinstance(value, int):
        return GGUFValueType.UINT32, None
    if isinstance(value, float):
        return GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return GGUFValueType.STRING, None
    return GGUFValueType.ARRAY, _kind(value[0])[0]


def write_gguf_file(path: Path, arch: str, meta: dict,
                    tensors: dict[str, tuple[str, np.ndarray]]) -> Path:
    """meta: key -> value (ints as uint32, floats as float32); tensors:
    GGUF name -> (ggml type, float values in numpy order)."""
    writer = GGUFWriter(str(path), arch)
    for key, value in meta.items():
        writer.add_key_value(key, value, *_kind(value))
    for name, (kind, values) in tensors.items():
        if kind in ("F32", "F16"):
            writer.add_tensor(name, values.astype(np.float32 if kind == "F32" else np.float16))
        else:
            writer.add_tensor(name, quantize(values, kind), raw_dtype=GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
