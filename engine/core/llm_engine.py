"""The step loop: schedule → prepare → forward → sample → update → outputs."""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass

import mlx.core as mx
import msgspec

from engine.core.model_runner import ModelRunner
from engine.core.outputs import Logprob
from engine.core.request import Request
from engine.core.sampler import SamplingRow, sample
from engine.core.sampling_params import SamplingParams
from engine.errors import RequestError
from engine.loading.tokenizer import Tokenizer
from engine.platform.backend import DTYPES, device_name, log_once, on_cpu
from kvcache.block_manager import BlockManager
from kvcache.paged_cache import PagedKVCache, host_dtype
from scheduler.scheduler import RequestTooLong, Scheduler, SchedulerConfig
from scheduler.sequence import FinishReason

CPU_KV_CACHE_BYTES = 2 << 30      # a fixed 2 GiB on the CPU
GPU_KV_CACHE_FRACTION = 0.5       # of device memory, on Metal
# On CUDA every K/V write copies its whole pool (MLX does not update it in
# place there; see DESIGN.md), so a step costs a copy of the whole budget:
# keep it modest unless told otherwise.
CUDA_KV_CACHE_BYTES = 4 << 30
# Tokens a step. On the CPU a 2048-row step already runs its matmuls at full
# speed; on an H100 8192 made a 256 x 128-token prefill take 4 steps instead of
# 8 and the whole 8B decode-heavy run 21% faster (bench/results/h100_prefill_budget.log).
CPU_MAX_BATCHED_TOKENS = 2048
GPU_MAX_BATCHED_TOKENS = 8192


class EngineArgs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Engine settings; every field has a default that works."""

    model: str | None = None
    dtype: str | None = None
    keep_quantized: bool | None = None
    kv_cache_bytes: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: 2048 on the CPU, 8192 on a GPU
    max_model_len: int | None = None
    seed: int = 0
    compile: bool | None = None   # compiled decode steps; None: on CUDA only
    # K/V storage: None keeps the model's dtype (float32 on the CPU); "float16"
    # halves the bytes attention reads (llama.cpp's default KV type).
    kv_cache_dtype: str | None = None
    # Attention through the device's paged kernel (C on the CPU, CUDA), which
    # reads K/V in place; False runs the portable MLX path. None: where one builds.
    paged_kernel: bool | None = None
    # How the CPU multiplies a quantized checkpoint: "int16" keeps the 4/8-bit
    # codes and quantizes activations to 16 bits per group (AVX-512 VNNI; logits
    # within ~0.14 of float32's, as close as mlx-lm's own 4-bit path), "int8" is
    # llama.cpp's scheme (faster, logits move by up to ~5), "float32" dequantizes
    # for the BLAS. None: int16 where it builds.
    cpu_matmul: str | None = None
    # CPU: run llama-family forwards in C on host memory (engine/platform/cpu_llama.py)
    # around the attention kernel; False keeps MLX's graph. None: where it builds.
    host_forward: bool | None = None


@dataclass
class EngineStats:
    steps: int
    preemptions: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_peak: int
    kv_cache_bytes: int
    padding_waste: float
    prompt_tokens: int
    generated_tokens: int
    running: int
    waiting: int


def _compute_dtype(embedding) -> mx.Dtype:
    """The dtype activations (and so K/V) have: a quantized embedding yields
    rows in its scales' dtype."""
    floats = (mx.float32, mx.float16, mx.bfloat16)
    for dtype in (embedding.weight.dtype, getattr(embedding, "scales", embedding.weight).dtype):
        if dtype in floats:
            return dtype
    return mx.float16


def _host_forward(model, args: EngineArgs):
    if args.host_forward is False or not on_cpu() or args.paged_kernel is False:
        return None
    from engine.platform import cpu_llama

    forward = cpu_llama.HostLlama.build(model) if hasattr(model, "layers") else None
    if forward is None and args.host_forward:
        raise RequestError("host_forward needs a llama-family float32 model on the CPU, "
                           "the native kernels and the preloaded BLAS")
    return forward


def _cpu_attention(args: EngineArgs, head_dim: int, dtype: mx.Dtype):
    """The CPU paged-attention kernel, when it applies and the native kernels
    are here."""
    kv_dtype = host_dtype(dtype)
    if args.paged_kernel is False or not on_cpu() or kv_dtype is None:
        return None
    from engine.platform import native
    from kvcache import cpu_paged_attention as cpa

    kernels = native.load()
    if kernels.library is None:
        log_once(f"{kernels.reason}: attention runs on the portable MLX path (slower)")
        return None
    try:
        return cpa.CpuPagedAttention(kernels.library, head_dim, args.block_size,
                                     os.cpu_count() or 1, kv_dtype)
    except ValueError as e:
        log_once(f"{e}: attention runs on the portable MLX path (slower)")
        return None


