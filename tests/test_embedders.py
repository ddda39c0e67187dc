"""Embedders beyond BERT: XLM-RoBERTa encoders and decoders with last-token
pooling (Qwen3-Embedding), on the CPU fast path and the portable path.

Oracles: for XLM-RoBERTa, a numpy transcription of Hugging Face's RobertaModel
(torch is not installed here); for the decoder, mlx-lm's qwen3 hidden states
at each text's last token. Both checkpoints are tiny, random and written here.
Tolerances (cosine to the oracle, per text): float32 paths >= 0.99999; the
default fast path (weights as 16-bit codes, int16 activations) >= 0.9999.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import TINY_GEMMA2, TINY_MISTRAL, TINY_QWEN3, write_tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

import engine  # noqa: F401  (preloads the BLAS before mlx)
from engine.embedding.pooling import Pooling, pool, pool_host
from engine.errors import ModelLoadError

TEXTS = ["hello world", "a", "the cat sat on the mat and then it sat on the hat",
         "", "xyz " * 30, "naïve café"]
# The tiny decoder's byte tokenizer adds no special tokens: no empty text.
DECODER_TEXTS = [t for t in TEXTS if t]
FLOAT32, CODES = 0.99999, 0.9999


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _normalized(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def write_sentence_transformers_files(path: Path, mode: str, dim: int) -> None:
    """modules.json (Transformer, Pooling `mode`, Normalize) as the hub ships them."""
    kinds = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    (path / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": p, "type": f"sentence_transformers.models.{k}"}
        for i, (p, k) in enumerate(kinds)]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": dim, f"pooling_mode_{mode}": True}))


def _three_ways(path: Path):
    """The default fast path (16-bit codes), the float32 fast path, the portable path."""
    from engine.embedding.embedder import Embedder

    fast, f32 = Embedder.load(path), Embedder.load(path, cpu_matmul="float32")
    portable = Embedder.load(path, fast_path=False)
    assert fast.cpu_matmul == "int16" and f32.cpu_matmul == "float32"
    assert not portable.fast_path
    return {"int16": fast, "float32": f32, "portable": portable}


def _check_against(embedders: dict, texts: list[str], expected: np.ndarray) -> None:
    for name, emb in embedders.items():
        result = emb.embed(texts)
        cos = _cosines(result.vectors, expected)
        assert cos.min() >= (CODES if name == "int16" else FLOAT32), (name, cos)
        np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)


# --- the kernel and pooling ---------------------------------------------------------

@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 32), (2, 1, 64), (3, 3, 24),
                                                       (2, 2, 128)])
def test_causal_encoder_attention_kernel_matches_mlx(heads, kv_heads, head_dim):
    from engine.platform import cpu_ops
    from models.layers.encoder_attention import EncoderAttentionView

    ops = cpu_ops.load()
    assert ops is not None, "the CPU kernels must build in CI, never be skipped"
    rng = np.random.default_rng(head_dim)
    b, t = 4, 37
    q = rng.normal(size=(b * t, heads, head_dim)).astype(np.float32)
    k = rng.normal(size=(b * t, kv_heads, head_dim)).astype(np.float32)
    v = rng.normal(size=(b * t, kv_heads, head_dim)).astype(np.float32)
    lengths = np.array([t, 1, 20, 16], np.int32)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    scale = head_dim ** -0.5
    view = EncoderAttentionView.for_batch(mx.zeros((b, t), mx.int32), mx.array(mask),
                                          causal=True)
    expected = np.array(view.attend(mx.array(q), mx.array(k), mx.array(v), scale))
    real = mask.reshape(-1).astype(bool)
    out = ops.encoder_attention(q, k, v, b, t, lengths, scale, causal=True)
    np.testing.assert_allclose(out[real], expected[real], atol=2e-6)
    assert not out[~real].any()
    # The numpy fallback of the view (no kernel given) agrees too.
    host = EncoderAttentionView.for_batch(np.zeros((b, t), np.int32), mask, causal=True)
    np.testing.assert_allclose(host.attend_host(q, k, v, scale)[real], expected[real],
                               atol=2e-6)
    # The first token sees only itself: its output is its own value.
    first = np.repeat(v[0], heads // kv_heads, axis=0)
    np.testing.assert_allclose(out[0], first, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_pooling_either_padding(side):
    rng = np.random.default_rng(2)
    hidden = rng.normal(size=(3, 6, 4)).astype(np.float32)
    lengths = np.array([6, 2, 1])
    right = np.arange(6)[None] < lengths[:, None]
    mask = (right if side == "right" else right[:, ::-1]).astype(np.int32)
    last = lengths - 1 if side == "right" else np.full(3, 5)
    expected = _normalized(hidden[np.arange(3), last])
    pooling = Pooling(modes=("lasttoken",), normalize=True)
    np.testing.assert_allclose(pool_host(hidden, mask, pooling), expected, atol=1e-6)
    np.testing.assert_allclose(np.array(pool(mx.array(hidden), mx.array(mask), pooling)),
                               expected, atol=1e-6)


# --- decoders with last-token pooling (Qwen3-Embedding) --------------------------

@pytest.fixture(scope="module")
def qwen3_embedding(tmp_path_factory):
    """A tiny Qwen3 with sentence-transformers files asking for last-token
    pooling and normalisation, as Qwen3-Embedding ships."""
    path = write_tiny_llama(tmp_path_factory.mktemp("emb") / "qwen3", **TINY_QWEN3)
    write_sentence_transformers_files(path, "lasttoken", TINY_QWEN3["hidden_size"])
    return path


def _mlx_lm_last_tokens(path: Path, ids: list[list[int]]) -> np.ndarray:
    """mlx-lm's qwen3: the final-norm hidden state at each text's last token,
    each text run alone (no padding), normalised."""
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    return _normalized(np.stack([np.array(model.model(mx.array([t]))[0, -1]) for t in ids]))


def test_qwen3_embedding_matches_mlx_lm(qwen3_embedding):
    embedders = _three_ways(qwen3_embedding)
    fast = embedders["int16"]
    assert fast.pooling == Pooling(("lasttoken",), True) and fast.dim == 64
    assert fast.max_length == TINY_QWEN3["max_position_embeddings"]
    ids, _ = fast.tokenize(DECODER_TEXTS)
    assert len({len(t) for t in ids}) > 3  # rows of a batch really are padded
    _check_against(embedders, DECODER_TEXTS, _mlx_lm_last_tokens(qwen3_embedding, ids))
    # Batched equals one at a time (padding never leaks into a row).
    alone = np.stack([fast.embed([t]).vectors[0] for t in DECODER_TEXTS])
    np.testing.assert_allclose(fast.embed(DECODER_TEXTS).vectors, alone, atol=1e-5)


def test_headless_qwen3_checkpoint_embeds_and_refuses_to_generate(qwen3_embedding, tmp_path):
    """Qwen3-Embedding's files: names without the "model." prefix, untied and
    without an LM head. It embeds exactly as the full checkpoint; generation
    is a one-line error."""
    from engine.embedding.embedder import Embedder
    from engine.entrypoints.llm import LLM

    untied = write_tiny_llama(tmp_path / "untied", **{**TINY_QWEN3, "tie_word_embeddings": False})
    write_sentence_transformers_files(untied, "lasttoken", TINY_QWEN3["hidden_size"])
    headless = tmp_path / "headless"
    headless.mkdir()
    weights = mx.load(str(next(untied.glob("*.safetensors"))))
    mx.save_safetensors(str(headless / "model.safetensors"), {
        k.removeprefix("model."): v for k, v in weights.items() if not k.startswith("lm_head.")})
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "modules.json"):
        (headless / f).write_text((untied / f).read_text())
    (headless / "1_Pooling").mkdir()
    (headless / "1_Pooling" / "config.json").write_text(
        (untied / "1_Pooling" / "config.json").read_text())
    ours = Embedder.load(headless, cpu_matmul="float32")
    ids, _ = ours.tokenize(DECODER_TEXTS)
    cos = _cosines(ours.embed(DECODER_TEXTS).vectors, _mlx_lm_last_tokens(untied, ids))
    assert cos.min() >= FLOAT32
    with pytest.raises(ModelLoadError, match="is an embedding model .*task='embed'"):
        LLM(str(headless))


def test_sliding_window_decoder_cuts_texts_to_its_window(tmp_path):
    """Inside its window a sliding layer sees the whole text, so a Mistral-
    style embedder cuts texts there (flagged) and is exact on what it keeps;
    soft-capped attention (Gemma 2) is refused at load, in one line."""
    from engine.embedding.embedder import Embedder

    path = write_tiny_llama(tmp_path / "mistral", **TINY_MISTRAL)
    write_sentence_transformers_files(path, "lasttoken", TINY_MISTRAL["hidden_size"])
    emb = Embedder.load(path, cpu_matmul="float32")
    assert emb.max_length == TINY_MISTRAL["sliding_window"]
    result = emb.embed(DECODER_TEXTS)
    ids, truncated = emb.tokenize(DECODER_TEXTS)
    assert result.truncated == truncated and truncated[0] and not truncated[1]
    cos = _cosines(result.vectors, _mlx_lm_last_tokens(path, ids))
    assert cos.min() >= FLOAT32
    gemma = write_tiny_llama(tmp_path / "gemma2", **TINY_GEMMA2)
    with pytest.raises(ModelLoadError, match="soft-capped attention cannot embed"):
        Embedder.load(gemma)


def test_llm_embed_serves_decoder_embeddings(qwen3_embedding):
    """LLM(task="embed") (like the server, batch jobs and the worker) loads
    through Embedder.load: the decoder's vectors come out of the same API."""
    from engine.embedding.embedder import Embedder
    from engine.entrypoints.llm import LLM

    llm = LLM(str(qwen3_embedding), task="embed")
    vectors = llm.embed(DECODER_TEXTS)
    expected = Embedder.load(qwen3_embedding).embed(DECODER_TEXTS).vectors
    np.testing.assert_allclose(vectors, expected, atol=1e-6)


