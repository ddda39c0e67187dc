"""`conveyor batch`: the OpenAI Batch format, resuming after kill -9, bad
lines, lazy reading with a bounded queue, and the CLI's exit codes."""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import msgspec
import numpy as np
import pytest

from engine.entrypoints.batch import batch_job
from engine.entrypoints.batch.batch_file import (
    BatchOutputLine,
    OutputFile,
    parse_input_line,
    read_input,
)
from engine.entrypoints.batch.batch_job import BatchJob
from engine.entrypoints.cli.batch import add_batch_parser, run_batch
from engine.entrypoints.serving.models import GenerationModel, ModelNames
from engine.entrypoints.serving.openai_serving import OpenAIServing
from engine.entrypoints.serving.protocol import decode_request
from engine.entrypoints.serving.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    EmbeddingResponse,
)
from engine.errors import ConveyorError

EXAMPLES = Path(__file__).parent / "data" / "batch_examples"
ROOT = Path(__file__).resolve().parent.parent
KV_BYTES = 16 << 20


# -- helpers -----------------------------------------------------------------------

class FakeEmbedder:
    """Deterministic vectors from the text, one token per word; texts longer
    than `max_length` words are flagged truncated, like the real Embedder."""

    max_length = 12
    dim = 4

    def __init__(self):
        self.calls = 0

    def embed(self, texts, truncate=True):
        self.calls += 1
        vectors = np.array([[len(t), t.count(" "), sum(map(ord, t)) % 97, 1.0] for t in texts],
                           dtype=np.float32)
        num_tokens = [len(t.split()) for t in texts]
        return batch_job_result(vectors, [n > self.max_length for n in num_tokens],
                                [min(n, self.max_length) for n in num_tokens])


def batch_job_result(vectors, truncated, num_tokens):
    from engine.embedding.embedder import EmbeddingResult

    return EmbeddingResult(vectors=vectors, truncated=truncated, num_tokens=num_tokens)


def line(custom_id, url, body, method="POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def by_id(path: Path) -> dict[str, dict]:
    out = {}
    for r in records(path):
        assert r["custom_id"] not in out, f"{r['custom_id']} answered twice"
        out[r["custom_id"]] = r
    return out


def answer(record: dict) -> tuple:
    """What must not change between runs: the generated text and token counts."""
    body = record["response"]["body"]
    choices = body["choices"]
    texts = tuple(c.get("text", c.get("message", {}).get("content")) for c in choices)
    return texts, tuple(c["finish_reason"] for c in choices), body["usage"]["completion_tokens"]


def make_job(tmp_path, tiny_llama_dir, input_path, *, max_num_seqs=8, embedder=None,
             output=None, **kw) -> BatchJob:
    from engine import LLM

    embedder = embedder or FakeEmbedder()
    return BatchJob(Path(input_path), Path(output or tmp_path / "out.jsonl"),
                    lambda: LLM(str(tiny_llama_dir), kv_cache_bytes=KV_BYTES,
                                max_num_seqs=max_num_seqs),
                    lambda: embedder, model_name="tiny", max_in_flight=2 * max_num_seqs,
                    embed_batch_texts=4, progress=False, **kw)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(x + "\n" for x in lines))
    return path


# -- format --------------------------------------------------------------------------

def _example_requests(name: str):
    """(url, body bytes without "model") of each line of an example input."""
    out = []
    for n, raw in enumerate((EXAMPLES / name).read_bytes().splitlines(), start=1):
        parsed = parse_input_line(n, raw)
        assert parsed.error is None, parsed.error
        body = json.loads(bytes(parsed.request.body))
        body.pop("model", None)  # examples name OpenAI's models; a 404 here
        out.append((parsed.request.url, json.dumps(body).encode()))
    return out


@pytest.fixture(scope="module")
def tiny_serving(tiny_llama_dir):
    from engine.core.llm_engine import EngineArgs, LLMEngine

    engine = LLMEngine.from_args(EngineArgs(model=str(tiny_llama_dir), kv_cache_bytes=KV_BYTES))
    return OpenAIServing(GenerationModel(ModelNames(["tiny"]), engine))