class LLMEngine:
    def __init__(self, model, tokenizer: Tokenizer, config: dict, args: EngineArgs):
        self.model, self.tokenizer, self.config, self.args = model, tokenizer, config, args
        margs = model.args
        max_len = args.max_model_len or int(config.get("max_position_embeddings", 4096))
        dtype = _compute_dtype(model.model.embed_tokens)
        if args.kv_cache_dtype is not None:
            if args.kv_cache_dtype not in DTYPES:
                raise RequestError(f"unknown kv_cache_dtype {args.kv_cache_dtype!r}; choose "
                                   f"from {', '.join(DTYPES)}")
            dtype = DTYPES[args.kv_cache_dtype]
        per_block = PagedKVCache.bytes_per_block(
            margs.num_hidden_layers, args.block_size, margs.num_key_value_heads,
            margs.head_dim, dtype)
        budget = args.kv_cache_bytes or _default_kv_bytes()
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise RequestError(f"kv_cache_bytes={budget} is smaller than one KV block "
                               f"({per_block} bytes)")
        self.cache = PagedKVCache(margs.num_hidden_layers, num_blocks, args.block_size,
                                  margs.num_key_value_heads, margs.head_dim, dtype,
                                  cpu_attention=_cpu_attention(args, margs.head_dim, dtype),
                                  cuda_kernel=args.paged_kernel is not False)
        self.blocks = BlockManager(num_blocks, args.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens or (
                CPU_MAX_BATCHED_TOKENS if on_cpu() else GPU_MAX_BATCHED_TOKENS), max_len),
            self.blocks)
        compile_decode = args.compile if args.compile is not None else device_name() == "cuda"
        self.runner = ModelRunner(model, self.cache, compile_decode=compile_decode,
                                  host_forward=_host_forward(model, args))
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._rng = random.Random(args.seed)
        self.prompt_tokens = 0
        self.generated_tokens = 0

    @classmethod
    def from_args(cls, args: EngineArgs) -> LLMEngine:
        from engine.loading.loader import load_model, resolve_model_path

        path = resolve_model_path(args.model)
        model, config = load_model(path, dtype=args.dtype, keep_quantized=args.keep_quantized,
                                   cpu_matmul=args.cpu_matmul)
        return cls(model, Tokenizer.from_dir(path), config, args)

    # -- requests ----------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Request:
        """Queue a request; raises RequestError for one that can never run."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
            vocab = self.model.args.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise RequestError(f"prompt token ids must be in [0, {vocab})")
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id!r}")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(32)
        request = Request(request_id, text, ids, params, self.tokenizer, seed)
        try:
            self.scheduler.add(request.sequence)
        except RequestTooLong as exc:
            raise RequestError(str(exc)) from None
        self.requests[request_id] = request
        self.prompt_tokens += len(ids)
        return request

    def abort_request(self, request_id: str) -> Request | None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.scheduler.abort(request_id)
            request.finish(FinishReason.ABORT.value)
        return request

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step ----------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one batch; return the requests that got a token or finished.
        If the step fails, every unfinished request is aborted with the
        error (its blocks freed) and the exception propagates."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        try:
            tokens, logprobs = self._run(out)
        except BaseException as exc:
            self._fail_all(exc)
            raise
        touched: dict[str, Request] = {}
        for seq, token in self.scheduler.update(out, tokens):
            request = self.requests[seq.seq_id]
            self.generated_tokens += 1
            if request.append(token, logprobs(seq.seq_id, token)) and not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.STOP)
            elif request.stop_reason is not None:
                seq.finish_reason = FinishReason.STOP
            if seq.is_finished:
                request.finish(seq.finish_reason.value)
                self.requests.pop(seq.seq_id, None)
            touched[seq.seq_id] = request
        return list(touched.values())

    def _run(self, out):
        batch = self.runner.prepare(out)
        logits = self.runner.forward(batch)
        rows = []
        for chunk in out.chunks:
            request = self.requests[chunk.seq_id]
            seq = request.sequence
            rows.append(SamplingRow(request.params, request.seed, seq.prompt_token_ids,
                                    seq.output_token_ids))
        result = sample(logits, rows)
        extras = [a for a in (result.logprobs, result.top_ids, result.top_logprobs)
                  if a is not None]
        mx.eval(result.token_ids, *extras, *self.cache.k, *self.cache.v)
        tokens = result.token_ids.tolist()  # the step's one host transfer of ids
        if result.logprobs is None:
            return tokens, lambda seq_id, token: None
        index = {c.seq_id: i for i, c in enumerate(out.chunks)}
        lps = result.logprobs.tolist()
        top_ids = result.top_ids.tolist() if result.top_ids is not None else None
        top_lps = result.top_logprobs.tolist() if result.top_logprobs is not None else None

        def logprob(seq_id: str, token: int) -> Logprob | None:
            i = index[seq_id]
            k = self.requests[seq_id].params.logprobs
            if k is None:
                return None
            top = list(zip(top_ids[i][:k], top_lps[i][:k])) if k and top_ids else None
            return Logprob(token, lps[i], top)

        return tokens, logprob

    def _fail_all(self, exc: BaseException) -> None:
        message = f"engine step failed: {type(exc).__name__}: {exc}"
        for seq in self.scheduler.reset(FinishReason.ABORT):
            request = self.requests.pop(seq.seq_id, None)
            if request is not None:
                request.finish(FinishReason.ABORT.value, error=message)

    def stats(self) -> EngineStats:
        return EngineStats(
            steps=self.scheduler.stats.steps, preemptions=self.scheduler.stats.preemptions,
            kv_blocks_total=self.blocks.num_blocks, kv_blocks_used=self.blocks.num_used,
            kv_blocks_peak=self.blocks.peak_used, kv_cache_bytes=self.cache.nbytes,
            padding_waste=self.runner.padding_waste, prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated_tokens, running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting))


def _default_kv_bytes() -> int:
    if on_cpu():
        return CPU_KV_CACHE_BYTES
    if device_name() == "cuda":
        return CUDA_KV_CACHE_BYTES
    return int(mx.device_info()["memory_size"] * GPU_KV_CACHE_FRACTION)


