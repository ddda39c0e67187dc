"""Batch jobs on Ray: the actor pool answers a batch file exactly as the
single-process runner does, every custom_id once even when an actor or the
driver is killed with SIGKILL, and Ray Data datasets through build_processor.
A local two-CPU Ray cluster is started once for the module. The streaming
feed (an actor's batch never drains between calls) and its bookkeeping
(restarted actors, lines sent twice) are also tested without Ray."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

ray = pytest.importorskip("ray")

from engine.entrypoints.batch.batch_file import OutputFile  # noqa: E402
from engine.entrypoints.batch.batch_job import BatchJob, BatchSummary  # noqa: E402
from engine.entrypoints.ray import ray_batch  # noqa: E402
from engine.entrypoints.ray.actor_pool import ActorPool  # noqa: E402
from engine.entrypoints.ray.engine_worker import EngineWorker, Pumped, WorkerConfig  # noqa: E402
from engine.entrypoints.ray.ray_batch import run_ray_batch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KV_BYTES = 16 << 20
SEQS = 4


@pytest.fixture(scope="module")
def cluster():
    """The GCS address of a local Ray cluster of 2 CPUs, this module's only."""
    with pytest.MonkeyPatch.context() as env:
        # No auth token to share with the drivers the tests start (they inherit this).
        env.setenv("RAY_AUTH_MODE", "disabled")
        context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield context.address_info["gcs_address"]
        ray.shutdown()