@pytest.mark.parametrize("name", ["openai_chat_input.jsonl", "openai_completions_input.jsonl",
                                  "vllm_embeddings_input.jsonl"])
def test_example_inputs_parse_and_round_trip(name, tiny_serving):
    for n, raw in enumerate((EXAMPLES / name).read_bytes().splitlines(), start=1):
        parsed = parse_input_line(n, raw)
        assert parsed.error is None, parsed.error
        # The body stays the bytes it was (so files pass through as they are).
        line = json.loads(raw)
        assert (parsed.request.custom_id, parsed.request.url) == (line["custom_id"], line["url"])
        assert json.loads(bytes(parsed.request.body)) == line["body"]
        assert decode_request(parsed.request.url, bytes(parsed.request.body))
    tok = tiny_serving.generation.tokenizer
    for url, body in _example_requests(name):
        if url == "/v1/chat/completions":
            prepared = tiny_serving.prepare(url, body)
            request = prepared.request
            assert prepared.inputs[0].prompt == tok.encode(tok.apply_chat_template(
                [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                  "".join(p.text for p in m.content)} for m in request.messages]),
                add_special_tokens=False)
        elif url == "/v1/completions":
            assert tiny_serving.prepare(url, body.replace(b"450, 7483, 310", b"45, 73, 31"))


def test_example_inputs_map_to_the_right_sampling_params(tiny_serving):
    tok = tiny_serving.generation.tokenizer
    chat = _example_requests("openai_chat_input.jsonl")
    r1 = tiny_serving.prepare(*chat[0]).inputs
    assert len(r1) == 1 and r1[0].params.max_tokens == 1000
    r3 = tiny_serving.prepare(*chat[2]).inputs
    p = r3[0].params
    assert (p.max_tokens, p.temperature, p.stop, p.seed, p.logprobs) == (20, 0, ["\n\n"], 7, 2)
    assert tok.decode(r3[0].prompt).endswith("user: Name three colours.\nassistant:")

    comp = _example_requests("openai_completions_input.jsonl")
    c2 = tiny_serving.prepare(*comp[1]).inputs
    # prompts × n, vLLM's order: both choices of prompt 0, then of prompt 1
    assert [tok.decode(x.prompt) for x in c2] == (["Once upon a time"] * 2
                                                  + ["The capital of France is"] * 2)
    assert all(x.params.logprobs == 1 and x.params.max_tokens == 5 for x in c2)
    url, body = comp[2]
    c3 = tiny_serving.prepare(url, body.replace(b"450, 7483, 310", b"45, 73, 31")).inputs[0]
    assert c3.prompt == [1, 45, 73, 31]
    q = c3.params
    assert (q.top_k, q.min_p, q.repetition_penalty, q.ignore_eos, q.stop_token_ids, q.seed) == (
        40, 0.05, 1.1, True, [2], 3)


@pytest.mark.parametrize("name", ["openai_chat_output.jsonl", "openai_completions_output.jsonl",
                                  "vllm_chat_output.jsonl", "vllm_embeddings_output.jsonl"])
def test_example_outputs_round_trip(name):
    kinds = {"chat.completion": ChatCompletionResponse, "text_completion": CompletionResponse,
             "list": EmbeddingResponse}
    for raw in (EXAMPLES / name).read_bytes().splitlines():
        record = msgspec.json.decode(raw, type=BatchOutputLine)
        assert msgspec.to_builtins(record) == json.loads(raw)  # unchanged, extras included
        body = record.response.body
        if record.response.status_code == 200:
            typed = msgspec.convert(body, kinds[body["object"]])
            assert typed.usage.prompt_tokens == body["usage"]["prompt_tokens"]
            if isinstance(typed, ChatCompletionResponse):
                assert typed.choices[0].message.content == body["choices"][0]["message"]["content"]
            elif isinstance(typed, CompletionResponse):
                assert typed.choices[0].text == body["choices"][0]["text"]
            else:
                assert typed.data[0].embedding == body["data"][0]["embedding"]
        else:
            assert record.error is not None or "error" in (body or {})