# --- XLM-RoBERTa -----------------------------------------------------------------

TINY_XLMR = {
    "model_type": "xlm-roberta", "architectures": ["XLMRobertaModel"], "vocab_size": 64,
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 64, "hidden_act": "gelu", "max_position_embeddings": 26,
    "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0,
    "eos_token_id": 2, "position_embedding_type": "absolute",
}


def _unigram_tokenizer(path: Path, vocab_size: int) -> None:
    """A SentencePiece-style Unigram vocabulary with XLM-R's specials
    (<s> 0, <pad> 1, </s> 2, <unk> 3) and its "<s> text </s>" template."""
    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    words = ["▁the", "▁cat", "▁sat", "▁on", "▁mat", "▁hello", "▁world", "▁a", "▁and",
             "▁it", "▁hat", "▁then", "at", "he", "▁x", "yz", "ï", "é"]
    pieces += [(w, -1.0) for w in words]
    pieces = pieces[:vocab_size]
    tok = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.save(str(path / "tokenizer.json"))


def _xlmr_weights(config: dict) -> dict[str, np.ndarray]:
    """Random weights under XLMRobertaForMaskedLM's names (MLM head included)."""
    rng = np.random.default_rng(5)
    d, f = config["hidden_size"], config["intermediate_size"]

    def w(*shape, scale=0.2):
        return rng.normal(0, scale, size=shape).astype(np.float32)

    e = "roberta.embeddings."
    weights = {e + "word_embeddings.weight": w(config["vocab_size"], d, scale=0.5),
               e + "position_embeddings.weight": w(config["max_position_embeddings"], d),
               e + "token_type_embeddings.weight": w(1, d),
               e + "LayerNorm.weight": 1 + w(d), e + "LayerNorm.bias": w(d)}
    for i in range(config["num_hidden_layers"]):
        p = f"roberta.encoder.layer.{i}."
        for name, (rows, cols) in {"attention.self.query": (d, d), "attention.self.key": (d, d),
                                   "attention.self.value": (d, d),
                                   "attention.output.dense": (d, d),
                                   "intermediate.dense": (f, d), "output.dense": (d, f)}.items():
            weights[f"{p}{name}.weight"], weights[f"{p}{name}.bias"] = w(rows, cols), w(rows)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            weights[f"{p}{norm}.weight"], weights[f"{p}{norm}.bias"] = 1 + w(d), w(d)
    weights["lm_head.dense.weight"], weights["lm_head.bias"] = w(d, d), w(config["vocab_size"])
    weights["roberta.pooler.dense.weight"] = w(d, d)
    return weights


