"""The memory plan (engine/core/memory_plan.py): the KV pool is sized once
from the device's memory, less what is in use and a measured step, printed
before the first step; a pool that cannot hold one sequence is a one-line
error; a plan too small for the whole load preempts and still finishes."""

import mmap
import re

import mlx.core as mx
import pytest
from test_engine import assert_all_blocks_free, random_prompts, token_ids

from engine import LLM, SamplingParams
from engine.core.llm_engine import EngineArgs, LLMEngine
from engine.core.memory_plan import MemoryPlan, PoolShape, plan_memory
from engine.core.profile_step import dummy_lengths
from engine.entrypoints.cli import main
from engine.errors import ConveyorError, RequestError
from engine.loading.loader import load_model
from engine.loading.tokenizer import Tokenizer
from engine.platform import host_memory
from engine.platform.base import DeviceMemory
from engine.platform.cpu import CpuPlatform

GREEDY = dict(temperature=0, ignore_eos=True)
PER_BLOCK = 8192  # the tiny llama: 2 layers x (K, V) x 16 tokens x 2 heads x 16 dims x 4 bytes
SHAPE = PoolShape(block_size=16, bytes_per_block=PER_BLOCK, max_model_len=128,
                  max_num_seqs=16, max_num_batched_tokens=256)


class Measured(CpuPlatform):
    """The CPU with a memory of `capacity` bytes, `in_use` of them held, and a
    dummy step that takes `peak` bytes: plans come out exactly."""

    def __init__(self, capacity: int, in_use: int = 0, peak: int = 0, **attrs):
        super().__init__(mx.cpu)
        self.memory = DeviceMemory(capacity, in_use, "test memory")
        self.peak = peak
        self.probes: list[int] = []
        self.__dict__.update(attrs)

    def device_memory(self):
        return self.memory

    def peak_bytes_during(self, prepare):
        prepare()()
        return self.peak


def plan(platform, kv_cache_bytes=None, utilization=None, shape=SHAPE) -> MemoryPlan:
    def step(tokens):
        platform.probes.append(tokens)
        return lambda: None

    return plan_memory(shape, platform, kv_cache_bytes, utilization, step)


def test_the_pool_gets_its_share_less_what_is_in_use_and_a_step():
    platform = Measured(capacity=100 * PER_BLOCK, in_use=20 * PER_BLOCK, peak=5 * PER_BLOCK,
                        memory_utilization=0.9, kv_cache_ceiling=None, profile_tokens=None)
    got = plan(platform)
    assert got.num_blocks == 90 - 20 - 5 and platform.probes == [256]  # a whole step measured
    assert got.num_tokens == 65 * 16 and got.nbytes == 65 * PER_BLOCK
    assert got.sequences_at(128) == 65 // 8 and got.sequences_at(100) == 65 // 7
    assert plan(platform, utilization=0.5).num_blocks == 50 - 20 - 5
    assert plan(platform, kv_cache_bytes=40 * PER_BLOCK + 5).num_blocks == 40
    lines = got.describe()
    assert lines[0].startswith("memory plan: KV cache 520.00 KiB = 65 blocks of 16 tokens = "
                               "1,040 tokens")
    assert "holds 8 sequences of 128 tokens (max_model_len) or 8 of 128" in lines[1]
    assert "0.90 of 800.00 KiB test memory, less 160.00 KiB in use and 40.00 KiB" in lines[2]


def test_a_shorter_dummy_step_is_scaled_up_and_the_ceilings_hold():
    big = Measured(capacity=1000 * PER_BLOCK, peak=PER_BLOCK, memory_utilization=0.5,
                   kv_cache_ceiling=20 * PER_BLOCK, profile_tokens=64)
    shape = PoolShape(16, PER_BLOCK, 128, max_num_seqs=100, max_num_batched_tokens=256)
    got = plan(big, shape=shape)
    assert big.probes == [64]
    assert got.num_blocks == 20 and "(64 measured, scaled)" in got.basis  # the ceiling
    assert "lifts it" in got.basis
    # A utilization given lifts the ceiling; the step counts 4 x the probe's peak.
    assert plan(big, utilization=0.5, shape=shape).num_blocks == 500 - 4
    # Never more than max_num_seqs sequences of max_model_len can use.
    four = PoolShape(16, PER_BLOCK, 128, max_num_seqs=4, max_num_batched_tokens=256)
    assert plan(big, utilization=0.5, shape=four).num_blocks == 4 * 8
    # The ceiling never goes below one sequence of max_model_len.
    small_ceiling = Measured(capacity=1000 * PER_BLOCK, kv_cache_ceiling=PER_BLOCK)
    assert plan(small_ceiling, shape=shape).num_blocks == 8