def _keys(value) -> dict:
    """The key tree of a JSON value (lists: their first element; a dict of
    floats is data, token -> logprob, not structure)."""
    if isinstance(value, dict) and value and all(isinstance(v, float) for v in value.values()):
        return {}
    if isinstance(value, dict):
        return {k: _keys(v) for k, v in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return {"[0]": _keys(value[0])}
    return {}


def _missing(ours: dict, theirs: dict, path="") -> list[str]:
    out = []
    for k, sub in theirs.items():
        if k not in ours:
            out.append(path + k)
        else:
            out += _missing(ours[k], sub, path + k + ".")
    return out


def test_our_records_have_every_field_of_openai_and_vllm_records(tmp_path, tiny_llama_dir):
    inputs = [x for name in ("openai_chat_input.jsonl", "openai_completions_input.jsonl",
                             "vllm_embeddings_input.jsonl")
              for x in (EXAMPLES / name).read_text().splitlines()]
    inputs = [x.replace("request-", "e-") if "/v1/embeddings" in x else x for x in inputs]
    inputs = [x.replace('"max_tokens": 1000', '"max_tokens": 12')
              .replace("[1, 450, 7483, 310]", "[1, 45, 73, 31]") for x in inputs]  # tiny vocab
    # The examples name OpenAI's models: here they name the served ones.
    served = {"gpt-3.5-turbo-0125": "tiny", "gpt-4o-mini": "tiny",
              "gpt-3.5-turbo-instruct": "tiny", "meta-llama/Meta-Llama-3-8B": "tiny",
              "intfloat/e5-mistral-7b-instruct": "conveyor-embedding"}
    for theirs, ours in served.items():
        inputs = [x.replace(f'"model": "{theirs}"', f'"model": "{ours}"') for x in inputs]
    summary = make_job(tmp_path, tiny_llama_dir,
                       write_lines(tmp_path / "in.jsonl", inputs)).run()
    assert (summary.done, summary.failed) == (9, 0)
    ours = by_id(tmp_path / "out.jsonl")
    # Fields OpenAI has that Conveyor leaves out on purpose (no such feature).
    extras = {"system_fingerprint", "id", "created", "tool_calls"}

    def strip(tree):
        return {k: strip(v) for k, v in tree.items() if k not in extras}

    chat = json.loads((EXAMPLES / "openai_chat_output.jsonl").read_text().splitlines()[0])
    vchat = json.loads((EXAMPLES / "vllm_chat_output.jsonl").read_text().splitlines()[0])
    comp1, comp = map(json.loads,
                      (EXAMPLES / "openai_completions_output.jsonl").read_text().splitlines())
    emb = json.loads((EXAMPLES / "vllm_embeddings_output.jsonl").read_text().splitlines()[0])
    for ours_id, example in [("request-1", chat), ("request-2", vchat), ("c-1", comp1),
                             ("c-2", comp), ("e-1", emb)]:
        mine = ours[ours_id]
        assert mine["response"]["status_code"] == 200 and mine["error"] is None
        tree = strip(_keys(example))
        if ours_id == "e-1":  # vLLM adds completion_tokens: 0 to embedding usage
            del tree["response"]["body"]["usage"]["completion_tokens"]
        assert _missing(_keys(mine), tree) == [], ours_id
        assert mine["id"].startswith("batch_req_")
    # the body's "model" is the served model's name, named by the line or not
    models = {"request-1": "tiny", "c-3": "tiny", "e-1": "conveyor-embedding",
              "e-3": "conveyor-embedding"}
    for cid, model in models.items():
        assert ours[cid]["response"]["body"]["model"] == model
    # usage adds up and n × prompts choices come back in order
    c2 = ours["c-2"]["response"]["body"]
    assert [c["index"] for c in c2["choices"]] == [0, 1, 2, 3]
    assert c2["choices"][0]["text"] == c2["choices"][1]["text"]  # greedy
    usage = c2["usage"]
    assert usage["completion_tokens"] == 20
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] == len(b"Once upon a time") + len(b"The capital of France is")
    lp = c2["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    r3 = ours["request-3"]["response"]["body"]["choices"][0]
    assert len(r3["logprobs"]["content"][0]["top_logprobs"]) == 2
    b64 = ours["e-3"]["response"]["body"]["data"][0]["embedding"]
    assert isinstance(b64, str) and len(base64.b64decode(b64)) == 4 * FakeEmbedder.dim
    assert len(ours["e-2"]["response"]["body"]["data"]) == 2


# -- bad lines -----------------------------------------------------------------------

def test_bad_lines_get_error_records_and_the_job_goes_on(tmp_path, tiny_llama_dir):
    C, CH, E = "/v1/completions", "/v1/chat/completions", "/v1/embeddings"
    ok_c = {"prompt": "hello", "max_tokens": 3, "temperature": 0}
    lines = [
        line("ok-c", C, ok_c),
        '{"custom_id": "broken", "method": ',                              # invalid JSON
        '["a", "list"]',                                                   # not an object
        json.dumps({"method": "POST", "url": C, "body": ok_c}),            # no custom_id
        json.dumps({"custom_id": "no-url", "method": "POST", "body": ok_c}),
        line("get", C, ok_c, method="GET"),
        line("ok-chat", CH, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        "",                                                                # blank: skipped
        line("bad-url", "/v1/images/generations", {"prompt": "a cat"}),
        line("no-prompt", C, {"max_tokens": 3}),
        line("bad-temp", C, {"prompt": "x", "temperature": -1}),
        line("bad-type", C, {"prompt": "x", "max_tokens": "many"}),
        line("too-long", C, {"prompt": "x" * 2100, "max_tokens": 4}),
        line("ok-e", E, {"input": ["a b", "c"]}),
        line("too-long-e", E, {"input": "w " * 20}),
        line("tools", CH, {"messages": [{"role": "user", "content": "hi"}],
                           "tools": [{"type": "function"}]}),
        line("no-messages", CH, {"messages": []}),
        line("ok-c", C, ok_c),                                             # duplicate
    ]
    path = write_lines(tmp_path / "in.jsonl", lines)
    summary = make_job(tmp_path, tiny_llama_dir, path).run()
    out = records(tmp_path / "out.jsonl")
    assert len(out) == len(lines) - 1
    assert (summary.done, summary.failed, summary.skipped) == (3, 14, 0)
    named = {}
    for r in sorted(out, key=lambda r: int(r["id"].removeprefix("batch_req_"))):  # input order
        named.setdefault(r["custom_id"], []).append(r)
    for ok in ("ok-c", "ok-chat", "ok-e"):
        assert named[ok][0]["response"]["status_code"] == 200 and named[ok][0]["error"] is None
    assert named["ok-c"][0]["response"]["body"]["usage"]["completion_tokens"] == 3

    def err(cid, k=0):
        r = named[cid][k]
        return r["error"]["code"], r["error"]["message"], (r["response"] or {}).get(
            "status_code")

    nameless = sorted(r["id"] for r in named[None])   # lines with no usable custom_id
    assert nameless == ["batch_req_2", "batch_req_3", "batch_req_4"]
    assert {err(None, k)[0] for k in range(3)} == {"invalid_json", "invalid_batch_line"}
    assert err("no-url")[0] == "invalid_batch_line" and "url" in err("no-url")[1]
    assert err("get")[0] == "invalid_batch_line" and "POST" in err("get")[1]
    for cid, words in [("bad-url", "unsupported url"), ("no-prompt", "prompt"),
                       ("bad-temp", "temperature"), ("bad-type", "max_tokens"),
                       ("too-long", "exceeds the model's context"),
                       ("too-long-e", "longer than the model's maximum"),
                       ("tools", "tools"), ("no-messages", "messages")]:
        code, message, status = err(cid)
        want = ("unknown_url", 404) if cid == "bad-url" else ("invalid_request", 400)
        assert (code, status) == want, cid
        assert words in message, (cid, message)
        body = named[cid][0]["response"]["body"]
        assert body["error"]["message"] == message  # OpenAI's error body too
    dup = named["ok-c"][1]
    assert dup["error"]["code"] == "duplicate_custom_id" and dup["id"] == "batch_req_18"

    # Re-running answers nothing twice: the nameless and duplicate lines are
    # recognised by their record ids, the rest by custom_id.
    before = (tmp_path / "out.jsonl").read_bytes()
    again = make_job(tmp_path, tiny_llama_dir, path).run()
    assert (again.done, again.failed, again.skipped) == (0, 0, 17)
    assert (tmp_path / "out.jsonl").read_bytes() == before


def test_missing_model_or_input_is_a_job_error(tmp_path, tiny_llama_dir):
    with pytest.raises(ConveyorError, match="input file not found"):
        make_job(tmp_path, tiny_llama_dir, tmp_path / "nope.jsonl").run()
    path = write_lines(tmp_path / "in.jsonl", [line("a", "/v1/completions", {"prompt": "x"})])
    job = make_job(tmp_path, tiny_llama_dir, path)
    job.load_llm = lambda: (_ for _ in ()).throw(ConveyorError("model not found: m"))
    with pytest.raises(ConveyorError, match="model not found"):
        job.run()


# -- crash safety ----------------------------------------------------------------------

def test_torn_last_line_is_dropped_and_the_rest_indexed(tmp_path):
    good = [json.dumps({"id": f"batch_req_{i}", "custom_id": f"r{i}", "response": None,
                        "error": None}) for i in range(3)]
    out = tmp_path / "out.jsonl"
    out.write_text("\n".join(good) + "\n" + good[0][:17])
    with OutputFile.open(out) as f:
        assert f.repaired_bytes == 17
        assert f.index.custom_ids == {"r0", "r1", "r2"}
    assert out.read_text() == "\n".join(good) + "\n"
    out.write_text(good[0])  # a whole record, but its newline never made it
    with OutputFile.open(out) as f:
        assert f.repaired_bytes == len(good[0]) and f.index.records == 0
    assert out.read_bytes() == b""
    out.write_text(good[0] + "\nnot json\n" + good[1] + "\n")
    with pytest.raises(ConveyorError, match="out.jsonl:2 is not a batch result"):
        OutputFile.open(out)


def _resume_input(path: Path, n: int) -> Path:
    lines = []
    for i in range(n):
        if i % 2:
            body = {"messages": [{"role": "user", "content": f"question {i} " * (1 + i % 4)}],
                    "max_tokens": 6, "temperature": 0}
            lines.append(line(f"req-{i}", "/v1/chat/completions", body))
        else:
            body = {"prompt": f"prompt {i} " * (1 + i % 6), "max_tokens": 6, "temperature": 0}
            lines.append(line(f"req-{i}", "/v1/completions", body))
    return write_lines(path, lines)


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_kill_9_at_random_points_then_resume_answers_every_id_once(tmp_path, tiny_llama_dir):
    n = 240
    inp = _resume_input(tmp_path / "in.jsonl", n)
    # The reference: one uninterrupted run (greedy, so the same answers).
    make_job(tmp_path, tiny_llama_dir, inp, output=tmp_path / "ref.jsonl").run()
    reference = {k: answer(v) for k, v in by_id(tmp_path / "ref.jsonl").items()}
    assert len(reference) == n

    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "engine.entrypoints.cli.batch", "batch", "-i", str(inp),
            "-o", str(out),
           "--model", str(tiny_llama_dir), "--kv-cache-bytes", str(KV_BYTES),
           "--max-num-seqs", "8", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(1234)
    kills, torn, at_kill = 0, False, []
    for attempt in range(40):
        if kills >= 6:
            break
        done_before = _count_lines(out)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        # Kill at a random moment: sometimes during start-up, mostly once a
        # random number of new results has been written (mid-write included).
        target = done_before + rng.randint(1, 40)
        deadline = time.monotonic() + (rng.uniform(0.05, 0.6) if attempt % 3 == 0 else 20)
        while proc.poll() is None and time.monotonic() < deadline:
            if _count_lines(out) >= target:
                time.sleep(rng.uniform(0, 0.03))
                break
            time.sleep(0.005)
        if proc.poll() is not None:
            break  # finished before we could kill it
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        at_kill.append(_count_lines(out))
        if not torn and _count_lines(out) > 0:
            # A kill in the middle of a write: half a record, no newline.
            with out.open("ab") as f:
                f.write(b'{"id": "batch_req_99999", "custom_id": "req-')
            torn = True
    assert kills >= 5
    print("records at each kill:", at_kill)
    assert sum(0 < k < n for k in at_kill) >= 4  # most kills land mid-job
    final = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=60)
    assert final.returncode == 0, final.stderr
    results = by_id(out)  # asserts no custom_id twice
    assert sorted(results) == sorted(reference)
    assert all(r["response"]["status_code"] == 200 for r in results.values())
    assert {k: answer(v) for k, v in results.items()} == reference


# -- lazy reading and backpressure ---------------------------------------------------

def test_reader_is_lazy_and_its_memory_does_not_grow_with_the_file(tmp_path):
    path = tmp_path / "big.jsonl"
    row = line("id-{}", "/v1/completions", {"prompt": "p " * 40, "max_tokens": 8})
    with path.open("w") as f:
        for i in range(100_000):
            f.write(row.replace("id-{}", f"id-{i}") + "\n")
    it = read_input(path)
    assert next(it).custom_id == "id-0"  # a generator: nothing read ahead
    tracemalloc.start()
    count = 1
    for parsed in it:
        count += 1
        assert parsed.request is not None
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 100_000
    assert path.stat().st_size > 15e6 and peak < 1e6  # ~18 MB of input, < 1 MB held


def test_engine_queue_stays_full_but_bounded(tmp_path, tiny_llama_dir, monkeypatch):
    n, max_num_seqs = 300, 4
    path = write_lines(tmp_path / "in.jsonl", [
        line(f"r{i}", "/v1/completions",
             {"prompt": f"p{i}", "max_tokens": 1 + i % 3, "temperature": 0})
        for i in range(n)])
    job = make_job(tmp_path, tiny_llama_dir, path, max_num_seqs=max_num_seqs)
    bound = job.max_in_flight
    seen = {"pulled": 0, "queued": []}

    def watched(p, *limits):
        for item in read_input(p, *limits):
            answered = job.summary.done + job.summary.failed
            # Lines read but not yet answered never exceed the bound.
            assert seen["pulled"] - answered <= bound
            if job._runs is not None:
                stats = job._runs.engine.stats()
                seen["queued"].append(stats.running + stats.waiting)
            seen["pulled"] += 1
            yield item

    monkeypatch.setattr(batch_job, "read_input", watched)
    summary = job.run()
    assert (summary.done, summary.failed) == (n, 0)
    assert summary.peak_in_flight == bound
    queued = seen["queued"]
    assert max(queued) <= bound
    # Kept full: once running, a new line is read as soon as the queue drops
    # below the bound (one step finishes at most max_num_seqs), not when it ran dry.
    assert min(queued[bound:]) >= bound - max_num_seqs


# -- CLI -----------------------------------------------------------------------------

def _parse(argv):
    parser = argparse.ArgumentParser(prog="conveyor")
    add_batch_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["batch", *argv])


