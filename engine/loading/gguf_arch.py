"""The GGUF architectures the importer reads, and how each maps to the
Hugging Face config keys and checkpoint names of its model file.

llama.cpp's converter renames tensors (blk.N.attn_q -> model.layers.N.self_attn
.q_proj), keeps the hyper-parameters as `<arch>.*` metadata, and changes some
values on the way, which the import undoes:
- llama: Q/K rows are permuted for GGML's interleaved RoPE (gguf.py undoes it);
- gemma2/gemma3: RMSNorm weights are stored as 1 + weight (Gemma scales by
  1 + weight; the model files load the weight itself);
- phi3: LongRoPE's per-pair factors are tensors (rope_factors_long/short).
Values llama.cpp hard-codes rather than stores (Gemma's attention scale and
local RoPE base, Gemma 3's sliding-window pattern) are filled in as it does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

_LLAMA_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA_BLOCK = {**_LLAMA_BLOCK, "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}
_PHI3_BLOCK = {"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
               "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj",
               "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
TOP_MODULES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
               "output": "lm_head"}

# (key, kind, default) -> the checked metadata value; None when absent and no default.
Meta = Callable[[str, type, Any], Any]
Tensors = Callable[[str], Any]  # a float tensor's values by GGUF name (for rope factors)


@dataclasses.dataclass(frozen=True)
class GGUFArchitecture:
    model_type: str                 # config.json's model_type
    hf_class: str                   # config.json's architectures[0]
    block: dict[str, str]           # GGUF block tensor -> module inside model.layers.N
    hidden_act: str = "silu"
    permute_qk: bool = False        # llama's Q/K rows are in GGML's RoPE order
    norm_shift: float = 0.0         # stored norm weight = weight + shift
    partial_rotary: bool = False    # rope.dimension_count may be below the head size
    extra: Callable[[str, Meta, dict, Tensors], dict] | None = None  # more config keys
    config_only: tuple[str, ...] = ()  # tensors read into the config, not weights


def _gemma2(arch: str, meta: Meta, config: dict, tensors: Tensors) -> dict:
    return {"hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": _attention_scalar(config, 46),
            "attn_logit_softcapping": meta(f"{arch}.attn_logit_softcapping", float, 50.0),
            "final_logit_softcapping": meta(f"{arch}.final_logit_softcapping", float, 30.0),
            "sliding_window": meta(f"{arch}.attention.sliding_window", int, 4096)}


def _gemma3(arch: str, meta: Meta, config: dict, tensors: Tensors) -> dict:
    return {"hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": _attention_scalar(config, 62),
            "rope_local_base_freq": 10000.0,
            "sliding_window": meta(f"{arch}.attention.sliding_window", int, 512),
            "sliding_window_pattern": meta(f"{arch}.attention.sliding_window_pattern", int, 6),
            "final_logit_softcapping": None, "attn_logit_softcapping": None}


def _attention_scalar(config: dict, big_layers: int) -> int:
    # llama.cpp: queries scale by 1/sqrt(hidden / heads) for the 27B models
    # (46 layers in Gemma 2, 62 in Gemma 3), by 1/sqrt(head_dim) otherwise.
    if config["num_hidden_layers"] == big_layers and config["num_attention_heads"]:
        return config["hidden_size"] // config["num_attention_heads"]
    return config["head_dim"]


def _phi3(arch: str, meta: Meta, config: dict, tensors: Tensors) -> dict:
    original = meta(f"{arch}.rope.scaling.original_context_length", int,
                    config["max_position_embeddings"])
    out: dict[str, Any] = {"original_max_position_embeddings": original}
    long, short = tensors("rope_factors_long.weight"), tensors("rope_factors_short.weight")
    if long is not None:
        out["rope_scaling"] = {"type": "longrope", "long_factor": long,
                               "short_factor": short if short is not None else long}
    return out


ARCHITECTURES = {
    "llama": GGUFArchitecture("llama", "LlamaForCausalLM", _LLAMA_BLOCK, permute_qk=True),
    "qwen2": GGUFArchitecture("qwen2", "Qwen2ForCausalLM", _LLAMA_BLOCK),
    "qwen3": GGUFArchitecture("qwen3", "Qwen3ForCausalLM", {**_LLAMA_BLOCK, **_QK_NORM}),
    "gemma2": GGUFArchitecture("gemma2", "Gemma2ForCausalLM", _GEMMA_BLOCK,
                               "gelu_pytorch_tanh", norm_shift=1.0, extra=_gemma2),
    "gemma3": GGUFArchitecture("gemma3_text", "Gemma3ForCausalLM",
                               {**_GEMMA_BLOCK, **_QK_NORM}, "gelu_pytorch_tanh",
                               norm_shift=1.0, extra=_gemma3),
    "phi3": GGUFArchitecture("phi3", "Phi3ForCausalLM", _PHI3_BLOCK, partial_rotary=True,
                             extra=_phi3, config_only=("rope_factors_long.weight",
                                                       "rope_factors_short.weight")),
}


def config_sources(arch: str) -> dict[str, str]:
    """config.json key -> the GGUF metadata key it comes from (for errors)."""
    return {
        "hidden_size": f"{arch}.embedding_length",
        "num_hidden_layers": f"{arch}.block_count",
        "intermediate_size": f"{arch}.feed_forward_length",
        "num_attention_heads": f"{arch}.attention.head_count",
        "num_key_value_heads": f"{arch}.attention.head_count_kv",
        "head_dim": f"{arch}.attention.key_length",
        "vocab_size": f"{arch}.vocab_size",
        "max_position_embeddings": f"{arch}.context_length",
        "rms_norm_eps": f"{arch}.attention.layer_norm_rms_epsilon",
        "rope_theta": f"{arch}.rope.freq_base",
        "rope_scaling": f"{arch}.rope.scaling",
        "bos_token_id": "tokenizer.ggml.bos_token_id",
        "pad_token_id": "tokenizer.ggml.padding_token_id",
        "eos_token_id": "tokenizer.ggml.eos_token_id",
    }
