"""Tool calling (issue 17): each family's call format parsed, streamed calls
assembled, tool_choice "required" and named functions enforced by the grammar
so their arguments always parse, and tool history rendered into prompts."""

from __future__ import annotations

import copy
import json

import jsonschema
import msgspec
import pytest

from engine.entrypoints.serving.generation import PreparedGeneration
from engine.entrypoints.serving.models import GenerationModel, ModelNames
from engine.entrypoints.serving.openai_serving import OpenAIServing
from engine.entrypoints.serving.protocol import ChatCompletionRequest
from engine.entrypoints.serving.runs import GenerationRuns
from engine.entrypoints.serving.tool_parsers import PARSERS, parser_for
from engine.entrypoints.serving.tools import ToolCallStream, ToolPlan
from engine.loading.chat_tools import render_chat

CH = "/v1/chat/completions"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.mark.parametrize("name, text, content, calls", [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
     '\n<tool_call>{"name": "g", "arguments": {}}</tool_call>',
     "Let me check.", [("f", '{"a": 1}'), ("g", "{}")]),
    ("hermes", "no calls here", "no calls here", []),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": ', None, []),   # cut off
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"x": "y"}}', None,
     [("f", '{"x": "y"}')]),
    ("llama3_json", ' {"name": "f", "parameters": {}}; {"name": "g", "parameters": {"k": 2}}',
     None, [("f", "{}"), ("g", '{"k": 2}')]),
    ("llama3_json", 'The answer is {"name": "f"}', 'The answer is {"name": "f"}', []),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": "b"}}]', None,
     [("f", '{"a": "b"}')]),
    ("mistral", 'ok[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g{"b": 2}', "ok",
     [("f", '{"a": 1}'), ("g", '{"b": 2}')]),
])
def test_parsers_read_each_familys_calls(name, text, content, calls):
    got_content, got_calls = PARSERS[name].parse(text)
    assert got_calls == calls
    assert got_content == (text if not calls else content)


def test_the_template_picks_the_parser():
    assert parser_for("{{ '[TOOL_CALLS]' }}").name == "mistral"
    assert parser_for("{{ '<tool_call>' }}").name == "hermes"
    assert parser_for("{{ '<|python_tag|>' }} ipython").name == "llama3_json"
    assert parser_for(None).name == "hermes"


def _plan(mode="auto", parallel=True, template=None) -> ToolPlan:
    body = {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
            "tool_choice": mode, "parallel_tool_calls": parallel}
    return ToolPlan.of(msgspec.convert(body, ChatCompletionRequest), template)


def test_streamed_calls_come_whole_after_the_content():
    text = 'Sure.\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Rome"}}\n</tool_call>'
    stream = ToolCallStream(_plan())
    sent, calls = "", []
    for i, ch in enumerate(text):
        piece, found = stream.feed(ch, finished=i == len(text) - 1)
        sent += piece
        calls += found
    assert sent == "Sure.\n"   # nothing of the call's own text leaks as content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_time", {"city": "Rome"})]
    plain = ToolCallStream(_plan())
    assert plain.feed("a <tool", False) == ("a ", [])      # held: may start a call
    assert plain.feed("bar> b", True) == ("<toolbar> b", [])


def test_forced_choices_are_json_schemas():
    required = _plan("required").constraint().json
    assert required["minItems"] == 1 and "maxItems" not in required
    one = _plan("required", parallel=False).constraint().json
    assert one["maxItems"] == 1
    named = _plan({"type": "function", "function": {"name": "get_time"}}).constraint().json
    assert named["properties"] == SCHEMAS["get_time"]["properties"]
    assert named["additionalProperties"] is False
    assert _plan("auto").constraint() is None
    assert _plan("none") is None


def test_templates_without_tools_get_them_described(smollm):
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "-3 and snow"},
    ]
    text = render_chat(smollm.tokenizer, messages, TOOLS)
    assert '"name": "get_weather"' in text.split("<|im_start|>user")[0]   # the system turn
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"' in text
    assert "<tool_response>\n-3 and snow\n</tool_response>" in text