def test_cli_exit_codes_and_summary(tmp_path, tiny_llama_dir, capsys):
    args = _parse(["-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl")])
    assert run_batch(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"conveyor: error: input file not found: {tmp_path / 'missing.jsonl'}"]

    inp = write_lines(tmp_path / "in.jsonl", [
        line("a", "/v1/completions", {"prompt": "hi", "max_tokens": 2}), "not json"])
    args = _parse(["-i", str(inp), "-o", str(tmp_path / "nodir" / "o.jsonl")])
    assert run_batch(args) == 2
    assert "output directory does not exist" in capsys.readouterr().err

    args = _parse(["-i", str(inp), "-o", str(tmp_path / "o.jsonl"), "--model",
                   str(tiny_llama_dir), "--kv-cache-bytes", str(KV_BYTES), "--max-num-seqs", "2"])
    assert run_batch(args) == 0
    err = capsys.readouterr().err
    assert "1 done, 1 failed, 0 skipped" in err and "output tok/s" in err
    assert run_batch(args) == 0
    assert "0 done, 0 failed, 2 skipped" in capsys.readouterr().err
    args = _parse(["-i", str(inp), "-o", str(tmp_path / "o.jsonl"), "-q"])
    assert run_batch(args) == 0  # all answered: no model is even loaded
    assert capsys.readouterr().err == ""
    args = _parse(["-i", str(inp), "-o", str(tmp_path / "o2.jsonl"), "--model",
                   str(tmp_path / "no-model")])
    assert run_batch(args) == 2  # the model is found missing once a line needs it
    assert capsys.readouterr().err.splitlines()[-1].startswith("conveyor: error: ")