def test_a_pool_too_small_for_one_sequence_is_a_one_line_error(tiny_llama_dir, capsys):
    with pytest.raises(RequestError) as err:
        plan(Measured(capacity=1 << 30), kv_cache_bytes=7 * PER_BLOCK)
    message = str(err.value)
    assert "holds 112 tokens" in message and "one sequence of max_model_len=128" in message
    assert "--kv-cache-bytes" in message and "--max-model-len (to 112 at most)" in message
    with pytest.raises(RequestError, match="raise --gpu-memory-utilization or give "
                                           "--kv-cache-bytes, or lower --max-model-len"):
        plan(Measured(capacity=15 * PER_BLOCK), utilization=0.5)
    with pytest.raises(RequestError, match="no room for the KV cache .* in use .* lower "
                                           "--max-num-batched-tokens"):
        plan(Measured(capacity=10 * PER_BLOCK, in_use=9 * PER_BLOCK, peak=PER_BLOCK))
    with pytest.raises(RequestError, match="not both"):
        plan(Measured(capacity=0), kv_cache_bytes=1 << 20, utilization=0.5)

    # Through the command: one line, exit 2, no traceback.
    code = main(["generate", "--model", str(tiny_llama_dir), "--max-tokens", "2",
                 "--kv-cache-bytes", str(100 * PER_BLOCK)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("conveyor: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "less than one sequence of max_model_len=2,048" in errors[0]
    assert "--max-model-len (to 1,600 at most)" in errors[0]


def test_a_plan_that_preempts_finishes_every_request(tiny_llama_dir, capsys):
    """The plan leaves 20 blocks: two sequences of max_model_len, fewer than
    the 8 requests need at once."""
    platform = Measured(capacity=2 * (20 * PER_BLOCK + 1000), peak=1000, profile_tokens=None)
    model, config = load_model(tiny_llama_dir, platform=platform)
    engine = LLMEngine(model, Tokenizer.from_dir(tiny_llama_dir), config,
                       EngineArgs(max_model_len=128), platform)
    assert engine.memory_plan.num_blocks == engine.blocks.num_blocks == 20
    assert engine.memory_plan.sequences_at(128) == 2
    assert "KV cache 160.00 KiB = 20 blocks" in capsys.readouterr().err
    prompts = random_prompts(8, 40, 80, seed=5)
    params = SamplingParams(max_tokens=40, **GREEDY)
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    assert engine.stats().preemptions > 0
    assert all(r.finished and len(r.sequence.output_token_ids) == 40 for r in reqs)
    roomy = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20)
    want = token_ids(roomy.generate(prompts, params, use_tqdm=False))
    assert [r.sequence.output_token_ids for r in reqs] == want
    assert engine.blocks.num_free == 20


def test_the_default_cpu_plan_measures_a_step_and_shares_the_available_ram(tiny_llama_dir,
                                                                          capsys):
    llm = LLM(str(tiny_llama_dir), max_num_seqs=8)
    err = capsys.readouterr().err
    got = llm.engine.memory_plan
    assert "0.50 of" in got.basis and "available RAM" in got.basis
    assert "(64 measured, scaled)" in got.basis
    # The tiny model's pool stops at what 8 sequences of its 2048 tokens can use.
    assert got.num_blocks == 8 * 128 == llm.engine.blocks.num_blocks
    assert "conveyor: memory plan: KV cache 8.00 MiB = 1,024 blocks" in err
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("bad", [{"gpu_memory_utilization": 0}, {"gpu_memory_utilization": 1.5},
                                 {"gpu_memory_utilization": "most"}, {"kv_cache_bytes": 0}])
def test_memory_arguments_out_of_range_are_a_clear_error(tiny_llama_dir, bad):
    with pytest.raises(ConveyorError, match="invalid engine argument"):
        LLM(str(tiny_llama_dir), **bad)
    model, config = load_model(tiny_llama_dir)
    with pytest.raises(ConveyorError, match="invalid engine argument"):  # the constructor's way
        LLMEngine(model, None, config, EngineArgs(**bad))


def test_a_pool_larger_than_the_device_is_a_clear_error(tiny_llama_dir, capsys):
    # (MLX refused the pool's shape with an OverflowError traceback before.)
    with pytest.raises(ConveyorError, match="more than this device's"):
        LLM(str(tiny_llama_dir), kv_cache_bytes=10**18)
    code = main(["generate", "--model", str(tiny_llama_dir), "--prompt", "hi",
                 "--kv-cache-bytes", str(10**18)])
    assert code == 2 and "Traceback" not in capsys.readouterr().err


def test_the_command_checks_the_utilization(capsys):
    assert main(["generate", "--gpu-memory-utilization", "1.2"]) == 2
    assert "--gpu-memory-utilization must be in (0, 1]" in capsys.readouterr().err


def test_generate_prints_the_plan_before_its_first_step(tiny_llama_dir, first_step_stderr):
    seen = first_step_stderr
    assert main(["generate", "--model", str(tiny_llama_dir), "--max-tokens", "2",
                 "--max-num-seqs", "4", "--prompt", "hi"]) == 0
    assert "conveyor: memory plan: KV cache" in seen[0]
    assert "available RAM" in seen[0] and "sequences of 2,048 tokens" in seen[0]
    # ... and how many of this run's requests (the chat-templated prompt + 2) fit.
    held, length = map(int, re.search(r"holds (\d+) sequences of this run's average (\d+) "
                                      r"tokens", seen[0]).groups())
    assert held == (4 << 20) // PER_BLOCK // -(-length // 16)  # 4 x 2,048 tokens


def test_batch_prints_the_plan_before_its_first_step(tiny_llama_dir, tmp_path,
                                                     first_step_stderr):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/completions", '
                   '"body": {"prompt": "hi", "max_tokens": 2}}\n')
    seen = first_step_stderr
    assert main(["batch", "-i", str(inp), "-o", str(tmp_path / "out.jsonl"), "--model",
                 str(tiny_llama_dir), "--kv-cache-bytes", str(1 << 20), "--quiet"]) == 0
    assert "memory plan: KV cache 1.00 MiB = 128 blocks" in seen[0]
    assert "budget: kv_cache_bytes as given" in seen[0]


def test_dummy_steps_are_as_heavy_as_the_scheduler_allows():
    for tokens, step, seqs, max_len in [(2048, 2048, 256, 8192), (128, 2048, 256, 8192),
                                        (8192, 8192, 256, 2048), (64, 64, 256, 16),
                                        (5000, 5000, 4, 100), (1, 2048, 1, 2048)]:
        lengths = dummy_lengths(tokens, step, seqs, max_len)
        assert sum(lengths) == min(tokens, step, seqs * max_len)
        assert len(lengths) <= seqs and max(lengths) <= max_len and min(lengths) >= 1
    assert dummy_lengths(2048, 2048, 256, 8192) == [1793] + [1] * 255
    assert dummy_lengths(128, 2048, 256, 8192) == [113] + [1] * 15  # the step's share of rows


def test_host_memory_sees_what_a_call_touches():
    assert host_memory.available_bytes() > 0

    page = b"x" * mmap.PAGESIZE

    def touch_64_mib() -> int:
        # Fresh pages from the kernel (malloc might hand back resident ones).
        with mmap.mmap(-1, 64 << 20) as pages:
            return host_memory.resident_growth(
                lambda: [pages.write(page) for _ in range((64 << 20) // mmap.PAGESIZE)])

    # Under memory pressure the kernel may drop other (file-backed) pages of
    # this process meanwhile, which hides some growth: the best of three.
    assert max(touch_64_mib() for _ in range(3)) >= 60 << 20


def test_serve_prints_the_plan_before_its_first_step(tiny_llama_dir, monkeypatch,
                                                     first_step_stderr):
    """`conveyor serve` as run from the command line, uvicorn replaced by one
    request through the app it was given."""
    import uvicorn
    from starlette.testclient import TestClient

    answered = []

    def one_request(server, sockets=None):
        with TestClient(server.config.app, base_url="http://127.0.0.1") as client:
            answered.append(client.post("/v1/completions", json={
                "model": str(tiny_llama_dir), "prompt": "hi", "max_tokens": 2}).status_code)

    monkeypatch.setattr(uvicorn.Server, "run", one_request)
    seen = first_step_stderr
    assert main(["serve", "--model", str(tiny_llama_dir), "--port", "0", "--embedding-model",
                 "none", "--kv-cache-bytes", str(1 << 20)]) == 0
    assert answered == [200]
    assert "memory plan: KV cache 1.00 MiB = 128 blocks" in seen[0]
