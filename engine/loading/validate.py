"""Check a checkpoint's config against its weight files before building it.

A model is built from config.json's numbers, so a hostile or broken config
could ask for three million layers, a zero-sized head or a vocabulary no file
holds, and the process would divide by zero or allocate until it is killed.
Everything here runs before the model exists and uses only what is common to
mlx-lm model configs (hidden_size, num_hidden_layers, heads, vocab_size, ...)
and the names and sizes of the tensors actually present, so a new file in
models/ never needs a change here. Each problem is a ModelLoadError of one line
naming the field. docs/model_files.md lists the rules.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from engine.errors import ModelLoadError

# Dimensions: positive integers (or, for models with per-layer values, lists of
# them); None only where architectures derive the value from others.
DIMENSIONS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
              "type_vocab_size")
DERIVED_WHEN_NONE = ("num_key_value_heads", "head_dim")
PER_LAYER = ("intermediate_size", "num_attention_heads", "num_key_value_heads")  # may be lists
MAX_DIMENSION = 2**31 - 1  # MLX shapes are int32
EPSILONS = ("rms_norm_eps", "layer_norm_eps", "norm_eps", "layer_norm_epsilon")
TOKEN_IDS = ("bos_token_id", "pad_token_id", "eos_token_id")
QUANT_BITS = (1, 2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (16, 32, 64, 128)  # 16: GGUF Q6_K sub-blocks (engine/loading/gguf_quants.py)
QUANT_MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")

# The model's parameters, counted from the config at the fewest bits a weight
# can have (the checkpoint's quantization, else 8), may exceed the weight files'
# bytes by at most this factor. Real checkpoints sit below 1: the count is a
# lower bound (attention and MLP projections and the embedding only).
MAX_PARAMETER_BYTES_PER_FILE_BYTE = 4

# safetensors dtypes and their sizes in bytes.
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2,
                      "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8,
                      "I64": 8, "F64": 8, "C64": 8}
MAX_SAFETENSORS_HEADER = 100 << 20  # the format's own reference limit


class WeightIndex(msgspec.Struct, frozen=True):
    """The tensors a checkpoint's files hold (name -> shape) and the files' size."""

    shapes: dict[str, tuple[int, ...]]
    nbytes: int


def check_checkpoint(path: Path, config: Mapping[str, Any]) -> None:
    """Check the directory `path`: its *.safetensors headers, and its config
    against them. Called by the loader before it builds anything."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    check_config(config, read_safetensors_index(files), str(Path(path) / "config.json"))


# ---------------------------------------------------------------------------
# safetensors headers


class _TensorEntry(msgspec.Struct):
    dtype: str
    shape: list[int]
    data_offsets: tuple[int, int]


_HEADER = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ENTRY = msgspec.json.Decoder(_TensorEntry)
_METADATA = msgspec.json.Decoder(dict[str, str] | None)


def read_safetensors_index(files: Iterable[Path]) -> WeightIndex:
    """Names and shapes of the tensors in `files`, each checked to lie inside
    its file at the size its dtype and shape say. Reads only the headers."""
    shapes: dict[str, tuple[int, ...]] = {}
    total = 0
    for file in files:
        file = Path(file)
        try:
            with open(file, "rb") as f:
                size = f.seek(0, 2)
                f.seek(0)
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if not 0 < n <= min(MAX_SAFETENSORS_HEADER, size - 8):
                    raise ModelLoadError(f"cannot read {file}: not a safetensors file "
                                         "(bad header length)")
                header = f.read(n)
        except OSError as exc:
            raise ModelLoadError(f"cannot read {file}: {exc.strerror or exc}") from None
        total += size
        shapes.update(_tensor_shapes(file, header, size - 8 - n))
    return WeightIndex(shapes, total)


def _tensor_shapes(file: Path, header: bytes, data_size: int) -> dict[str, tuple[int, ...]]:
    try:
        entries = _HEADER.decode(header)
    except msgspec.DecodeError as exc:
        raise ModelLoadError(f"cannot read {file}: malformed safetensors header ({exc})") from None
    shapes = {}
    for name, raw in entries.items():
        try:
            if name == "__metadata__":
                _METADATA.decode(raw)
                continue
            entry = _ENTRY.decode(raw)
        except msgspec.DecodeError as exc:
            raise ModelLoadError(f"cannot read {file}: tensor {name!r}: {exc}") from None
        itemsize = SAFETENSORS_DTYPES.get(entry.dtype)
        begin, end = entry.data_offsets
        if itemsize is None:
            raise ModelLoadError(f"cannot read {file}: tensor {name!r} has unknown dtype "
                                 f"{entry.dtype!r}")
        if any(d < 0 for d in entry.shape) or not 0 <= begin <= end <= data_size:
            raise ModelLoadError(f"cannot read {file}: tensor {name!r} has shape "
                                 f"{entry.shape} at bytes {begin}..{end} of {data_size}")
        if math.prod(entry.shape) * itemsize != end - begin:
            raise ModelLoadError(f"cannot read {file}: tensor {name!r} of shape {entry.shape} "
                                 f"({entry.dtype}) does not take {end - begin} bytes")
        shapes[name] = tuple(entry.shape)
    return shapes


