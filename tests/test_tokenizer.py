"""engine/tokenizer.py against transformers (what mlx-lm builds from the same
folder) and against what the SmolLM2 tokenizer is known to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import ConveyorError
from engine.loading.gguf import default_llm_dir
from engine.loading.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world",
    "The capital of France is",
    "  leading and trailing spaces  ",
    "many     spaces    between",
    "tabs\tand\t\tmore\ttabs",
    "line one\nline two\n\n\nafter blank lines\r\nwindows",
    "12345678901234567890",
    "pi is 3.14159265358979 and e is 2.71828",
    "phone: +1 (555) 010-9999, year 2024",
    "日本語のテキストです。",
    "中文测试：你好，世界！",
    "한국어 텍스트",
    "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧‍👦",
    "café naïve façade Ångström señor Zürich",
    "Ελληνικά и русский текст",
    "مرحبا بالعالم",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after eos<|endoftext|>",
    "code:\n    def f(x):\n        return x ** 2  # square\n",
    "{\"json\": [1, 2, 3], \"nested\": {\"k\": null}}",
    "MiXeD CaSe and punctuation!!! ??? ... ---",
    "don't won't it's we'll they've I'm",
    "",
    " ",
    "\n",
    "a" * 300,
    "zero-width\u200bjoiner\u200dand\u00a0nbsp",
    "<|im_start|",  # not quite a special token
]


@pytest.fixture(scope="module")
def llm_dir() -> Path:
    return default_llm_dir()


@pytest.fixture(scope="module")
def tok(llm_dir) -> Tokenizer:
    return Tokenizer.from_dir(llm_dir)


@pytest.fixture(scope="module")
def hf(llm_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(llm_dir))


# ---------------------------------------------------------------------------
# Encoding / decoding


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_batch_encode(tok):
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_smollm2_expectations(tok):
    # SmolLM2: no BOS added, digits are split one per token, ids 0..16 are the
    # special tokens, 49152 entries.
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1 and tok.bos_token == "<|im_start|>"
    assert tok.eos_token_ids == {2} and tok.eos_token == "<|im_end|>"
    assert tok.add_bos_token is False
    assert tok.special_token_ids == set(range(17))
    digits = tok.encode("9876543210")
    assert len(digits) == 10
    assert [tok.decode([i]) for i in digits] == list("9876543210")
    assert tok.encode("0123456789") == list(range(32, 42))
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert tok.encode("Hello world") == [19556, 905]
    # byte-level BPE: a space is part of the next word's token
    world = tok.encode(" world")
    assert len(world) == 1 and tok.id_to_token(world[0]) == "Ġworld"
    # special tokens are not split, and are left out on request
    ids = tok.encode("a<|im_end|>b")
    assert 2 in ids
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_add_bos_token_from_config(llm_dir, tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(llm_dir / name, d / name)
    cfg = json.loads((llm_dir / "tokenizer_config.json").read_text())
    cfg.update(add_bos_token=True, bos_token="<|endoftext|>")
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer.from_dir(d)
    assert t.bos_token_id == 0
    assert t.encode("hi") == [0, *t.encode("hi", add_special_tokens=False)]
    assert t.encode("<|endoftext|>hi")[:2] == [0, t.encode("hi", add_special_tokens=False)[0]]
    with pytest.raises(ConveyorError, match="chat template"):
        t.apply_chat_template([{"role": "user", "content": "x"}])


# ---------------------------------------------------------------------------
# Chat template

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "hi 👋"},
     {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Count: 1 2 3\n\tdone"}],
]


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf, messages, gen_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen_prompt)
    theirs = hf.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False)
    assert ours == theirs
    ids = tok.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=True)
    assert ids == tok.encode(ours, add_special_tokens=False)
    their_ids = hf.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=True)
    if not isinstance(their_ids, list):  # transformers 5 returns a BatchEncoding
        their_ids = their_ids["input_ids"]
    assert ids == their_ids


def test_chat_template_features(tok):
    t = Tokenizer(tok.backend, {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "chat_template": (
            "{{ bos_token }}{% for m in messages %}\n"
            "  {% if m['role'] not in ['user', 'assistant'] %}"
            "{{ raise_exception('bad role ' + m['role']) }}{% endif %}\n"
            "  {% generation %}{{ m['content'] | tojson }}{% endgeneration %}\n"
            "{% endfor %}{{ eos_token }}"),
    })
    out = t.apply_chat_template([{"role": "user", "content": "é<b>"}])
    # trim_blocks/lstrip_blocks drop the newlines and indents around block tags
    assert out == '<|im_start|>"é<b>"<|im_end|>'
    with pytest.raises(ConveyorError, match="bad role system"):
        t.apply_chat_template([{"role": "system", "content": "x"}])
    with pytest.raises(ConveyorError, match="chat template"):
        Tokenizer(tok.backend, {}).apply_chat_template([{"role": "user", "content": "x"}])
    sandboxed = Tokenizer(tok.backend, {"chat_template": "{{ ''.__class__.__mro__ }}"})
    with pytest.raises(ConveyorError):
        sandboxed.apply_chat_template([])


# ---------------------------------------------------------------------------
# Incremental detokenization


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.fixture(scope="module")
def id_pools(tok):
    """Ids that make broken UTF-8 likely: single-byte tokens (emoji/CJK
    fragments), pieces of multi-byte text, special tokens, and anything."""
    single_bytes = [i for i in range(tok.vocab_size)
                    if len(tok.backend.id_to_token(i)) == 1]
    fragments = sorted({i for t in TEXTS for i in tok.encode(t) if "\ufffd" in tok.decode([i])})
    return single_bytes, fragments


def _ids_strategy(tok, id_pools):
    single_bytes, fragments = id_pools
    one_id = st.one_of(
        st.integers(0, tok.vocab_size - 1),
        st.sampled_from(single_bytes),
        st.sampled_from(fragments),
        st.integers(0, 16),  # special tokens
    )
    return st.lists(one_id, max_size=40)


_SETTINGS = settings(max_examples=150, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_incremental_matches_full_decode_random_ids(tok, id_pools):
    @_SETTINGS
    @given(ids=_ids_strategy(tok, id_pools), skip=st.booleans())
    def check(ids, skip):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        deltas = _stream(detok, ids)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        assert detok.text == "".join(deltas)
        assert detok.num_tokens == len(ids)

    check()


def _valid_ids_strategy(tok):
    texts = st.lists(st.one_of(st.sampled_from(TEXTS), st.text(max_size=20)), max_size=6)
    return texts.map(lambda ts: [i for t in ts for i in tok.encode(t)])


@pytest.mark.parametrize("byte_path", [True, False])
def test_incremental_valid_text_never_emits_replacement(tok, byte_path):
    @_SETTINGS
    @given(ids=_valid_ids_strategy(tok), skip=st.booleans())
    def check(ids, skip):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip, byte_path=byte_path)
        deltas = _stream(detok, ids)
        full = tok.decode(ids, skip_special_tokens=skip)
        if "\ufffd" not in full:
            assert "".join(deltas) == full
            assert not any("\ufffd" in d for d in deltas)
        elif byte_path:
            # Not every text encodes to valid UTF-8 here: SmolLM2's vocab has no
            # token for some bytes (0xF1, 0xF2, ...), which BPE drops. The byte
            # path stays exact even then; the window path is exact on valid text.
            assert "".join(deltas) == full

    check()


def test_emoji_is_held_back_until_complete(tok):
    ids = tok.encode("a👍🏽b")
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert deltas[0] == "a" and deltas[-1].endswith("b")
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == "a👍🏽b"
    # an unfinished character at the end comes out (as U+FFFD) only on flush
    detok = IncrementalDetokenizer(tok)
    assert detok.add_many(tok.encode("x😀")[:-1]) == "x"
    assert detok.flush() == tok.decode(tok.encode("x😀")[:-1])[1:]


def test_window_path_decodes_only_a_small_window(tok):
    calls = []
    real_decode = tok.decode

    class Spy:
        special_token_ids = tok.special_token_ids

        def decode(self, ids, skip_special_tokens=False):
            calls.append(len(ids))
            return real_decode(ids, skip_special_tokens=skip_special_tokens)

        def byte_table(self):
            return None

    ids = tok.encode(" ".join(TEXTS) * 4)
    detok = IncrementalDetokenizer(Spy(), prompt_ids=[1, 4093, 198])
    text = detok.add_many(ids) + detok.flush()
    assert text == real_decode(ids)
    assert len(ids) > 500 and max(calls) <= 16


def test_window_path_prompt_context(tok):
    prompt = tok.encode("The capital of France is")
    gen = tok.encode(" Paris. 😀 Done")
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt, byte_path=False)
    assert detok.add_many(gen) + detok.flush() == " Paris. 😀 Done"


def test_tokenizer_json_padding_is_ignored(llm_dir, tmp_path):
    """A tokenizer.json saved with fixed padding/truncation (as some
    sentence-transformers checkpoints are) must not pad or cut our encodings."""
    d = tmp_path / "padded"
    d.mkdir()
    data = json.loads((llm_dir / "tokenizer.json").read_text())
    data["padding"] = {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": 2, "pad_type_id": 0, "pad_token": "<|im_end|>"}
    data["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst",
                          "stride": 0}
    (d / "tokenizer.json").write_text(json.dumps(data))
    t = Tokenizer.from_dir(d)
    assert t.encode("Hello world") == [19556, 905]
    assert len(t.encode("one two three four five six seven")) == 7
