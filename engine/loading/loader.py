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
import numpy as np

import models
from engine.errors import ModelLoadError
from engine.loading.validate import check_checkpoint
from engine.platform import current_platform, int8_matmul
from engine.platform.base import Platform, WeightFormat
from engine.platform.int8_linear import Int8Embedding, Int8Linear
from engine.platform.int8_matmul import Int8Matmul
from models.layers.embedding import Embedding
from models.layers.linear import QUANTIZE_GROUP_SIZES, Linear

# Architectures that share another's file (config model_types that are not
# identifiers, or the same network under another name).
MODEL_TYPE_ALIASES = {"xlm-roberta": "xlm_roberta", "roberta": "xlm_roberta"}


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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"malformed {file}: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelLoadError(f"{file} does not name a model_type (a string)")
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
                 integer: tuple[Int8Matmul, bool] | None = None,
                 keep: tuple[int, ...] = ()) -> nn.Module:
    """Quantized layers turned into float layers, or, given the CPU's integer
    kernel and whether its activations are wide (int16), into layers that
    multiply their codes in integers; layers whose group size is in `keep`
    stay as they are."""
    def dense(q) -> mx.array:
        if q.group_size in QUANTIZE_GROUP_SIZES:
            return mx.dequantize(q.weight, q.scales, q.get("biases"), q.group_size, q.bits
                                 ).astype(dtype)
        # Group sizes mx.quantize does not make (GGUF Q6_K's 16), which a
        # device's kernels may lack: in numpy.
        codes = int8_matmul.unpack_codes(np.array(q.weight), q.bits).astype(np.float32)
        rows, groups = q.scales.shape
        scales, biases = (np.array(a.astype(mx.float32))[:, :, None]
                          for a in (q.scales, q["biases"]))
        return mx.array((codes.reshape(rows, groups, -1) * scales + biases).reshape(rows, -1)
                        ).astype(dtype)

    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and \
            module.group_size in keep:
        return module

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
        layer = Linear(in_dim, out_dim, bias="bias" in module)
        layer.weight = dense(module)
        if "bias" in module:
            layer.bias = module.bias.astype(dtype)
        return layer
    if isinstance(module, nn.QuantizedEmbedding):
        num, dim = module.weight.shape[0], module.scales.shape[1] * module.group_size
        layer = Embedding(num, dim, scale=getattr(module, "scale", None))
        layer.weight = dense(module)
        return layer
    for key, child in module.items():
        if isinstance(child, nn.Module):
            module[key] = _dequantized(child, dtype, f"{name}.{key}", integer, keep)
        elif isinstance(child, list):
            module[key] = [_dequantized(c, dtype, f"{name}.{key}.{i}", integer, keep)
                           if isinstance(c, nn.Module) else c for i, c in enumerate(child)]
    return module


def _cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    # Quantized tensors (uint32) and their scales keep their own types, except
    # float32 scales (GGUF K-quants') under half-precision activations, which
    # would otherwise turn every later activation into float32.
    def cast(path: str, a: mx.array) -> mx.array:
        if not mx.issubdtype(a.dtype, mx.floating):
            return a
        if not path.endswith(("scales", "biases")) or (a.dtype == mx.float32
                                                         and dtype != mx.float32):
            return a.astype(dtype)
        return a

    from mlx.utils import tree_map_with_path
    model.update(tree_map_with_path(cast, model.parameters()))


def load_model(path: Path, *, dtype: str | None = None, keep_quantized: bool | None = None,
               cpu_matmul: str | None = None,
               platform: Platform | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model in `path` in the fastest weight format for `platform`
    (None: the current device's)."""
    platform = platform or current_platform()
    config = load_config(path)
    module = model_module(config["model_type"])
    check_checkpoint(path, config)  # before anything is allocated
    try:
        args = module.ModelArgs.from_dict(config)
        model = module.Model(args)
    # Arithmetic on config values an architecture checks itself, or that
    # check_checkpoint cannot know about, fails here as the config's error.
    except (TypeError, ValueError, KeyError, ZeroDivisionError, OverflowError) as exc:
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ModelLoadError(f"invalid config.json in {path}: {first}") from None
    weights = model.sanitize(load_weights(path))
    _quantize(model, config, weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise ModelLoadError(f"weights in {path} do not match its config: "
                             f"{str(exc).splitlines()[0]}") from None
    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
                    for _, m in model.named_modules())
    fmt: WeightFormat = platform.weight_format(quantized, config, dtype, keep_quantized)
    platform.prepare_memory()
    reason = fmt.reason
    if quantized and fmt.keep_quantized:
        # Layers in group sizes this device's quantized kernels lack become float.
        model = _dequantized(model, fmt.dtype, keep=platform.quantized_group_sizes)
    elif quantized:
        integer = platform.integer_matmul(fmt, cpu_matmul)
        model = _dequantized(model, fmt.dtype, integer=integer)
        if integer is not None:
            acts = "int16" if integer[1] else "int8"
            reason = reason.replace("dequantized to float32 (--keep-quantized keeps them)",
                                    f"kept as integer codes, activations {acts} per group "
                                    "(AVX-512 VNNI kernel; --cpu-matmul chooses)")
    _cast_floats(model, fmt.dtype)
    mx.eval(model.parameters())
    platform.log_once(reason)
    model.eval()
    return model, config