def _line(custom_id, url, body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _input(path: Path, n: int, max_tokens: int = 6) -> Path:
    lines = []
    for i in range(n):
        if i % 2:
            body = {"messages": [{"role": "user", "content": f"question {i} " * (1 + i % 4)}],
                    "max_tokens": max_tokens, "temperature": 0}
            lines.append(_line(f"req-{i}", "/v1/chat/completions", body))
        else:
            body = {"prompt": f"prompt {i} " * (1 + i % 6), "max_tokens": max_tokens,
                    "temperature": 0}
            lines.append(_line(f"req-{i}", "/v1/completions", body))
    path.write_text("".join(x + "\n" for x in lines))
    return path


def _by_id(path: Path) -> dict[str, dict]:
    out = {}
    for raw in path.read_text().splitlines():
        record = json.loads(raw)
        duplicate = (record["error"] or {}).get("code") == "duplicate_custom_id"
        key = record["id"] if duplicate or not record["custom_id"] else record["custom_id"]
        assert key not in out, f"{key} answered twice"
        out[key] = record
    return out


def _answer(record: dict) -> tuple:
    """What must not differ between runners: texts, finish reasons, usage, error."""
    if record["error"] is not None:
        return ("error", record["error"]["code"],
                record["response"] and record["response"]["status_code"])
    body = record["response"]["body"]
    texts = tuple(c.get("text", c.get("message", {}).get("content")) for c in body["choices"])
    return texts, tuple(c["finish_reason"] for c in body["choices"]), body["usage"]


def _single_process(tmp_path, tiny_llama_dir, inp: Path) -> dict[str, tuple]:
    from engine import LLM

    out = tmp_path / "reference.jsonl"
    BatchJob(inp, out, lambda: LLM(str(tiny_llama_dir), kv_cache_bytes=KV_BYTES,
                                   max_num_seqs=SEQS),
             lambda: None, model_name="tiny", max_in_flight=2 * SEQS, progress=False).run()
    return {k: _answer(v) for k, v in _by_id(out).items()}


def _config(tiny_llama_dir) -> WorkerConfig:
    return WorkerConfig(model=str(tiny_llama_dir), served_model_name="tiny", max_num_seqs=SEQS,
                        engine_args={"kv_cache_bytes": KV_BYTES})


def test_actor_pool_answers_like_the_single_process_runner(tmp_path, tiny_llama_dir, cluster):
    inp = _input(tmp_path / "in.jsonl", 40)
    with inp.open("a") as f:  # bad lines: not JSON, a repeated id, a refused body
        f.write("not json\n")
        f.write(_line("req-3", "/v1/completions", {"prompt": "again"}) + "\n")
        f.write(_line("bad-model", "/v1/completions", {"prompt": "x", "model": "nope"}) + "\n")
    reference = _single_process(tmp_path, tiny_llama_dir, inp)
    out = tmp_path / "out.jsonl"
    summary = run_ray_batch(inp, out, _config(tiny_llama_dir), address=cluster, workers=2,
                            progress=False)
    results = {k: _answer(v) for k, v in _by_id(out).items()}
    assert results == reference
    assert (summary.done, summary.failed) == (40, 3)
    assert results["bad-model"] == ("error", "model_not_found", 404)
    # A re-run finds everything answered and adds nothing.
    again = run_ray_batch(inp, out, _config(tiny_llama_dir), address=cluster, workers=1,
                          progress=False)
    assert (again.done, again.failed, again.skipped) == (0, 0, 43)
    assert len(out.read_text().splitlines()) == 43


def test_an_actor_of_one_cpu_runs_on_one_thread_with_its_share_of_ram(cluster):
    """Two one-CPU actors on a two-core machine must not each use both cores,
    whatever OMP_NUM_THREADS the user's environment sets (Ray sets 1 only
    where none is set), nor each plan a KV pool from all the free RAM."""

    # max_calls: a worker process of its own, not reused.
    @ray.remote(num_cpus=1, max_calls=1, runtime_env={"env_vars": {"OMP_NUM_THREADS": "2"}})
    def threads():
        import ctypes
        import os

        from engine.platform import blas, current_platform

        platform = current_platform()
        before = platform.threads, platform.memory_utilization
        EngineWorker(WorkerConfig(cpu_threads=1))  # what every CPU actor is built with
        mkl = ctypes.CDLL(blas.loaded()).MKL_Get_Max_Threads() if blas.loaded() else None
        return before, (platform.threads, platform.memory_utilization), mkl, os.cpu_count()

    (threads, share), after, mkl, cores = ray.get(threads.remote())
    assert after == (1, share / cores) and threads == cores
    assert mkl in (1, None)

def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _start_driver(inp: Path, out: Path, tiny_llama_dir, cluster) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "engine.entrypoints.cli.batch", "batch", "-i", str(inp),
           "-o", str(out), "--model", str(tiny_llama_dir), "--served-model-name", "tiny",
           "--kv-cache-bytes", str(KV_BYTES), "--max-num-seqs", str(SEQS),
           "--ray", cluster, "--ray-workers", "2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_records(proc: subprocess.Popen, out: Path, at_least: int) -> None:
    deadline = time.monotonic() + 120  # a hang guard, not a timing assert
    while _lines(out) < at_least and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the job ended before the kill: {proc.stderr.read()}"


def test_kill_9_of_an_actor_then_of_the_driver_answers_every_id_once(
        tmp_path, tiny_llama_dir, cluster):
    n = 200
    inp = _input(tmp_path / "in.jsonl", n, max_tokens=16)
    reference = _single_process(tmp_path, tiny_llama_dir, inp)

    # An actor killed mid-job: Ray restarts it and reruns its chunk, whose
    # records the driver never wrote.
    out = tmp_path / "actor-killed.jsonl"
    proc = _start_driver(inp, out, tiny_llama_dir, cluster)
    pids = []
    while len(pids) < 2:
        line = proc.stderr.readline()
        assert line, "the driver exited before naming its workers"
        if line.startswith("conveyor: ray worker"):
            pids.append(int(line.split("pid ")[1].split()[0]))
    _wait_for_records(proc, out, 1)
    os.kill(pids[0], signal.SIGKILL)
    assert _lines(out) < n  # killed with chunks still to answer
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert {k: _answer(v) for k, v in _by_id(out).items()} == reference

    # The driver killed mid-job (after some records): the re-run adds the rest.
    out = tmp_path / "driver-killed.jsonl"
    proc = _start_driver(inp, out, tiny_llama_dir, cluster)
    _wait_for_records(proc, out, 1)
    proc.kill()
    proc.wait()
    written = _lines(out)
    assert 0 < written < n
    proc = _start_driver(inp, out, tiny_llama_dir, cluster)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"{written} skipped" in err
    assert {k: _answer(v) for k, v in _by_id(out).items()} == reference


def test_ray_auto_starts_a_ray_of_its_own_beside_another_programs(tmp_path, tiny_llama_dir,
                                                                   cluster):
    """`--ray auto` joins a cluster `ray start` made, else starts its own: not
    (Ray's own "auto") whatever Ray runs here, such as this module's, whose
    end would take the job down with it."""
    inp = _input(tmp_path / "in.jsonl", 6)
    reference = _single_process(tmp_path, tiny_llama_dir, inp)
    out = tmp_path / "out.jsonl"
    proc = _start_driver(inp, out, tiny_llama_dir, "auto")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    joined = re.search(r"ray at (\S+) ready", err).group(1)
    assert joined != cluster
    assert {k: _answer(v) for k, v in _by_id(out).items()} == reference


def test_build_processor_maps_a_dataset_of_prompts(tmp_path, tiny_llama_dir, cluster):
    from engine.entrypoints.ray.processor import build_processor

    prompts = [f"prompt {i} " * (1 + i % 5) for i in range(12)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(_line(f"row-{i + 1}", "/v1/completions",
                                 {"prompt": p, "max_tokens": 5, "temperature": 0}) + "\n"
                           for i, p in enumerate(prompts)))
    reference = _single_process(tmp_path, tiny_llama_dir, inp)
    processor = build_processor(str(tiny_llama_dir), {"max_tokens": 5, "temperature": 0},
                                concurrency=2, batch_size=4, max_num_seqs=SEQS,
                                engine_args={"kv_cache_bytes": KV_BYTES})
    dataset = ray.data.from_items([{"prompt": p, "custom_id": f"row-{i + 1}"}
                                   for i, p in enumerate(prompts)])
    rows = processor(dataset).take_all()
    got = {r["custom_id"]: (r["generated_text"], r["finish_reason"], r["num_generated_tokens"])
           for r in rows}
    assert got == {k: (v[0][0], v[1][0], v[2]["completion_tokens"])
                   for k, v in reference.items()}
    assert all(r["error"] is None for r in rows)


def test_parquet_prompt_column_is_answered_like_completions_lines(tmp_path, tiny_llama_dir,
                                                                   cluster):
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = [f"text {i} " * (1 + i % 3) for i in range(10)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(_line(f"row-{i + 1}", "/v1/completions",
                                 {"prompt": p, "max_tokens": 4, "temperature": 0}) + "\n"
                           for i, p in enumerate(prompts)))
    reference = _single_process(tmp_path, tiny_llama_dir, inp)
    table = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"text": prompts + [None]}), table)  # the last row: no prompt
    out = tmp_path / "out.jsonl"
    summary = run_ray_batch(table, out, _config(tiny_llama_dir), address=cluster, workers=2,
                            input_format="parquet", prompt_column="text",
                            sampling={"max_tokens": 4, "temperature": 0}, progress=False)
    results = {k: _answer(v) for k, v in _by_id(out).items()}
    assert results.pop("row-11") == ("error", "invalid_batch_line", None)
    assert results == reference
    assert (summary.done, summary.failed) == (10, 1)