# ---------------------------------------------------------------------------
# config.json


def check_config(config: Mapping[str, Any], weights: WeightIndex, where: str,
                 names: Mapping[str, str] | None = None) -> None:
    """Raise ModelLoadError unless `config` is safe to build from `weights`.

    `where` starts each message (a file name); `names` maps config keys to the
    names the user knows them by (a GGUF import passes its metadata keys)."""
    names = names or {}

    def fail(key: str, problem: str) -> ModelLoadError:
        # `key` may be a list of fields ("a, b and c"): each is renamed.
        named = re.sub(r"[a-z_]+", lambda m: names.get(m.group(0), m.group(0)), key)
        return ModelLoadError(f"{where}: {named} {problem}")

    sections = [config]
    if isinstance(config.get("text_config"), dict):  # multimodal configs nest the LM
        sections.append(config["text_config"])
    for section in sections:
        _check_fields(section, fail)
        _check_heads(section, fail)
        _check_layers(section, weights, fail)
    quant = config.get("quantization") or config.get("quantization_config")
    bits = _check_quantization(quant, weights, fail) if quant is not None else 8
    for section in sections:
        _check_size(section, weights, bits, fail)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value)


def _check_fields(cfg: Mapping[str, Any], fail) -> None:
    for key in DIMENSIONS:
        if key not in cfg or (cfg[key] is None and key in DERIVED_WHEN_NONE):
            continue
        value = cfg[key]
        values = value if key in PER_LAYER and isinstance(value, list) and value else [value]
        if not all(_is_int(v) and 0 < v <= MAX_DIMENSION for v in values):
            raise fail(key, f"must be a positive integer (at most {MAX_DIMENSION}), "
                            f"not {_short(value)}")
    for key in EPSILONS:
        if key in cfg and not (_is_number(cfg[key]) and cfg[key] >= 0):
            raise fail(key, f"must be a finite number >= 0, not {_short(cfg[key])}")
    if "rope_theta" in cfg and not (_is_number(cfg["rope_theta"]) and cfg["rope_theta"] > 0):
        raise fail("rope_theta", f"must be a finite number > 0, not {_short(cfg['rope_theta'])}")
    for key in TOKEN_IDS:
        value = cfg.get(key)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(_is_int(i) and abs(i) <= MAX_DIMENSION for i in ids):
            raise fail(key, f"must be a token id or null, not {_short(value)}")
    for key in ("torch_dtype", "dtype"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise fail(key, f"must be a string, not {_short(cfg[key])}")
    _check_rope_scaling(cfg.get("rope_scaling"), fail)


def _check_rope_scaling(scaling: Any, fail) -> None:
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise fail("rope_scaling", f"must be an object or null, not {_short(scaling)}")
    for key in ("type", "rope_type"):
        if scaling.get(key) is not None and not isinstance(scaling[key], str):
            raise fail("rope_scaling", f"{key} must be a string, not {_short(scaling[key])}")
    for key in ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"):
        if key in scaling and not (_is_number(scaling[key]) and scaling[key] > 0):
            raise fail("rope_scaling", f"{key} must be a finite number > 0, "
                                       f"not {_short(scaling[key])}")


def _check_heads(cfg: Mapping[str, Any], fail) -> None:
    heads, kv_heads = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    hidden = cfg.get("hidden_size")
    if _is_int(heads) and _is_int(kv_heads) and heads % kv_heads:
        raise fail("num_key_value_heads", f"({kv_heads}) must divide num_attention_heads "
                                          f"({heads})")
    if cfg.get("head_dim") is None and _is_int(heads) and _is_int(hidden) and hidden % heads:
        raise fail("hidden_size", f"({hidden}) must be a multiple of num_attention_heads "
                                  f"({heads}) when head_dim is not given")


_FIRST_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _numbered_layers(names: Iterable[str]) -> int:
    """How many consecutive layers (0, 1, ...) the largest numbered list of
    modules in `names` holds, counting each name's first index
    ("model.layers.7.mlp...", "encoder.layer.7...", "blk.7...")."""
    lists: dict[str, set[int]] = {}
    for name in names:
        m = _FIRST_INDEX.search(name)
        if m:
            lists.setdefault(name[:m.start(1)], set()).add(int(m.group(1)))
    best = 0
    for indices in lists.values():
        count = 0
        while count in indices:
            count += 1
        best = max(best, count)
    return best


def _check_layers(cfg: Mapping[str, Any], weights: WeightIndex, fail) -> None:
    layers = cfg.get("num_hidden_layers")
    if not _is_int(layers):
        return
    present = _numbered_layers(weights.shapes)
    # At least that many: some checkpoints carry extra layers that sanitize()
    # drops (e.g. multi-token-prediction heads); the strict load catches fewer.
    if present < layers:
        raise fail("num_hidden_layers", f"({layers}) and the weights ({present} numbered "
                                        "layers) do not match")


def _check_quantization(quant: Any, weights: WeightIndex, fail) -> int:
    """The fewest bits any quantized layer uses. Per-layer entries (keys naming
    a module with weights) must be a flag or parameters that fit the packed
    weight and scales the files hold, since the loader hands them to
    nn.quantize as they are."""
    if not isinstance(quant, dict):
        raise fail("quantization", f"must be an object, not {_short(quant)}")
    bits = []
    for key, value in [("", quant), *quant.items()]:
        label = f"quantization {key}".strip()
        if key and f"{key}.weight" in weights.shapes and not isinstance(value, (bool, dict)):
            raise fail(label, f"must be true, false or an object, not {_short(value)}")
        if not isinstance(value, dict):
            continue  # a flag (False: a float layer) or metadata such as quant_method
        unknown = sorted(set(value) - {"group_size", "bits", "mode"})
        if key and unknown:
            raise fail(label, f"has unknown keys {_short(unknown)}")
        if "bits" in value and not (_is_int(value["bits"]) and value["bits"] in QUANT_BITS):
            raise fail(label, f"bits must be one of {QUANT_BITS}, not {_short(value['bits'])}")
        if "group_size" in value and not (_is_int(value["group_size"])
                                          and value["group_size"] in QUANT_GROUP_SIZES):
            raise fail(label, f"group_size must be one of {QUANT_GROUP_SIZES}, "
                              f"not {_short(value['group_size'])}")
        if "mode" in value and value["mode"] not in QUANT_MODES:
            raise fail(label, f"mode must be one of {QUANT_MODES}, not {_short(value['mode'])}")
        bits.append(value.get("bits", 4))
    _check_packing(quant, weights, fail)
    return min(bits)


def _check_packing(quant: dict, weights: WeightIndex, fail) -> None:
    """Each quantized weight (uint32 words) and its scales (one per group)
    describe the same input width under the bits and group size it gets."""
    for name, scales in weights.shapes.items():
        module = name.removesuffix(".scales")
        weight = weights.shapes.get(f"{module}.weight")
        if module == name or not weight or not scales:
            continue
        # nn.quantize: an object gives its own parameters (MLX's defaults for
        # the rest), a flag or nothing the checkpoint's.
        own = quant.get(module)
        params = own if isinstance(own, dict) else {}
        group = params.get("group_size", 64 if params else quant.get("group_size", 64))
        bits = params.get("bits", 4 if params else quant.get("bits", 4))
        if weight[-1] * 32 != scales[-1] * group * bits:
            raise fail("quantization", f"(group_size {group}, bits {bits}) does not fit "
                       f"{module}: weight {list(weight)}, scales {list(scales)}")


def _smallest(value: Any) -> int:
    if isinstance(value, list):
        return min(value)
    return value if _is_int(value) else 0


def _check_size(cfg: Mapping[str, Any], weights: WeightIndex, bits: int, fail) -> None:
    hidden = _smallest(cfg.get("hidden_size"))
    heads = _smallest(cfg.get("num_attention_heads"))
    head_dim = _smallest(cfg.get("head_dim")) or (hidden // heads if heads else 0)
    per_layer = 2 * hidden * heads * head_dim + 2 * hidden * _smallest(
        cfg.get("intermediate_size"))
    params = _smallest(cfg.get("num_hidden_layers")) * per_layer + hidden * _smallest(
        cfg.get("vocab_size"))
    need = params * bits // 8
    if need > MAX_PARAMETER_BYTES_PER_FILE_BYTE * weights.nbytes:
        raise fail("num_hidden_layers, hidden_size, intermediate_size and vocab_size",
                   f"describe at least {need:,} bytes of weights, but the weight files "
                   f"hold {weights.nbytes:,}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