# -- the real models, end to end ---------------------------------------------------------

def test_real_models_chat_and_embeddings(tmp_path, smollm_dir):
    from engine.entrypoints.batch.batch_job import run_batch_file
    from engine.loading.tokenizer import Tokenizer

    question = [{"role": "user", "content": "What is the capital of France?"}]
    inp = write_lines(tmp_path / "in.jsonl", [
        line("chat", "/v1/chat/completions",
             {"model": "SmolLM2", "messages": question, "max_tokens": 8, "temperature": 0}),
        line("emb", "/v1/embeddings", {"input": ["Paris is in France.", "A cat."]}),
    ])
    summary = run_batch_file(inp, tmp_path / "out.jsonl", model=str(smollm_dir),
                             served_model_name="SmolLM2", max_num_seqs=4, progress=False,
                             engine_args={"kv_cache_bytes": 64 << 20, "max_model_len": 1024})
    assert (summary.done, summary.failed) == (2, 0)
    out = by_id(tmp_path / "out.jsonl")
    chat = out["chat"]["response"]["body"]
    tok = Tokenizer.from_dir(smollm_dir)
    assert chat["model"] == "SmolLM2"
    assert "Paris" in chat["choices"][0]["message"]["content"]
    assert chat["usage"]["prompt_tokens"] == len(tok.apply_chat_template(question, tokenize=True))
    emb = out["emb"]["response"]["body"]
    assert emb["model"] == "all-MiniLM-L6-v2"
    vectors = np.array([d["embedding"] for d in emb["data"]])
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert emb["usage"]["prompt_tokens"] > 4


