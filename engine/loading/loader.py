"""Find a model, read its config, build its architecture, load its weights.

The lifecycle follows mlx-lm: a path (local directory, Hugging Face repo id,
or GGUF file imported once) → config.json → `model_type` picks
`models/<model_type>.py` through importlib → `Model(ModelArgs)` →
`sanitize()` → safetensors weights, quantized layers made from the config.
Adding an architecture is adding a file to models/; this file never changes.
"""

from __future__ import annotations

import glob
import importlib
import json
import pkgutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

import models
from engine.errors import ModelLoadError
from engine.platform import int8_matmul
from engine.platform.backend import (
    WeightFormat,
    choose_weight_format,
    log_once,
    on_cpu,
    raise_cpu_cache_limit,
)
from engine.platform.int8_linear import Int8Embedding, Int8Linear
from engine.platform.int8_matmul import Int8Matmul
from models.layers.linear import Linear

# Architectures that share another's file.
MODEL_TYPE_ALIASES = {"mistral": "llama"}


def supported_model_types() -> list[str]:
    # Architecture modules are models/*.py; models/layers/ is a package.
    names = [m.name for m in pkgutil.iter_modules(models.__path__) if not m.ispkg]
    return sorted(set(names) | set(MODEL_TYPE_ALIASES))


def resolve_model_path(model: str | Path | None) -> Path:
    """A local directory for `model`: None is the default LLM; a .gguf file is
    imported once; a directory is used as is; anything else is a repo id."""
    from engine.loading import gguf  # imported lazily: only GGUF users pay for it

    if model is None:
        return gguf.default_llm_dir()
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"no such GGUF file: {path}")
        return gguf.imported_gguf_dir(path)
    if path.is_dir():
        return path
    text = str(model)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelLoadError(f"model not found: {text} (expected a directory, a .gguf file "
                             "or a Hugging Face repo id like org/name)")
    return _hub_snapshot(text)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
    try:  # the local cache first, so it works offline
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise ModelLoadError(f"model {repo_id!r} is not in the Hugging Face cache and could "
                             f"not be downloaded ({type(exc).__name__})") from None


def load_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} has no config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"malformed {file}: {exc}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelLoadError(f"{file} does not name a model_type")
    return config


