"""Constrained decoding (issue 17): JSON schemas, regexes, choices and grammars
always hold, on the default model and on a random-weight one that would
otherwise write noise; greedy constrained answers do not depend on the batch;
preemption and aborts keep every matcher where its tokens put it."""

from __future__ import annotations

import json
import re

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import LLM
from engine.core.sampler import SamplingRow, TokenMask, sample
from engine.core.sampling_params import SamplingParams
from engine.core.sampling_params import StructuredOutputsParams as Constraint
from engine.errors import RequestError

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 16},
                   "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                           "kind": {"enum": ["home", "work"]}},
            "required": ["city", "zip", "kind"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "skills", "address", "active"],
    "additionalProperties": False,
}
SUBJECTS = ["a chef in Lyon", "a retired pilot", "a student of music", "a beekeeper",
            "a software engineer", "a marathon runner", "a librarian in Oslo", "a nurse",
            "a farmer with goats", "a chess champion", "a painter", "a bus driver",
            "a young astronaut", "a baker", "a lighthouse keeper", "a tailor", "a judge",
            "a fisherman in Maine", "a museum guide", "a carpenter"]
PHONE = r"[0-9]{3}-[0-9]{4}"
MOODS = ["happy", "sad", "angry", "calm"]
LARK = 'start: sum\nsum: NUM ("+" NUM)*\nNUM: /[1-9][0-9]?/'
GBNF = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c]'


def _chat(llm: LLM, text: str) -> list[int]:
    tok = llm.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]),
                      add_special_tokens=False)


def test_json_schema_holds_for_20_prompts(smollm):
    prompts = [_chat(smollm, f"Describe {s} as a JSON record.") for s in SUBJECTS]
    params = SamplingParams(temperature=0, max_tokens=120,
                            structured_outputs=Constraint(json=PERSON))
    outs = smollm.generate(prompts, params, use_tqdm=False)
    for out in outs:
        answer = out.outputs[0]
        assert answer.finish_reason == "stop", answer.text
        jsonschema.validate(json.loads(answer.text), PERSON)
    assert len({o.outputs[0].text for o in outs}) > 10  # the prompts do steer the answers


def test_regex_choice_and_json_object_hold_when_sampling(smollm):
    """Sampled (temperature 1) beside unconstrained rows: every constrained
    answer still holds."""
    ask = [_chat(smollm, f"Question {i}: say something.") for i in range(6)]
    prompts, params = [], []
    for i, prompt in enumerate(ask):
        for c in (Constraint(regex=PHONE), Constraint(choice=MOODS),
                  Constraint(json_object=True), None):
            prompts.append(prompt)
            params.append(SamplingParams(temperature=1.0, seed=i, max_tokens=24,
                                         structured_outputs=c))
    outs = smollm.generate(prompts, params, use_tqdm=False)
    for out, p in zip(outs, params):
        text, kind = out.outputs[0].text, p.structured_outputs
        if kind is None:
            continue
        if kind.regex:
            assert re.fullmatch(PHONE, text), text
        elif kind.choice:
            assert text in MOODS
        elif out.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
    assert {o.outputs[0].text for o, p in zip(outs, params)
            if p.structured_outputs and p.structured_outputs.choice} != {MOODS[0]}


def test_greedy_constrained_answers_are_the_same_alone_and_batched(smollm):
    prompts = [_chat(smollm, q) for q in ("Name a color.", "Give a phone number.",
                                          "Add two numbers.", "List letters.",
                                          "Tell me a fact.", "Describe a cat as JSON.")]
    constraints = [Constraint(choice=["red", "green", "blue"]), Constraint(regex=PHONE),
                   Constraint(grammar=LARK), Constraint(grammar=GBNF), None,
                   Constraint(json=PERSON)]
    params = [SamplingParams(temperature=0, max_tokens=40, structured_outputs=c)
              for c in constraints]
    together = smollm.generate(prompts, params, use_tqdm=False)
    alone = [smollm.generate([p], [s], use_tqdm=False)[0] for p, s in zip(prompts, params)]
    for a, b in zip(together, alone):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert re.fullmatch(r"[1-9][0-9]?(\+[1-9][0-9]?)*", together[2].outputs[0].text)
    assert re.fullmatch(r"\([a-c](,[a-c])*\)", together[3].outputs[0].text)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20, max_num_batched_tokens=256)