def _roberta_reference(weights: dict, config: dict, ids: list[int]) -> np.ndarray:
    """Hugging Face's RobertaModel on one unpadded text, in numpy: the last
    hidden states [T, D]."""
    eps, heads = config["layer_norm_eps"], config["num_attention_heads"]
    erf = np.vectorize(math.erf)

    def norm(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * weights[name + ".weight"] + weights[name + ".bias"]

    def linear(x, name):
        return x @ weights[name + ".weight"].T + weights[name + ".bias"]

    e = "roberta.embeddings."
    ids = np.asarray(ids)
    # create_position_ids_from_input_ids: padding_idx + 1, + 2, ... for real tokens.
    positions = config["pad_token_id"] + 1 + np.arange(len(ids))
    x = (weights[e + "word_embeddings.weight"][ids]
         + weights[e + "position_embeddings.weight"][positions]
         + weights[e + "token_type_embeddings.weight"][0])
    x = norm(x, e + "LayerNorm")
    for i in range(config["num_hidden_layers"]):
        p = f"roberta.encoder.layer.{i}."
        t, d = x.shape
        q, k, v = (linear(x, p + f"attention.self.{n}").reshape(t, heads, d // heads)
                   for n in ("query", "key", "value"))
        scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d // heads)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = np.einsum("hqk,khd->qhd", probs, v).reshape(t, d)
        x = norm(x + linear(context, p + "attention.output.dense"),
                 p + "attention.output.LayerNorm")
        h = linear(x, p + "intermediate.dense")
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))  # exact (erf) GELU
        x = norm(x + linear(h, p + "output.dense"), p + "output.LayerNorm")
    return x


