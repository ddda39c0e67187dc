"""The platform is chosen once and passed down; device checks live in
engine/platform/ and kvcache/attention/ only; attention backends fall back
to the portable one when a model does not fit their kernels."""

import os
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import write_tiny_llama

from engine import LLM, SamplingParams
from engine.core.llm_engine import EngineArgs, LLMEngine
from engine.errors import ConveyorError
from engine.loading.loader import load_model
from engine.platform import current_platform
from engine.platform.base import PORTABLE_SAMPLING, Platform
from engine.platform.cpu import CpuPlatform
from kvcache.attention import cpu as cpu_attention
from kvcache.attention import cuda as cuda_attention
from kvcache.attention.metadata import AttentionSpec
from kvcache.attention.portable import PortableAttention, PortableMetadata

ROOT = Path(__file__).parents[1]
GREEDY = dict(temperature=0, ignore_eos=True)

# What asks which device MLX runs on.
DEVICE_CHECK = re.compile(r"\bon_cpu\(|\bdevice_name\(|mx\.default_device|mx\.cpu\b|mx\.gpu\b"
                          r"|metal\.is_available|cuda\.is_available|default_fast_math")
ALLOWED = ("engine/platform/", "kvcache/attention/")
MAX_DEVICE_BRANCHES = 10


def device_checks() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for folder in ("engine", "kvcache", "models", "scheduler"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line in path.read_text().splitlines():
                if DEVICE_CHECK.search(line) and not line.lstrip().startswith("#"):
                    found.setdefault(path.relative_to(ROOT).as_posix(), []).append(line.strip())
    return found


def test_device_checks_live_in_the_platform_and_attention_backends():
    found = device_checks()
    stray = {f: lines for f, lines in found.items() if not f.startswith(ALLOWED)}
    assert stray == {}, "ask the platform (engine/platform/) instead of the device"
    inside = sum(len(lines) for f, lines in found.items() if f.startswith(ALLOWED))
    assert 0 < inside <= MAX_DEVICE_BRANCHES


def test_the_platform_is_chosen_once_per_device():
    platform = current_platform()
    assert isinstance(platform, CpuPlatform) and platform.name == "cpu"
    assert current_platform() is platform is Platform.detect()


def test_engine_takes_every_device_answer_from_its_platform(tiny_llama_dir):
    class Bare(CpuPlatform):
        """A CPU without native kernels: the portable pieces everywhere."""

        max_num_batched_tokens = 96

        def fast_attention(self, spec):
            return None, None

        def sampler_kernels(self):
            return PORTABLE_SAMPLING

    model, config = load_model(tiny_llama_dir, platform=Bare(mx.cpu))
    llm = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20)
    eng = LLMEngine(model, llm.tokenizer, config, EngineArgs(kv_cache_bytes=16 << 20),
                    Bare(mx.cpu))
    assert eng.cache.backend.name == "portable" and eng.runner.host_forward is None
    assert eng.sampler_kernels is PORTABLE_SAMPLING
    assert eng.scheduler.config.max_num_batched_tokens == 96
    prompts = [[5, 6, 7], list(range(10, 150))]
    params = SamplingParams(max_tokens=12, **GREEDY)
    reqs = [eng.add_request(p, params) for p in prompts]
    while eng.has_unfinished():
        eng.step()
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert [r.sequence.output_token_ids for r in reqs] == want



def test_a_platform_of_one_thread_gives_every_kernel_of_its_engine_one_thread(tiny_llama_dir):
    """Processes sharing the cores (Ray actors of one CPU) lower `threads`;
    a kernel left on every core would oversubscribe them."""
    from engine.platform import native

    if native.load().library is None:
        pytest.skip(native.load().reason)
    one = CpuPlatform(mx.cpu)
    one.threads = 1
    model, config = load_model(tiny_llama_dir, platform=one)
    llm = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20)
    eng = LLMEngine(model, llm.tokenizer, config, EngineArgs(kv_cache_bytes=16 << 20), one)
    assert eng.runner.host_forward is not None and eng.sampler_kernels.host is not None
    assert eng.runner.host_forward.ops.threads == 1
    assert eng.cache.backend.kernel.threads == 1
    assert eng.sampler_kernels.host.threads == 1
    # The shared platform keeps every core.
    assert llm.engine.runner.host_forward.ops.threads == (os.cpu_count() or 1)
    params = SamplingParams(max_tokens=8, **GREEDY)
    req = eng.add_request([5, 6, 7, 8], params)
    while eng.has_unfinished():
        eng.step()
    want = llm.generate([[5, 6, 7, 8]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert req.sequence.output_token_ids == want

def greedy_oracle(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by recomputing the whole sequence each step (no cache)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(mx.argmax(model(mx.array(ids))[-1]).item()))
    return ids[len(prompt):]


def test_more_query_heads_per_kv_head_than_the_cpu_kernel_serves(tmp_path, capsys):
    """Issue 16, defect 6: 32 query heads on one KV head (the C kernel takes
    at most 16) run on the portable path, say so once, and stay correct."""
    path = write_tiny_llama(tmp_path / "m", hidden_size=256, num_attention_heads=32,
                            num_key_value_heads=1)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 256, size=int(n)).tolist() for n in (4, 70, 21)]
    params = SamplingParams(max_tokens=10, **GREEDY)
    outputs = []
    for _ in range(2):
        llm = LLM(str(path), kv_cache_bytes=16 << 20, max_num_batched_tokens=64)
        assert llm.engine.cache.backend.name == "portable"
        outputs.append([o.outputs[0].token_ids
                        for o in llm.generate(prompts, params, use_tqdm=False)])
    err = capsys.readouterr().err
    assert err.count("this model has 32") == 1
    assert "portable MLX path" in err
    model = llm.engine.model
    assert outputs[0] == outputs[1] == [greedy_oracle(model, p, 10) for p in prompts]
    with pytest.raises(ConveyorError, match="host_forward: the attention backend has no host"):
        LLM(str(path), kv_cache_bytes=16 << 20, host_forward=True)