def test_a_model_the_actors_cannot_load_is_one_job_error(tmp_path, cluster):
    from engine.errors import ConveyorError

    inp = _input(tmp_path / "in.jsonl", 3)
    config = WorkerConfig(model=str(tmp_path / "no-such-model"), max_num_seqs=SEQS)
    with pytest.raises(ConveyorError, match="engine actor failed: .*no-such-model"):
        run_ray_batch(inp, tmp_path / "out.jsonl", config, address=cluster, workers=1,
                      progress=False)
    assert (tmp_path / "out.jsonl").read_text() == ""


def test_pumped_lines_join_the_running_batch_and_are_answered_once(tmp_path, tiny_llama_dir):
    """The streaming feed: lines sent while others run join the same batch
    (no drain between calls), and every line comes back once, with the
    single-process runner's answer."""
    inp = _input(tmp_path / "in.jsonl", 8, max_tokens=12)
    reference = _single_process(tmp_path, tiny_llama_dir, inp)
    raw = [(n, line.encode()) for n, line in enumerate(inp.read_text().splitlines(), start=1)]
    worker = EngineWorker(msgspec.structs.replace(_config(tiny_llama_dir), max_num_seqs=8))
    first = worker.pump(raw[:4], 0.0)  # the first lines run a step (prefill), no more
    assert first.records == [] and first.waiting == 0
    second = worker.pump(raw[4:], 0.0)
    engine = worker.job.serving.generation.engine
    assert engine.stats().running == 8  # the new lines joined the unfinished ones
    records = first.records + second.records
    again = worker.pump(raw[:2], 0.0)  # lines still in flight are not taken twice
    records += again.records
    while len(records) < 8:
        pumped = worker.pump([], 0.05)
        assert pumped.incarnation == first.incarnation
        records += pumped.records
    lines = [n for n, _ in records]
    assert sorted(lines) == list(range(1, 9))
    assert not engine.has_unfinished()
    results = {r["custom_id"]: _answer(r) for r in (json.loads(b) for _, b in records)}
    assert results == reference