@pytest.fixture(scope="module")
def tiny_xlmr(tmp_path_factory):
    """A tiny XLM-RoBERTa as sentence-transformers ships bge-m3: CLS pooling,
    normalised, under XLMRobertaForMaskedLM's names."""
    path = tmp_path_factory.mktemp("emb") / "xlmr"
    path.mkdir()
    weights = _xlmr_weights(TINY_XLMR)
    mx.save_safetensors(str(path / "model.safetensors"),
                        {**{k: mx.array(v) for k, v in weights.items()},
                         "roberta.embeddings.position_ids": mx.arange(26)[None]})
    (path / "config.json").write_text(json.dumps(TINY_XLMR))
    _unigram_tokenizer(path, TINY_XLMR["vocab_size"])
    write_sentence_transformers_files(path, "cls_token", TINY_XLMR["hidden_size"])
    return path, weights


def test_xlm_roberta_matches_reference(tiny_xlmr):
    path, weights = tiny_xlmr
    embedders = _three_ways(path)
    fast = embedders["int16"]
    assert fast.pooling == Pooling(("cls",), True)
    # Positions start after the padding index: 26 rows leave 24 tokens.
    assert fast.max_length == 24
    ids, truncated = fast.tokenize(TEXTS)
    assert ids[0][0] == 0 and ids[0][-1] == 2  # <s> ... </s> from tokenizer.json's template
    assert truncated[4] and len(ids[4]) == 24  # the long text fills the position table
    assert ids[5].count(3) == 0  # ï and é are in the vocabulary, not <unk>
    expected = _normalized(np.stack([_roberta_reference(weights, TINY_XLMR, t)[0]
                                     for t in ids]))
    _check_against(embedders, TEXTS, expected)


def test_xlm_roberta_mean_pooling_and_roberta_alias(tiny_xlmr, tmp_path):
    """model_type "roberta" is the same network; mean pooling reads every
    real token's state, so all positions are checked, not only the first."""
    from engine.embedding.embedder import Embedder

    path, weights = tiny_xlmr
    roberta = tmp_path / "roberta"
    roberta.mkdir()
    for f in ("model.safetensors", "tokenizer.json"):
        (roberta / f).write_bytes((path / f).read_bytes())
    (roberta / "config.json").write_text(json.dumps({**TINY_XLMR, "model_type": "roberta"}))
    emb = Embedder.load(roberta, cpu_matmul="float32")
    assert emb.pooling == Pooling(("mean",), False)  # no sentence-transformers files
    ids, _ = emb.tokenize(TEXTS)
    expected = np.stack([_roberta_reference(weights, TINY_XLMR, t).mean(0) for t in ids])
    cos = _cosines(emb.embed(TEXTS).vectors, expected)
    assert cos.min() >= FLOAT32


def test_an_encoder_refuses_to_generate(tiny_xlmr):
    from engine.entrypoints.llm import LLM

    with pytest.raises(ModelLoadError, match=r"\(xlm-roberta\) is an embedding model"):
        LLM(str(tiny_xlmr[0]))
