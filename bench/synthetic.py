"""Random-weight models shaped like real ones, for GPU runs without checkpoints."""

from __future__ import annotations

import mlx.core as mx

SHAPES = {
    "smollm2": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                    tie_word_embeddings=True, rope_theta=100000.0),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                     tie_word_embeddings=True, rope_theta=500000.0),
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                     tie_word_embeddings=False, rope_theta=500000.0),
}


class NullTokenizer:
    """Token ids in, token ids out: synthetic models have no vocabulary."""

    eos_token_ids: set[int] = set()
    chat_template = None


def synthetic_config(name: str, model_type: str = "llama") -> dict:
    """The config of shape `name` for a llama-shaped architecture (`model_type`
    "llama" or "qwen3": the same matrices, plus Qwen3's q/k norms)."""
    config = {"model_type": model_type, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
              **SHAPES[name]}
    # Qwen3 configs state head_dim; the same value keeps the shapes identical.
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    return config


def synthetic_model(name: str, dtype: mx.Dtype, model_type: str = "llama"):
    """Conveyor's `model_type` architecture with small random weights in `dtype`."""
    import importlib

    module = importlib.import_module(f"models.{model_type}")
    config = synthetic_config(name, model_type)
    model = module.Model(module.ModelArgs.from_dict(config))
    # Small weights keep activations finite in half precision. Cast module by
    # module so the fp32 initial values of an 8B model never all exist at once.
    for _, module in model.named_modules():
        local = {k: v for k, v in module.items() if isinstance(v, mx.array)}
        if local:
            module.update({k: (v * 0.02 if v.ndim > 1 else v).astype(dtype)
                           for k, v in local.items()})
            mx.eval(module.parameters())
    return model, config