class _StubWorker:
    """An engine actor in miniature: runs up to `SEQS` lines, finishes the
    oldest two a call, reports its queue; built anew on each (re)start. It
    also sends each call's last record again with the next call's, as a
    line answered twice (sent to an actor before and after its restart)."""

    built = 0

    def __init__(self, config):
        type(self).built += 1
        self.incarnation = f"incarnation-{type(self).built}"
        self.lines: dict[int, bytes] = {}
        self.most_held = 0
        self.again: list[tuple[int, bytes]] = []

    def where(self):
        return "host", 1, self.incarnation

    def pump(self, lines, seconds):
        for n, raw in lines:
            self.lines.setdefault(n, raw)
        self.most_held = max(self.most_held, len(self.lines))
        done = sorted(self.lines)[:2]
        records = [(n, json.dumps({"id": f"batch_req_{n}", "custom_id": json.loads(
            self.lines.pop(n))["custom_id"], "response": None, "error": None}).encode())
            for n in done]
        repeated, self.again = self.again, records[-1:]
        return Pumped(self.incarnation, max(0, len(self.lines) - SEQS), records + repeated)


class _FakeRay:
    """Just enough of Ray for ActorPool: calls run in the order they were
    sent when waited on; `crash_at` call numbers kill the actor first, and
    Ray's restart and retry are played (a new worker runs the call)."""

    def __init__(self, crash_at=()):
        self.crash_at, self.calls, self.workers = set(crash_at), 0, []
        self.sent: list[_FakeRef] = []
        self.most_queued = 0  # pump calls of one actor not yet run, at most

    def queue(self, ref):
        self.sent.append(ref)
        pending = [r for r in self.sent if r.actor == ref.actor and r.result is None]
        if ref.method == "pump":
            self.most_queued = max(self.most_queued, len(pending))
        return ref

    def remote(self, **_):
        fake = self

        class Remote:
            def options(self, **_):
                return self

            def remote(self, config):
                index = len(fake.workers)
                fake.workers.append(_StubWorker(config))
                return _FakeActor(fake, index, config)

        return lambda cls: Remote()

    def wait(self, refs, num_returns, timeout=None):
        if timeout == 0:  # what is done already
            done = [r for r in refs if r.result is not None][:num_returns]
            return done, [r for r in refs if r not in done]
        oldest = sorted(refs, key=lambda r: r.order)
        for ref in oldest[:2]:  # two calls end at once: the second is for timeout=0
            self.get(ref)
        return oldest[:1], oldest[1:]

    def get(self, refs):
        if isinstance(refs, list):
            return [self.get(r) for r in refs]
        if refs.result is None:
            self.calls += 1
            assert self.calls < 2000, "the stream never ends: lines were lost"
            if self.calls in self.crash_at:
                self.workers[refs.actor] = _StubWorker(refs.config)
            worker = self.workers[refs.actor]
            refs.result = getattr(worker, refs.method)(*refs.args)
        return refs.result

    def kill(self, actor):
        pass


class _FakeRef:
    sent = 0

    def __init__(self, actor, method, args):
        _FakeRef.sent += 1
        self.order, self.actor, self.config = _FakeRef.sent, actor.index, actor.config
        self.method, self.args, self.result = method, args, None


class _FakeActor:
    def __init__(self, fake, index, config):
        self.fake, self.index, self.config = fake, index, config

    def __getattr__(self, method):
        actor = self

        class Method:
            def remote(self, *args):
                return actor.fake.queue(_FakeRef(actor, method, args))

        return Method()


def test_the_stream_answers_every_line_once_across_restarted_actors(tmp_path):
    n = 60
    inp = _input(tmp_path / "in.jsonl", n)
    with inp.open("a") as f:
        f.write(_line("req-7", "/v1/completions", {"prompt": "again"}) + "\n")
    fake = _FakeRay(crash_at={3, 4, 11, 30})
    built = _StubWorker.built
    pool = ActorPool(fake, WorkerConfig(max_num_seqs=SEQS), workers=2, cpus_per_worker=1,
                     first_fill=SEQS)
    pool.where()
    summary = BatchSummary()
    out_path = tmp_path / "out.jsonl"
    with OutputFile.open(out_path) as out:
        ray_batch._drive(ray_batch.read_lines(inp, "openai", "prompt", {}, 1 << 20), out, pool,
                         summary)
    records = _by_id(out_path)
    assert sorted(records) == sorted([f"req-{i}" for i in range(n)] + ["batch_req_61"])
    assert (summary.done, summary.failed) == (n, 1)
    assert len(fake.workers) == 2 and _StubWorker.built - built == 2 + 4  # 4 restarts
    assert not any(pool.held) and not pool.calls
    assert fake.most_queued == 2  # a call queued behind the running one: no wait between
    # Each actor held what its engine runs plus a small queue (a restart's
    # resend may briefly add to it), never a large part of the input.
    assert max(w.most_held for w in fake.workers) <= 2 * (SEQS + pool.reserve) < n // 3