# -- the holes a hostile user found (issue 16) -----------------------------------------

def test_second_run_on_the_same_output_refuses_then_resumes(tmp_path, tiny_llama_dir):
    inp = _resume_input(tmp_path / "in.jsonl", 12)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "engine.entrypoints.cli.batch", "batch", "-i", str(inp),
           "-o", str(out), "--model", str(tiny_llama_dir), "--kv-cache-bytes", str(KV_BYTES),
           "--max-num-seqs", "4", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with OutputFile.open(out):  # a first runner, mid-job
        second = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=60)
        with pytest.raises(ConveyorError, match="another `conveyor batch` is writing"):
            make_job(tmp_path, tiny_llama_dir, inp, output=out).run()
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"conveyor: error: another `conveyor batch` is writing {out}; let it finish (or stop "
        "it), then run again to resume"]
    assert out.read_bytes() == b""  # the refused runs wrote nothing
    # Once the first is gone (kill -9 included: the lock goes with the process),
    # a run answers every id, and only once.
    assert subprocess.run(cmd, check=False, cwd=ROOT, env=env, timeout=60).returncode == 0
    assert sorted(by_id(out)) == sorted(f"req-{i}" for i in range(12))


def test_huge_n_or_another_model_is_answered_at_once(tmp_path, tiny_llama_dir):
    C = "/v1/completions"
    path = write_lines(tmp_path / "in.jsonl", [
        line("huge-n", C, {"prompt": "a", "n": 1_000_000_000, "max_tokens": 4}),
        line("huge-n-chat", "/v1/chat/completions",
             {"messages": [{"role": "user", "content": "hi"}], "n": 10**9}),
        line("other-model", C, {"model": "gpt-4", "prompt": "a", "max_tokens": 2}),
        line("other-embedder", "/v1/embeddings", {"model": "tiny", "input": "a"}),
        line("ok", C, {"model": "tiny", "prompt": "a", "max_tokens": 2, "temperature": 0}),
    ])
    summary = make_job(tmp_path, tiny_llama_dir, path).run()
    assert (summary.done, summary.failed) == (1, 4)
    got = by_id(tmp_path / "out.jsonl")
    for cid in ("huge-n", "huge-n-chat"):
        response = got[cid]["response"]
        assert response["status_code"] == 400
        assert response["body"]["error"]["param"] == "n"
        assert "at most 128 choices" in response["body"]["error"]["message"]
    for cid, served in (("other-model", "'tiny'"), ("other-embedder", "'conveyor-embedding'")):
        response = got[cid]["response"]
        assert response["status_code"] == 404
        error = response["body"]["error"]
        assert (error["code"], error["param"]) == ("model_not_found", "model")
        assert served in error["message"]
        assert got[cid]["error"]["code"] == "model_not_found"
    assert got["ok"]["response"]["body"]["model"] == "tiny"