def test_random_weights_still_write_valid_answers(tiny):
    """A random-weight model left alone writes byte noise: only the mask
    makes these valid (its vocabulary, 320, is wider than its tokenizer's)."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    cases = [Constraint(json=schema), Constraint(regex=PHONE), Constraint(choice=MOODS),
             Constraint(grammar=GBNF)]
    prompts, params = [], []
    for seed in range(5):
        for c in cases:
            prompts.append(f"prompt {seed}")
            params.append(SamplingParams(temperature=1.0, seed=seed, max_tokens=40,
                                         structured_outputs=c))
    for out, p in zip(tiny.generate(prompts, params, use_tqdm=False), params):
        text, c = out.outputs[0].text, p.structured_outputs
        if c.json:
            jsonschema.validate(json.loads(text), schema)
        elif c.regex:
            assert re.fullmatch(PHONE, text)
        elif c.choice:
            assert text in MOODS
        elif out.outputs[0].finish_reason == "stop":
            assert re.fullmatch(r"\([a-c](,[a-c])*\)", text)


def test_preemption_and_abort_keep_matchers_right(tiny_llama_dir):
    """A KV budget too small for the batch preempts and recomputes sequences
    (which replays their tokens without drawing again): the answers are those
    of a roomy run. An aborted constrained request leaves the others alone."""
    # 48 letters each: several 16-token blocks a sequence.
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True,
                            structured_outputs=Constraint(regex="[a-z]{48}"))
    prompts = [f"row {i} " * 6 for i in range(6)]
    roomy = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    tight = LLM(str(tiny_llama_dir), kv_cache_bytes=64 * 1024, block_size=16, max_model_len=128)
    got = tight.generate(prompts, params, use_tqdm=False)
    assert tight.stats().preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == want
    assert all(re.fullmatch("[a-z]{48}", o.outputs[0].text) for o in got)

    engine = roomy.engine
    first = engine.add_request(prompts[0], params)
    second = engine.add_request(prompts[1], params)
    for _ in range(5):
        engine.step()
    engine.abort_request(first.request_id)
    while engine.has_unfinished():
        engine.step()
    assert first.finish_reason == "abort"
    assert second.output(delta=False).outputs[0].token_ids == want[1]


def test_grammars_compile_once_and_bad_ones_are_request_errors(tiny):
    engine = tiny.engine
    before = engine.structured.compiles
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}}
    for _ in range(3):
        engine.compile_grammar(SamplingParams(structured_outputs=Constraint(json=schema)))
    engine.compile_grammar(SamplingParams(structured_outputs=Constraint(json=json.dumps(schema))))
    assert engine.structured.compiles == before + 1
    with pytest.raises(RequestError, match="regex"):
        engine.add_request("x", SamplingParams(structured_outputs=Constraint(regex="(")))
    with pytest.raises(RequestError, match="json"):
        engine.add_request("x", SamplingParams(
            structured_outputs=Constraint(json={"type": "strnig"})))
    with pytest.raises(RequestError, match="exactly one"):
        Constraint(regex="a", choice=["a"])
    with pytest.raises(RequestError, match="exactly one"):
        Constraint()
    assert not engine.has_unfinished()


@pytest.mark.parametrize("kernels", ["portable", "platform"])
def test_the_mask_touches_only_constrained_rows(kernels):
    from engine.platform import current_platform
    from engine.platform.base import PORTABLE_SAMPLING

    kernels = PORTABLE_SAMPLING if kernels == "portable" else current_platform().sampler_kernels()
    logits = mx.array(np.random.default_rng(0).normal(size=(3, 70)).astype(np.float32))
    rows = [SamplingRow(SamplingParams(temperature=0, logprobs=2), 0, [1], []) for _ in range(3)]
    bitmask = np.zeros((1, 3), np.int32)
    bitmask[0, 1] = 1 << 4                          # row 1 may draw token 36 only
    masked = sample(logits, rows, kernels, TokenMask([1], bitmask))
    plain = sample(logits, rows, kernels)
    assert masked.token_ids.tolist()[1] == 36
    for i in (0, 2):
        assert masked.token_ids.tolist()[i] == plain.token_ids.tolist()[i]
        assert masked.logprobs.tolist()[i] == plain.logprobs.tolist()[i]
    assert masked.logprobs.tolist()[1] == pytest.approx(0.0)
    assert masked.top_logprobs.tolist()[1][1] == -9999.0   # not -inf: JSON carries it
    # Sampled rows too: under the mask only allowed tokens are ever drawn.
    hot = [SamplingRow(SamplingParams(temperature=1.5, seed=s), s, [1], []) for s in range(3)]
    bitmask = np.full((2, 3), 0b1010, np.int32)     # tokens 1, 3, 33, 35, 65, 67
    for _ in range(3):
        drawn = sample(logits, hot, kernels, TokenMask([0, 2], bitmask)).token_ids.tolist()
        assert drawn[0] in (1, 3, 33, 35, 65, 67) and drawn[2] in (1, 3, 33, 35, 65, 67)


def test_prompt_dicts_and_chat_with_tools(tiny):
    ids = tiny.tokenizer.encode("abc")
    by_ids = tiny.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0,
                                                                      max_tokens=4),
                           use_tqdm=False)
    by_text = tiny.generate([{"prompt": "abc"}], SamplingParams(temperature=0, max_tokens=4),
                            use_tqdm=False)
    assert by_ids[0].prompt_token_ids == ids
    assert by_ids[0].outputs[0].token_ids == by_text[0].outputs[0].token_ids
    with pytest.raises(Exception, match="prompt_token_ids"):
        tiny.generate({"tokens": [1]}, use_tqdm=False)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}}}}]
    out = tiny.chat([{"role": "user", "content": "find cats"}],
                    SamplingParams(temperature=0, max_tokens=3), use_tqdm=False, tools=tools)
    text = tiny.tokenizer.decode(out[0].prompt_token_ids)
    assert '"name": "lookup"' in text and "<tool_call>" in text and "find cats" in text
    two = tiny.chat([[{"role": "user", "content": "a"}],
                     [{"role": "user", "content": [{"type": "text", "text": "b"}]}]],
                    SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert len(two) == 2
    assert tiny.tokenizer.decode(two[1].prompt_token_ids).endswith("user: b\nassistant:")


_leaf = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=6) | st.sampled_from(
    ["object", "string", "integer", "array", "#/$defs/x", "^a+$"])
_schema = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["type", "properties", "items", "enum", "required", "$ref", "pattern",
                     "anyOf", "minItems", "maxLength", "x"]), inner, max_size=3), max_leaves=10)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["json", "regex", "grammar", "choice"]), value=_schema,
       text=st.text(max_size=16))
def test_any_constraint_compiles_or_is_a_request_error(tiny, kind, value, text):
    """Hostile constraints: compiled, or refused as the user's mistake, never
    another exception (which the server would answer with a 500)."""
    try:
        spec = Constraint(**{kind: value if kind in ("json", "choice") else text})
        tiny.engine.compile_grammar(SamplingParams(structured_outputs=spec))
    except RequestError:
        pass