def model_module(model_type: str):
    """The architecture module for a config's model_type: models/<type>.py."""
    name = MODEL_TYPE_ALIASES.get(model_type, model_type)
    module = None
    if isinstance(name, str) and name.isidentifier() and name != "layers":
        try:
            module = importlib.import_module(f"models.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"models.{name}":
                raise
    if module is None or not hasattr(module, "Model") or not hasattr(module, "ModelArgs"):
        raise ModelLoadError(f"unsupported model_type {model_type!r}; supported: "
                             f"{', '.join(supported_model_types())}")
    return module


def load_weights(path: Path) -> dict[str, mx.array]:
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    weights: dict[str, mx.array] = {}
    for file in files:
        try:
            weights.update(mx.load(file))
        except Exception as exc:
            raise ModelLoadError(f"cannot read {file}: {str(exc).splitlines()[0]}") from None
    return weights


def _quantize(model: nn.Module, config: dict, weights: dict[str, mx.array]) -> None:
    quant = config.get("quantization") or config.get("quantization_config")
    if not quant:
        return

    def predicate(path: str, module: nn.Module):
        if path in quant:  # per-layer override: a dict of params, or False
            return quant[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(model, group_size=quant.get("group_size", 64), bits=quant.get("bits", 4),
                class_predicate=predicate)


def _dequantized(module: nn.Module, dtype: mx.Dtype, name: str = "",
                 integer: tuple[Int8Matmul, bool] | None = None) -> nn.Module:
    """Quantized layers turned into float layers, or, given the CPU's integer
    kernel and whether its activations are wide (int16), into layers that
    multiply their codes in integers."""
    def dense(q) -> mx.array:
        return mx.dequantize(q.weight, q.scales, q.get("biases"), q.group_size, q.bits
                             ).astype(dtype)

    def kernel_fits(q) -> bool:
        in_dim = q.scales.shape[1] * q.group_size
        return integer is not None and "biases" in q and int8_matmul.supports(
            q.bits, q.group_size, in_dim, q.scales.shape[0])

    if isinstance(module, nn.QuantizedLinear) and kernel_fits(module):
        return Int8Linear.from_quantized(module, *integer)
    if isinstance(module, nn.QuantizedEmbedding) and kernel_fits(module):
        return Int8Embedding.from_quantized(module, *integer)
    if isinstance(module, nn.QuantizedLinear):
        out_dim, in_dim = module.weight.shape[0], module.scales.shape[1] * module.group_size
        # models.layers.linear.Linear picks its CPU matmul layout; an LM head stays a
        # plain nn.Linear: the sampler reduces over its rows, slow on a transposed view.
        kind = nn.Linear if name.endswith("lm_head") else Linear
        layer = kind(in_dim, out_dim, bias="bias" in module)
        layer.weight = dense(module)
        if "bias" in module:
            layer.bias = module.bias.astype(dtype)
        return layer
    if isinstance(module, nn.QuantizedEmbedding):
        num, dim = module.weight.shape[0], module.scales.shape[1] * module.group_size
        layer = nn.Embedding(num, dim)
        layer.weight = dense(module)
        return layer
    for key, child in module.items():
        if isinstance(child, nn.Module):
            module[key] = _dequantized(child, dtype, f"{name}.{key}", integer)
        elif isinstance(child, list):
            module[key] = [_dequantized(c, dtype, f"{name}.{key}.{i}", integer)
                           if isinstance(c, nn.Module) else c for i, c in enumerate(child)]
    return module


def _cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    # Quantized tensors (uint32) and their scales keep their own types.
    def cast(path: str, a: mx.array) -> mx.array:
        if mx.issubdtype(a.dtype, mx.floating) and not path.endswith(("scales", "biases")):
            return a.astype(dtype)
        return a

    from mlx.utils import tree_map_with_path
    model.update(tree_map_with_path(cast, model.parameters()))


CPU_MATMULS = ("float32", "int16", "int8")


def _integer_matmul(fmt: WeightFormat, choice: str | None) -> tuple[Int8Matmul, bool] | None:
    """(kernel, wide) when a quantized checkpoint's codes should be multiplied
    as integers on the CPU, else None (dequantize to float32).

    "int16" (the default where the kernel runs: AVX-512 VNNI and the native
    kernels) quantizes activations to 16 bits per group: the default model's
    logits stay within ~0.14 (of ~33) of float32's. "int8" is llama.cpp's
    scheme, ~1.5x faster again, but it moves them by up to ~5
    (bench/cpu_matmul_quality.py)."""
    if choice is not None and choice not in CPU_MATMULS:
        raise ModelLoadError(f"unknown cpu_matmul {choice!r}; choose from {', '.join(CPU_MATMULS)}")
    if choice == "float32" or not on_cpu() or fmt.dtype != mx.float32:
        if choice in ("int16", "int8"):
            raise ModelLoadError(f"cpu_matmul={choice} runs on the CPU with float32 compute "
                                 "(drop --dtype / --keep-quantized)")
        return None
    kernel = int8_matmul.load()
    if kernel is None:
        if choice is not None:
            from engine.platform import native

            raise ModelLoadError(f"cpu_matmul={choice} needs a CPU with AVX-512 VNNI and the "
                                 f"native kernels ({native.load().reason})")
        return None
    return kernel, choice != "int8"


def load_model(path: Path, *, dtype: str | None = None, keep_quantized: bool | None = None,
               cpu_matmul: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model in `path` in the fastest weight format for this device."""
    config = load_config(path)
    module = model_module(config["model_type"])
    try:
        args = module.ModelArgs.from_dict(config)
        model = module.Model(args)
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"invalid config.json in {path}: {exc}") from None
    weights = model.sanitize(load_weights(path))
    _quantize(model, config, weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise ModelLoadError(f"weights in {path} do not match its config: "
                             f"{str(exc).splitlines()[0]}") from None
    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
                    for _, m in model.named_modules())
    fmt: WeightFormat = choose_weight_format(quantized, config, dtype, keep_quantized)
    if on_cpu():
        raise_cpu_cache_limit()
    reason = fmt.reason
    if quantized and not fmt.keep_quantized:
        integer = _integer_matmul(fmt, cpu_matmul)
        model = _dequantized(model, fmt.dtype, integer=integer)
        if integer is not None:
            acts = "int16" if integer[1] else "int8"
            reason = reason.replace("dequantized to float32 (--keep-quantized keeps them)",
                                    f"kept as integer codes, activations {acts} per group "
                                    "(AVX-512 VNNI kernel; --cpu-matmul chooses)")
    _cast_floats(model, fmt.dtype)
    mx.eval(model.parameters())
    log_once(reason)
    model.eval()
    return model, config