def test_templates_with_tools_render_them(smollm):
    tok = copy.copy(smollm.tokenizer)
    tok.chat_template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
                         "{% for m in messages %}{{ m.role }}:{{ m.content }}"
                         "{% for c in m.tool_calls or [] %}<{{ c.function.arguments.city }}>"
                         "{% endfor %};{% endfor %}")
    messages = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time",
                                                     "arguments": {"city": "Rome"}}}]}]
    assert render_chat(tok, messages, TOOLS) == "[get_weather][get_time]assistant:<Rome>;"


@pytest.fixture(scope="module")
def serving(smollm):
    return OpenAIServing(GenerationModel(ModelNames(["m"]), smollm.engine))


def _run_all(serving, bodies: list[dict]) -> list[tuple[PreparedGeneration, dict]]:
    """Every body through the serving layer, all in one engine batch."""
    runs = GenerationRuns(serving.generation.engine)
    for key, body in enumerate(bodies):
        runs.submit(key, serving.prepare(CH, json.dumps(body)))
    answers = {}
    while len(answers) < len(bodies):
        for key, prepared, outputs in runs.step():
            answers[key] = prepared, msgspec.to_builtins(serving.respond(prepared, outputs))
    return [answers[k] for k in range(len(bodies))]


def _run(serving, body: dict) -> tuple[PreparedGeneration, dict]:
    return _run_all(serving, [body])[0]


QUESTIONS = ["What's the weather in Paris?", "Is it raining in Tokyo?", "Time in Lima?",
             "Should I take a coat in Oslo today?", "What time is it in Sydney?",
             "How hot is Cairo?"]


def test_required_always_yields_parsable_calls(serving):
    """Sampled at temperature 1, one call or several: every answer is calls
    whose arguments fit their function's schema (a list cut off by max_tokens
    keeps its complete calls)."""
    bodies = [{"messages": [{"role": "user", "content": q}], "tools": TOOLS,
               "tool_choice": "required", "max_tokens": 60, "temperature": 1.0, "seed": i,
               "n": 2, "parallel_tool_calls": i % 2 == 0} for i, q in enumerate(QUESTIONS)]
    for body, (_, response) in zip(bodies, _run_all(serving, bodies)):
        for choice in response["choices"]:
            calls = choice["message"]["tool_calls"]
            assert calls and choice["finish_reason"] in ("tool_calls", "length"), choice
            assert len(calls) == 1 or body["parallel_tool_calls"]
            for call in calls:
                name = call["function"]["name"]
                jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])
                assert call["id"].startswith("call_") and call["type"] == "function"
    assert _plan("required").parse('[{"name": "get_time", "parameters": {"city": "A"}}, '
                                   '{"name": "get_weather", "param')[1][0].function.arguments \
        == '{"city": "A"}'


def test_named_choice_and_tool_history(serving):
    body = {"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather",
                          "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "-3 and snow"},
        {"role": "user", "content": "And the time there?"}],
        "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "max_tokens": 40, "temperature": 0}
    _, response = _run(serving, body)
    message = response["choices"][0]["message"]
    assert message["content"] is None
    [call] = message["tool_calls"]
    assert call["function"]["name"] == "get_time"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS["get_time"])


def test_auto_and_none(serving):
    question = [{"role": "user", "content": "Say hello."}]
    prepared, auto = _run(serving, {"messages": question, "tools": TOOLS, "max_tokens": 12,
                                    "temperature": 0})
    assert prepared.tools.mode == "auto"
    assert auto["choices"][0]["message"]["content"]
    prepared, none = _run(serving, {"messages": question, "tools": TOOLS, "tool_choice": "none",
                                    "max_tokens": 12, "temperature": 0})
    assert prepared.tools is None and none["choices"][0]["message"]["tool_calls"] == []