def test_backend_limits():
    spec = AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                         kv_dtype=mx.float32)
    assert cpu_attention.unsupported(spec) is None
    assert "16 query heads" in cpu_attention.unsupported(
        AttentionSpec(32, 1, 64, 16, mx.float32))
    assert "bfloat16" in cpu_attention.unsupported(AttentionSpec(8, 2, 64, 16, mx.bfloat16))
    assert cuda_attention.unsupported(AttentionSpec(32, 8, 128, 16, mx.bfloat16)) is None
    assert "head_dim" in cuda_attention.unsupported(AttentionSpec(8, 2, 96, 16, mx.bfloat16))
    assert "shared memory" in cuda_attention.unsupported(
        AttentionSpec(64, 1, 128, 16, mx.bfloat16))


class CompiledPortable(PortableAttention):
    """The portable backend with compiled decode steps, to run the runner's
    compiled path (rows padded to a power of two, scratch rows) on the CPU."""

    name = "compiled-portable"
    compiled_decode = True

    def decode_graph_inputs(self, meta):
        return meta.write_rows, meta.decode_rows, meta.decode_mask

    def decode_metadata(self, rows, write_rows, decode_rows, decode_mask):
        return PortableMetadata(write_rows, rows, decode_rows=decode_rows,
                                decode_mask=decode_mask)


class Compiling(CpuPlatform):
    compile_decode = True

    def fast_attention(self, spec):
        return CompiledPortable(spec), None


def recording_batches(eng: LLMEngine) -> list:
    """The batches `eng`'s runner prepares, from now on."""
    batches = []
    prepare = eng.runner.prepare
    eng.runner.prepare = lambda out, *rest: batches.append(prepare(out, *rest)) or batches[-1]
    return batches


def test_compiled_decode_steps_give_the_same_tokens(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20, paged_kernel=False)
    eng = LLMEngine(llm.engine.model, llm.tokenizer, llm.engine.config,
                    EngineArgs(kv_cache_bytes=16 << 20), Compiling(mx.cpu))
    assert eng.runner._compiled is not None
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 256, size=int(n)).tolist() for n in (3, 40, 130, 17, 250)]
    params = SamplingParams(max_tokens=16, **GREEDY)
    reqs = [eng.add_request(p, params) for p in prompts]
    batches = recording_batches(eng)
    while eng.has_unfinished():
        eng.step()
    compiled = [b for b in batches if b.compiled]
    assert compiled and len(compiled) < len(batches)  # prompt steps are not compiled
    assert {(b.num_tokens, b.num_padded) for b in compiled} == {(5, 8)}
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert [r.sequence.output_token_ids for r in reqs] == want


def test_compiled_decode_steps_with_asynchronous_scheduling(tiny_llama_dir):
    """Compiled decode steps read their PENDING ids from the step in flight:
    its rows as they are while the batch keeps its rows (all 8, or the first
    7), through a scatter once a sequence in the middle has left; the tokens
    are those of one uncompiled step at a time."""
    llm = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20, paged_kernel=False)
    eng = LLMEngine(llm.engine.model, llm.tokenizer, llm.engine.config,
                    EngineArgs(kv_cache_bytes=16 << 20, async_scheduling=True), Compiling(mx.cpu))
    assert eng.async_scheduling and eng.runner._compiled is not None
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 256, size=int(n)).tolist() for n in rng.integers(3, 60, size=8)]
    # The last row leaves first (the rest keep their places), then rows 4 and 2.
    params = [SamplingParams(max_tokens=m, **GREEDY) for m in (14, 14, 9, 14, 6, 14, 14, 3)]
    reqs = [eng.add_request(p, q) for p, q in zip(prompts, params)]
    batches = recording_batches(eng)
    while eng.has_unfinished():
        eng.step()
    rows = [b.num_tokens for b in batches if b.compiled]
    assert {8, 7, 6, 5} <= set(rows)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert [r.sequence.output_token_ids for r in reqs] == want
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_kernel_constants_travel_as_float_bits():
    """A layer's float constants reach CUDA kernels as template ints (their
    float32 bits); a negative one would put '-' in the kernel's name."""
    from engine.platform.kernel_constants import bits_float, float_bits

    for x in (0.0, 1e-6, 0.08838834764831845, 50.0):
        assert bits_float(float_bits(x)) == np.float32(x)
    assert float_bits(0.0) == 0 and float_bits(1.0) == 0x3F800000
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="non-negative"):
            float_bits(bad)
