"""GGUF architectures beyond llama (engine/loading/gguf_arch.py) and
SentencePiece vocabularies (engine/loading/gguf_tokenizer.py).

Each test starts from a tiny Hugging Face-layout checkpoint, writes the GGUF
llama.cpp's converter would make of it (names, metadata and changed values
written here from the converter's description, not from the importer's
tables), imports it, and checks the result computes what the original does:
qwen2, qwen3 and phi3 through Conveyor against mlx-lm on the original;
gemma2 and gemma3 (whose model files live elsewhere) through mlx-lm on both.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from gguf_files import byte_level_vocab, write_gguf_file
from mlx_lm_oracle import short_longrope
from test_gguf_import import llamacpp_permute
from test_phi3 import HEADS, HIDDEN, longrope, write_tiny_phi3
from tiny_models import TINY_QWEN2, TINY_QWEN3, write_byte_tokenizer, write_tiny_llama

from engine import LLM, SamplingParams
from engine.errors import ModelLoadError
from engine.loading.gguf import import_gguf
from engine.loading.loader import load_model

IDS = np.random.default_rng(0).integers(0, 320, size=40).astype(np.int32)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

# HF module inside model.layers.N -> llama.cpp's tensor name
_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.qkv_proj": "attn_qkv", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_GEMMA_BLOCK = {**_BLOCK, "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def to_gguf(src, dst, arch, extra_meta=None, norm_shift=0.0, quant=None, extra_tensors=None):
    """The GGUF llama.cpp's converter writes for the HF checkpoint `src`
    (F32 tensors, or `quant` for 2-D weights whose rows allow it)."""
    config = json.loads((src / "config.json").read_text())
    weights = {k: np.array(v) for f in sorted(src.glob("*.safetensors"))
               for k, v in mx.load(str(f)).items()}
    block = _GEMMA_BLOCK if arch.startswith("gemma") else _BLOCK
    tensors = {}
    for name, value in weights.items():
        module, _, suffix = name.rpartition(".")
        if module in _TOP:
            gguf_name = f"{_TOP[module]}.{suffix}"
        else:
            _, _, layer, inner = module.split(".", 3)
            gguf_name = f"blk.{layer}.{block[inner]}.{suffix}"
        if norm_shift and module.endswith("norm"):
            value = value + norm_shift
        if arch == "llama" and module.endswith(("q_proj", "k_proj")):
            heads = config["num_attention_heads" if "q_proj" in module else "num_key_value_heads"]
            value = llamacpp_permute(value, heads)
        kind = quant if quant and value.ndim == 2 and value.shape[1] % 32 == 0 else "F32"
        tensors[gguf_name] = (kind, value)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    meta = {f"{arch}.{k}": v for k, v in (
        ("block_count", config["num_hidden_layers"]), ("context_length", 2048),
        ("embedding_length", config["hidden_size"]),
        ("feed_forward_length", config["intermediate_size"]),
        ("attention.head_count", heads),
        ("attention.head_count_kv", config["num_key_value_heads"]),
        ("attention.key_length", head_dim), ("attention.value_length", head_dim),
        ("attention.layer_norm_rms_epsilon", float(config["rms_norm_eps"])),
        ("rope.freq_base", float(config.get("rope_theta", 10000.0))))}
    meta.update(byte_level_vocab(config["vocab_size"]))
    meta["tokenizer.chat_template"] = "{{ messages[0]['content'] }}"
    meta.update(extra_meta or {})
    return write_gguf_file(dst, arch, meta, {**tensors, **(extra_tensors or {})})


def imported(tmp_path, src, arch, **kwargs):
    return import_gguf(to_gguf(src, tmp_path / f"{arch}.gguf", arch, **kwargs),
                       tmp_path / f"{arch}-imported")


def mlx_lm_logits(path):
    from mlx_lm.utils import load_model as mlx_lm_load

    model, _ = mlx_lm_load(path)
    scaling = json.loads((path / "config.json").read_text()).get("rope_scaling") or {}
    if scaling.get("type") == "longrope":
        short_longrope(model, scaling)
    return np.array(model(mx.array(IDS)[None]))[0]


def ours_match_mlx_lm(out, src, atol=1e-4):
    model, _ = load_model(out)
    np.testing.assert_allclose(np.array(model(mx.array(IDS))), mlx_lm_logits(src),
                               rtol=1e-4, atol=atol)


def test_qwen2_gguf(tmp_path):
    src = write_tiny_llama(tmp_path / "qwen2", **TINY_QWEN2)
    out = imported(tmp_path, src, "qwen2")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["attention_bias"] is True
    assert config["tie_word_embeddings"] is True
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok["chat_template"] == "{{ messages[0]['content'] }}"  # the GGUF's own
    ours_match_mlx_lm(out, src)


def test_qwen3_gguf_on_both_paths(tmp_path):
    """head_dim (32) is not hidden / heads (16): it comes from key_length."""
    src = write_tiny_llama(tmp_path / "qwen3", **TINY_QWEN3)
    out = imported(tmp_path, src, "qwen3")
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["head_dim"]) == ("qwen3", 32)
    ours_match_mlx_lm(out, src)
    prompts = [list(range(5, 5 + n)) for n in (3, 40)]
    fast = LLM(str(out), kv_cache_bytes=16 << 20)
    assert fast.engine.runner.host_forward is not None
    slow = LLM(str(out), kv_cache_bytes=16 << 20, host_forward=False)
    assert [o.outputs[0].token_ids for o in fast.generate(prompts, GREEDY, use_tqdm=False)] \
        == [o.outputs[0].token_ids for o in slow.generate(prompts, GREEDY, use_tqdm=False)]


def test_phi3_gguf_with_longrope_factors(tmp_path):
    """Phi-4-mini's shape: LongRoPE factors as tensors, 3/4 of each head rotated."""
    rotated = int(HIDDEN // HEADS * 0.75)
    scaling = longrope(rotated)
    src = write_tiny_phi3(tmp_path / "phi3", partial_rotary_factor=0.75,
                          rope_scaling=scaling, max_position_embeddings=2048,
                          original_max_position_embeddings=512)
    factors = {"rope_factors_long.weight": ("F32", np.array(scaling["long_factor"])),
               "rope_factors_short.weight": ("F32", np.array(scaling["short_factor"]))}
    gguf = to_gguf(src, tmp_path / "phi3.gguf", "phi3", extra_tensors=factors, extra_meta={
        "phi3.rope.dimension_count": rotated, "phi3.rope.scaling.original_context_length": 512})
    out = import_gguf(gguf, tmp_path / "phi3-imported")
    config = json.loads((out / "config.json").read_text())
    assert config["partial_rotary_factor"] == 0.75
    assert config["original_max_position_embeddings"] == 512
    assert config["rope_scaling"]["type"] == "longrope"
    np.testing.assert_allclose(config["rope_scaling"]["long_factor"], scaling["long_factor"],
                               rtol=1e-6)
    ours_match_mlx_lm(out, src)


def write_tiny_gemma(path, model_type, seed=0):
    rng = np.random.default_rng(seed)
    d, f, heads, kv, hd, v = 64, 96, 4, 2, 16, 320
    layers = 6 if model_type == "gemma3_text" else 2  # a whole sliding/global pattern
    config = {"model_type": model_type, "hidden_size": d, "num_hidden_layers": layers,
              "intermediate_size": f, "num_attention_heads": heads, "head_dim": hd,
              "num_key_value_heads": kv, "rms_norm_eps": 1e-6, "vocab_size": v,
              "query_pre_attn_scalar": hd}
    if model_type == "gemma3_text":
        config.update(rope_theta=1000000.0, sliding_window=512, sliding_window_pattern=6)

    def w(*shape, scale=0.08):
        return mx.array(rng.normal(0, scale, size=shape).astype(np.float32))

    weights = {"model.embed_tokens.weight": w(v, d, scale=0.5), "model.norm.weight": w(d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights.update({p + "self_attn.q_proj.weight": w(heads * hd, d),
                        p + "self_attn.k_proj.weight": w(kv * hd, d),
                        p + "self_attn.v_proj.weight": w(kv * hd, d),
                        p + "self_attn.o_proj.weight": w(d, heads * hd),
                        p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                        p + "mlp.down_proj.weight": w(d, f)})
        for norm in ("input_layernorm", "post_attention_layernorm",
                     "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            weights[p + norm + ".weight"] = w(d)
        if model_type == "gemma3_text":
            weights[p + "self_attn.q_norm.weight"] = w(hd)
            weights[p + "self_attn.k_norm.weight"] = w(hd)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    write_byte_tokenizer(path)
    return path


@pytest.mark.parametrize("arch, model_type", [("gemma2", "gemma2"),
                                              ("gemma3", "gemma3_text")])
def test_gemma_gguf_maps_to_mlx_lms_checkpoint(tmp_path, arch, model_type):
    """The norms come back as Gemma's `weight` (GGUF stores 1 + weight), the
    post/pre feed-forward norms under their names, llama.cpp's fixed values
    (attention scale, local RoPE base, window pattern) as config keys."""
    src = write_tiny_gemma(tmp_path / "src", model_type)
    extra = {f"{arch}.attention.sliding_window": 512}
    if arch == "gemma2":
        extra.update({"gemma2.attn_logit_softcapping": 50.0,
                      "gemma2.final_logit_softcapping": 30.0})
    out = imported(tmp_path, src, arch, extra_meta=extra, norm_shift=1.0)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type and config["query_pre_attn_scalar"] == 16
    assert config["hidden_activation"] == "gelu_pytorch_tanh"
    if arch == "gemma3":
        assert (config["sliding_window_pattern"], config["rope_local_base_freq"]) == (6, 10000.0)
    ours, theirs = (mx.load(str(p / "model.safetensors")) for p in (out, src))
    assert sorted(ours) == sorted(theirs)
    np.testing.assert_allclose(np.array(ours["model.layers.1.pre_feedforward_layernorm.weight"]),
                               np.array(theirs["model.layers.1.pre_feedforward_layernorm.weight"]),
                               atol=1e-7)
    np.testing.assert_allclose(mlx_lm_logits(out), mlx_lm_logits(src), rtol=1e-4, atol=1e-4)


def test_quantized_qwen3_gguf(tmp_path):
    """Q5_0 weights stay 5-bit codes: the fast path's logits are within 0.1%
    of their float32 dequantization, which is within quantization error of
    the float original."""
    src = write_tiny_llama(tmp_path / "qwen3", **TINY_QWEN3)
    out = imported(tmp_path, src, "qwen3", quant="Q5_0")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 5
    dense, _ = load_model(out, cpu_matmul="float32")
    exact = np.array(dense(mx.array(IDS)))
    assert np.abs(exact - mlx_lm_logits(src)).max() < 0.1 * np.abs(exact).max()
    model, _ = load_model(out)
    assert np.abs(np.array(model(mx.array(IDS))) - exact).max() < 1e-3 * np.abs(exact).max()


# -- SentencePiece vocabularies ---------------------------------------------------

@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    """A tiny SentencePiece BPE model (byte fallback, one user-defined
    symbol), trained here with Llama's settings: no normalisation, spaces kept."""
    spm = pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("spm")
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while counting 12 345 numbers".split()
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "m"), model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, user_defined_symbols=["<tool>"],
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(root / "m.model"))


def spm_metadata(sp) -> dict:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return {"tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
            "tokenizer.ggml.scores": [float(p.score) for p in proto.pieces],
            # SentencePiece's piece types are GGUF's token types
            "tokenizer.ggml.token_type": [int(p.type) for p in proto.pieces],
            "tokenizer.ggml.bos_token_id": sp.bos_id(),
            "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id()}


def test_sentencepiece_vocabulary_encodes_as_sentencepiece(tmp_path, sentencepiece_model):
    sp = sentencepiece_model
    src = write_tiny_llama(tmp_path / "src", vocab_size=sp.get_piece_size(),
                           bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id())
    out = imported(tmp_path, src, "llama", extra_meta=spm_metadata(sp))
    llm = LLM(str(out), kv_cache_bytes=16 << 20)
    tok = llm.engine.tokenizer
    assert tok.add_bos_token  # "llama" vocabularies start with BOS unless told not to
    for text in ["the quick brown fox", "  two  spaces", "jumps 12345 ünï 日本 ✓", "x"]:
        want = sp.encode(text)
        assert tok.encode(text) == [sp.bos_id()] + want, text
        assert tok.decode(want) == text
    # Added tokens split the text, and each stretch gets its prefix space (llama.cpp's rule).
    tool = sp.piece_to_id("<tool>")
    assert tok.encode("the<tool>dog") == [sp.bos_id(), *sp.encode("the"), tool,
                                          *sp.encode("dog")]
    out = llm.generate(["the lazy dog"], GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 12


def test_sentencepiece_vocabulary_needs_scores(tmp_path, sentencepiece_model):
    src = write_tiny_llama(tmp_path / "src", vocab_size=sentencepiece_model.get_piece_size())
    meta = spm_metadata(sentencepiece_model)
    meta["tokenizer.ggml.scores"] = meta["tokenizer.ggml.scores"][:10]
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.scores") as exc:
        imported(tmp_path, src, "llama", extra_meta=meta)
    assert "\n" not in str(exc.value)
