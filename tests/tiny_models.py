"""Small random-weight checkpoints written on the fly for engine tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 320,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 257,
    "eos_token_id": 258,
    "torch_dtype": "float32",
}


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer with no merges: 256 byte tokens + 3 specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
    }))


def llama_weights(config: dict, seed: int = 0) -> dict[str, mx.array]:
    rng = np.random.default_rng(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd
    q = config["num_attention_heads"] * hd

    def w(*shape, scale=0.08):
        return mx.array(rng.normal(0, scale, size=shape).astype(np.float32))

    gemma = config["model_type"].startswith("gemma")
    one = 0 if gemma else 1  # Gemma's norms store their scale as a difference from 1

    def norm(n):
        return w(n) + one

    # Gemma scales embeddings by sqrt(hidden) and ties its head, which then
    # echoes the input token; a final norm scale of either sign breaks that.
    weights = {"model.embed_tokens.weight": w(v, d, scale=0.1 if gemma else 0.5),
               "model.norm.weight": w(d, scale=1.0) - 1 if gemma else norm(d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": w(q, d), p + "self_attn.k_proj.weight": w(kv, d),
            p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, q),
            p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
            p + "mlp.down_proj.weight": w(d, f),
            p + "input_layernorm.weight": norm(d), p + "post_attention_layernorm.weight": norm(d),
        })
        if gemma:
            weights[p + "pre_feedforward_layernorm.weight"] = norm(d)
            weights[p + "post_feedforward_layernorm.weight"] = norm(d)
        if config["model_type"] in ("qwen3", "gemma3_text"):
            weights[p + "self_attn.q_norm.weight"] = norm(hd)
            weights[p + "self_attn.k_norm.weight"] = norm(hd)
        qkv_only = config["model_type"] == "qwen2"
        attention = ("q_proj", "k_proj", "v_proj") + (() if qkv_only else ("o_proj",))
        for flag, names in (("attention_bias", attention),
                            ("mlp_bias", ("gate_proj", "up_proj", "down_proj"))):
            for name in names if config.get(flag) else ():
                part = "self_attn" if flag == "attention_bias" else "mlp"
                rows = weights[f"{p}{part}.{name}.weight"].shape[0]
                weights[f"{p}{part}.{name}.bias"] = w(rows)
    if not config.get("tie_word_embeddings", gemma):
        weights["lm_head.weight"] = w(v, d, scale=0.3)
    return weights


def write_tiny_llama(path: Path, shards: int = 1, seed: int = 0, **overrides) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = {**TINY_LLAMA, **overrides}
    (path / "config.json").write_text(json.dumps(config))
    weights = llama_weights(config, seed)
    names = sorted(weights)
    for s in range(shards):
        part = {k: weights[k] for k in names[s::shards]}
        mx.save_safetensors(str(path / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"), part)
    write_byte_tokenizer(path)
    return path


TINY_QWEN2 = {**TINY_LLAMA, "model_type": "qwen2", "rope_theta": 1000000.0,
              "tie_word_embeddings": True, "attention_bias": True}
TINY_QWEN3 = {**TINY_LLAMA, "model_type": "qwen3", "head_dim": 32, "rope_theta": 1000000.0,
              "tie_word_embeddings": True}


# Sliding windows of a few tokens, so that short prompts outgrow them; small
# soft-caps, so that capping changes the scores of these random weights.
TINY_MISTRAL = {**TINY_LLAMA, "model_type": "mistral", "sliding_window": 8}
TINY_GEMMA2 = {**TINY_LLAMA, "model_type": "gemma2", "head_dim": 16, "query_pre_attn_scalar": 24,
               "sliding_window": 8, "attn_logit_softcapping": 2.0,
               "final_logit_softcapping": 15.0, "hidden_activation": "gelu_pytorch_tanh",
               "tie_word_embeddings": True, "num_hidden_layers": 3}
TINY_GEMMA3 = {**TINY_LLAMA, "model_type": "gemma3_text", "head_dim": 16,
               "query_pre_attn_scalar": 16, "sliding_window": 12, "sliding_window_pattern": 3,
               "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
               "rope_scaling": {"rope_type": "linear", "factor": 8.0},
               "tie_word_embeddings": True, "num_hidden_layers": 3}
# Each family's config and the window of each layer (None: full attention), as
# transformers lays them out: Gemma 2 every other layer from the first, Gemma 3
# all but every `sliding_window_pattern`-th, Mistral all.
TINY_SLIDING = {"gemma2": (TINY_GEMMA2, [8, None, 8]),
                "gemma3_text": (TINY_GEMMA3, [12, 12, None]),
                "mistral": (TINY_MISTRAL, [8, 8])}


def write_quantized(src, dst, bits=4, group_size=32, override_bits=8, embedding=False):
    """An mlx-lm style quantized checkpoint with one per-layer override
    (and an 8-bit embedding with `embedding`, as the default model has)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model as mlx_lm_load

    model, config = mlx_lm_load(src)
    override = "model.layers.0.mlp.down_proj"

    def predicate(path, module):
        if path == override or (embedding and isinstance(module, nn.Embedding)):
            return {"group_size": group_size, "bits": override_bits}
        return isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    dst.mkdir()
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = json.loads((src / "config.json").read_text())
    config["quantization"] = {"group_size": group_size, "bits": bits,
                              override: {"group_size": group_size, "bits": override_bits}}
    if embedding:
        config["quantization"]["model.embed_tokens"] = {"group_size": group_size,
                                                        "bits": override_bits}
    (dst / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    return dst


# Phi-3: fused q/k/v and gate/up projections, LongRoPE.
HIDDEN, HEADS, KV_HEADS, FF = 64, 4, 2, 96

TINY_PHI3 = {
    "model_type": "phi3", "hidden_size": HIDDEN, "num_hidden_layers": 2,
    "intermediate_size": FF, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
    "rms_norm_eps": 1e-5, "vocab_size": 320, "rope_theta": 10000.0,
    "max_position_embeddings": 8192, "original_max_position_embeddings": 1024,
    "tie_word_embeddings": False, "bos_token_id": 257, "eos_token_id": 258, "pad_token_id": 256,
    "torch_dtype": "float32",
}


def longrope(rotated_dims: int) -> dict:
    rng = np.random.default_rng(7)
    pairs = rotated_dims // 2
    return {"type": "longrope", "long_factor": (1 + 3 * rng.random(pairs)).tolist(),
            "short_factor": (1 + rng.random(pairs)).tolist()}


def write_tiny_phi3(path, seed=0, **overrides):
    """A phi3 checkpoint in Hugging Face's names (qkv_proj, gate_up_proj)."""
    config = {**TINY_PHI3, **overrides}
    rng = np.random.default_rng(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = d // config["num_attention_heads"]
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * hd

    def w(*shape, scale=0.08):
        return mx.array(rng.normal(0, scale, size=shape).astype(np.float32))

    weights = {"model.embed_tokens.weight": w(v, d, scale=0.5), "model.norm.weight": w(d) + 1}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.qkv_proj.weight": w(qkv, d),
            p + "self_attn.o_proj.weight": w(d, d),
            p + "mlp.gate_up_proj.weight": w(2 * f, d), p + "mlp.down_proj.weight": w(d, f),
            p + "input_layernorm.weight": w(d) + 1,
            p + "post_attention_layernorm.weight": w(d) + 1,
        })
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = w(v, d, scale=0.3)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    write_byte_tokenizer(path)
    return path