def test_long_embedding_input_is_a_400_unless_truncation_is_asked(tmp_path, tiny_llama_dir):
    E = "/v1/embeddings"
    long = "w " * 20   # 20 words: past FakeEmbedder's 12
    path = write_lines(tmp_path / "in.jsonl", [
        line("long", E, {"input": ["short", long]}),
        line("truncated", E, {"input": ["short", long], "truncate_prompt_tokens": -1}),
        line("too-many", E, {"input": ["x"] * 2049}),
    ])
    summary = make_job(tmp_path, tiny_llama_dir, path).run()
    assert (summary.done, summary.failed) == (1, 2)
    got = by_id(tmp_path / "out.jsonl")
    error = got["long"]["response"]["body"]["error"]
    assert got["long"]["response"]["status_code"] == 400
    assert error["param"] == "input" and error["message"].startswith("input 1 is longer")
    body = got["truncated"]["response"]["body"]
    assert body["usage"]["prompt_tokens"] == 1 + FakeEmbedder.max_length
    assert got["too-many"]["response"]["status_code"] == 400
    assert "at most 2048 inputs" in got["too-many"]["response"]["body"]["error"]["message"]


def test_a_line_far_past_the_body_limit_is_skipped_unread(tmp_path, tiny_llama_dir):
    from engine.entrypoints.serving.limits import ServingLimits

    C = "/v1/completions"
    path = write_lines(tmp_path / "in.jsonl", [
        line("big-body", C, {"prompt": "x" * 5000}),
        line("huge-line", C, {"prompt": "x" * 200_000}),
        line("ok", C, {"prompt": "a", "max_tokens": 2}),
    ])
    summary = make_job(tmp_path, tiny_llama_dir, path,
                       limits=ServingLimits(max_body_bytes=4096)).run()
    assert (summary.done, summary.failed) == (1, 2)
    records_ = records(tmp_path / "out.jsonl")
    big = next(r for r in records_ if r["custom_id"] == "big-body")
    assert big["response"]["status_code"] == 413
    assert big["error"]["code"] == "request_too_large"
    huge = next(r for r in records_ if r["id"] == "batch_req_2")
    assert huge["custom_id"] is None and huge["response"] is None
    assert huge["error"]["code"] == "line_too_long"


def test_summary_counts_the_prefix_cache(tmp_path, tiny_llama_dir):
    """Lines sharing a long prompt prefix: the summary says how many of their
    prompt tokens were served from the prefix cache."""
    shared = "x" * 80  # 80 byte tokens: 5 full blocks of 16
    lines = [json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"model": "tiny", "prompt": shared + str(i), "max_tokens": 2,
                                  "temperature": 0}}) for i in range(6)]
    job = make_job(tmp_path, tiny_llama_dir, write_lines(tmp_path / "in.jsonl", lines),
                   max_num_seqs=1)  # one at a time: every later line finds the prefix
    summary = job.run()
    assert summary.done == 6
    assert summary.prefix_cache_queries == sum(len(shared) + len(str(i)) for i in range(6))
    assert summary.prefix_cache_hits == 5 * 80
    assert "prefix cache 400/" in summary.describe()
