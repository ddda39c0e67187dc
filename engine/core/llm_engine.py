"""The step loop: schedule → prepare → forward → sample → update → outputs."""

from __future__ import annotations

import gc
import itertools
import random
from dataclasses import dataclass
from typing import Annotated

import mlx.core as mx
import msgspec

from engine.core.memory_plan import MemoryPlan, PoolShape, plan_memory
from engine.core.model_runner import InFlightTokens, ModelRunner
from engine.core.outputs import Logprob
from engine.core.profile_step import dummy_lengths, dummy_step
from engine.core.request import Request
from engine.core.sampler import RowNeedsCounter, SamplerOutput, TokenMask, sample
from engine.core.sampling_params import SamplingParams
from engine.core.structured_output import StructuredOutputs
from engine.errors import ConveyorError, ModelLoadError, RequestError
from engine.loading.tokenizer import Tokenizer
from engine.platform import current_platform
from engine.platform.base import DTYPES, Platform, log
from kvcache.attention.metadata import AttentionSpec
from kvcache.block_manager import BlockManager
from kvcache.paged_cache import PagedKVCache
from models.layers import Attention
from scheduler.scheduler import (
    PlannedResult,
    RequestTooLong,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from scheduler.sequence import FinishReason, SequenceStatus


class EngineArgs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Engine settings; every field has a default that works."""

    model: str | None = None
    dtype: str | None = None
    keep_quantized: bool | None = None
    # The KV pool: kv_cache_bytes as given, or what the memory plan leaves of
    # gpu_memory_utilization x the device's memory (engine/core/memory_plan.py;
    # None: 0.9 on a GPU, 0.5 of the available RAM on the CPU).
    kv_cache_bytes: Annotated[int, msgspec.Meta(ge=1)] | None = None
    gpu_memory_utilization: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: the platform's (CPU 2048, GPU 8192)
    max_model_len: int | None = None
    seed: int = 0
    compile: bool | None = None   # compiled decode steps; None: where the platform says (CUDA)
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
    # CPU: run the model's forward on host memory with each shared layer on its
    # C kernel (engine/platform/host_forward.py); False keeps MLX's graph.
    # None: wherever every layer of the model has a kernel.
    host_forward: bool | None = None
    # Reuse the K/V of full blocks whose token prefix an earlier request
    # computed (vLLM's automatic prefix caching); outputs are the same either way.
    enable_prefix_caching: bool = True
    # Plan and launch step N+1 while the device still runs step N (vLLM v1's
    # asynchronous scheduling): the host's scheduling and batch building leave
    # the critical path. None: where the platform says (GPUs). Steps with
    # grammars or penalties, which need the previous token on the host, and
    # the CPU's host forward run one at a time either way.
    async_scheduling: bool | None = None


@dataclass
class _LaunchedStep:
    """A step whose forward and sampling are queued on the device."""

    out: SchedulerOutput
    result: SamplerOutput
    planned: list[PlannedResult]


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
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0     # of which were found cached

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries \
            if self.prefix_cache_queries else 0.0


def _checked(args: EngineArgs) -> EngineArgs:
    """`args` with every field's type and range checked (the constructor
    checks nothing; LLM(...) and the CLI build EngineArgs that way)."""
    try:
        return msgspec.convert(msgspec.structs.asdict(args), EngineArgs)
    except msgspec.ValidationError as exc:
        raise ConveyorError(f"invalid engine argument: {exc}") from None


def _compute_dtype(embedding) -> mx.Dtype:
    """The dtype activations (and so K/V) have: a quantized embedding yields
    rows in its scales' dtype."""
    floats = (mx.float32, mx.float16, mx.bfloat16)
    for dtype in (embedding.weight.dtype, getattr(embedding, "scales", embedding.weight).dtype):
        if dtype in floats:
            return dtype
    return mx.float16


class LLMEngine:
    def __init__(self, model, tokenizer: Tokenizer, config: dict, args: EngineArgs,
                 platform: Platform | None = None):
        """`platform` (None: the current device's) answers every device
        question: memory, attention backend, compiled steps, sampler."""
        args = _checked(args)
        self.model, self.tokenizer, self.config, self.args = model, tokenizer, config, args
        self.platform = platform = platform or current_platform()
        platform.prepare_model(model)
        margs = model.args
        max_len = args.max_model_len or int(config.get("max_position_embeddings", 4096))
        dtype = _compute_dtype(model.model.embed_tokens)
        if args.kv_cache_dtype is not None:
            if args.kv_cache_dtype not in DTYPES:
                raise RequestError(f"unknown kv_cache_dtype {args.kv_cache_dtype!r}; choose "
                                   f"from {', '.join(DTYPES)}")
            dtype = DTYPES[args.kv_cache_dtype]
        bs = args.block_size
        layers = [m for _, m in model.named_modules() if isinstance(m, Attention)]
        windows = [layer.window for layer in layers]
        # Blocks behind every layer's window go back to the pool as sequences advance.
        window = max(windows) if windows and None not in windows else None
        shape = PoolShape(bs, PagedKVCache.bytes_per_block(
            margs.num_hidden_layers, bs, margs.num_key_value_heads, margs.head_dim, dtype),
            max_len, args.max_num_seqs,
            args.max_num_batched_tokens or platform.max_num_batched_tokens, window)
        spec = AttentionSpec(margs.num_attention_heads, margs.num_key_value_heads,
                             margs.head_dim, bs, dtype,
                             sliding_window=any(w is not None for w in windows),
                             softcap=any(layer.softcap is not None for layer in layers),
                             shortest_window=min((w for w in windows if w is not None),
                                                 default=None))
        backend = platform.attention_backend(spec, args.paged_kernel)
        host_forward = platform.host_forward(model, backend, args.host_forward)
        self.sampler_kernels = platform.sampler_kernels()
        self.memory_plan: MemoryPlan = self._plan_memory(shape, spec, host_forward)
        num_blocks = self.memory_plan.num_blocks
        self.cache = self._new_cache(spec, num_blocks, backend)
        self.blocks = BlockManager(num_blocks, bs, args.enable_prefix_caching, window)
        self.scheduler = Scheduler(
            SchedulerConfig(args.max_num_seqs, shape.max_num_batched_tokens, max_len),
            self.blocks)
        compile_decode = platform.compile_decode if args.compile is None else args.compile
        self.runner = ModelRunner(model, self.cache, compile_decode=compile_decode,
                                  host_forward=host_forward)
        self.async_scheduling = self.runner.host_forward is None and (
            platform.async_scheduling if args.async_scheduling is None
            else args.async_scheduling)
        self._in_flight: _LaunchedStep | None = None
        self.structured = StructuredOutputs(tokenizer, model.args.vocab_size)
        self.requests: dict[str, Request] = {}
        # Which sampling options live requests use, counted as they come and
        # go: a step's sampler skips checking its rows for one that none uses,
        # and no step scans every request for grammars or penalties.
        self._row_needs = RowNeedsCounter()
        self._ids = itertools.count()
        self._rng = random.Random(args.seed)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        # What exists now (modules, weights' wrappers, tokenizer) lives as long
        # as the engine: keep it out of the cyclic collector's full passes,
        # which otherwise stall steps at random (seen: +-10% on an H200), as vLLM does.
        gc.freeze()

    def _new_cache(self, spec: AttentionSpec, num_blocks: int, backend=None) -> PagedKVCache:
        """Pools of `num_blocks` blocks for this model, served by `backend`
        (None: a new one of the platform's)."""
        if backend is None:
            backend = self.platform.attention_backend(spec, self.args.paged_kernel)
        return PagedKVCache(self.model.args.num_hidden_layers, num_blocks, spec.block_size,
                            spec.num_kv_heads, spec.head_dim, spec.kv_dtype, backend)

    def _plan_memory(self, shape: PoolShape, spec: AttentionSpec, host_forward) -> MemoryPlan:
        """The KV pool's plan (engine/core/memory_plan.py), made once before the
        first step and printed; entry points size their work from it."""
        def step_of(tokens: int):
            lengths = dummy_lengths(tokens, shape.max_num_batched_tokens, shape.max_num_seqs,
                                    shape.max_model_len)
            return dummy_step(self.model, lambda n: self._new_cache(spec, n), spec.block_size,
                              host_forward, self.sampler_kernels, lengths)

        plan = plan_memory(shape, self.platform, self.args.kv_cache_bytes,
                           self.args.gpu_memory_utilization, step_of)
        for line in plan.describe():
            log(line)
        return plan

    @classmethod
    def from_args(cls, args: EngineArgs) -> LLMEngine:
        from engine.loading.loader import load_model, resolve_model_path

        platform = current_platform()
        path = resolve_model_path(args.model)
        model, config = load_model(path, dtype=args.dtype, keep_quantized=args.keep_quantized,
                                   cpu_matmul=args.cpu_matmul, platform=platform)
        if not getattr(model, "generates", True):
            raise ModelLoadError(f"{path} ({config['model_type']}) is an embedding model (it has "
                                 "no LM head): load it with task='embed' / `conveyor embed`")
        return cls(model, Tokenizer.from_dir(path), config, args, platform)

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
        matcher = (self.structured.matcher(params.structured_outputs)
                   if params.structured_outputs is not None else None)
        request = Request(request_id, text, ids, params, self.tokenizer, seed, matcher)
        try:
            self.scheduler.add(request.sequence)
        except RequestTooLong as exc:
            raise RequestError(str(exc)) from None
        self.requests[request_id] = request
        self._row_needs.count(params, 1)
        self.prompt_tokens += len(ids)
        return request

    def _forget(self, request_id: str) -> Request | None:
        """Take a finished or aborted request out of the engine's books."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            self._row_needs.count(request.params, -1)
        return request

    def compile_grammar(self, params: SamplingParams) -> None:
        """Compile (and cache) the constraint of `params`, if any, so that
        adding the request later finds it ready; RequestError if invalid.
        Thread-safe: callers run it off the engine's thread."""
        if params.structured_outputs is not None:
            self.structured.compile(params.structured_outputs)

    def abort_request(self, request_id: str) -> Request | None:
        request = self._forget(request_id)
        if request is not None:
            self.scheduler.abort(request_id)
            request.finish(FinishReason.ABORT.value)
        return request

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # -- one step ----------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one batch; return the requests that got a token or finished.
        With asynchronous scheduling the tokens returned are those of the
        step launched by the previous call, read after this one is launched.
        If a step fails, every unfinished request is aborted with the error
        (its blocks freed) and the exception propagates."""
        try:
            previous = self._in_flight
            if previous is not None and not self._can_overlap():
                self._in_flight = None
                return self._collect(previous)
            out = self.scheduler.schedule()
            if out.is_empty:
                self._in_flight = None
                return self._collect(previous) if previous is not None else []
            self._in_flight = launched = self._launch(out, previous)
            if not self.async_scheduling:
                self._in_flight = None
                return self._collect(launched)
            return self._collect(previous) if previous is not None else []
        except BaseException as exc:
            self._in_flight = None
            self._fail_all(exc)
            raise

    def _can_overlap(self) -> bool:
        """Whether the next step may be planned before the last one's tokens
        are on the host: not when a request's grammar or penalties need them."""
        return self.async_scheduling and not self._row_needs.host_bound

    def _launch(self, out: SchedulerOutput, previous: _LaunchedStep | None) -> _LaunchedStep:
        """Build, run and sample one step on the device without waiting for it;
        the scheduler then counts it as done with PENDING tokens."""
        in_flight = None if previous is None else InFlightTokens(
            previous.result.token_ids, previous.out.seq_ids)
        batch = self.runner.prepare(out, in_flight)
        logits = self.runner.forward(batch)
        # A request is its own sampling row (it has a SamplingRow's attributes).
        requests = self.requests
        rows = list(map(requests.__getitem__, out.seq_ids))
        constrained = [i for i, (r, chunk) in enumerate(zip(rows, out.chunks))
                       if r.matcher is not None and chunk.samples] \
            if self._row_needs.constrained else []
        mask = None
        if constrained:
            mx.async_eval(logits)  # the forward runs while the host computes the masks
            matchers = [rows[i].matcher for i in constrained]
            mask = TokenMask(constrained, self.structured.fill_bitmask(matchers))
        result = sample(logits, rows, self.sampler_kernels, mask, self._row_needs.needs)
        if self.async_scheduling:
            mx.async_eval(*self._step_arrays(result))
        return _LaunchedStep(out, result, self.scheduler.plan_results(out))

    def _step_arrays(self, result: SamplerOutput) -> list[mx.array]:
        extras = [a for a in (result.logprobs, result.top_ids, result.top_logprobs)
                  if a is not None]
        return [result.token_ids, *extras, *self.cache.k, *self.cache.v]

    def _collect(self, step: _LaunchedStep) -> list[Request]:
        """Wait for a launched step, hand its tokens to the scheduler and the
        requests; the requests that got a token or finished."""
        result = step.result
        mx.eval(*self._step_arrays(result))
        tokens = result.token_ids.tolist()  # the step's one host transfer of ids
        logprob = self._logprobs(step.out, result)
        touched: list[Request] = []  # a sequence has one row a step, so one token
        requests, finished = self.requests, SequenceStatus.FINISHED
        for seq, token in self.scheduler.resolve(step.planned, tokens):
            request = requests.get(seq.seq_id)
            if request is None:
                continue
            reason = request.append(token, None if logprob is None else logprob(seq.seq_id, token))
            if reason is not None and seq.status is not finished:
                self.scheduler.finish(seq, reason)
            elif request.stop_reason is not None:
                seq.finish_reason = FinishReason.STOP
            if seq.status is finished:
                request.finish(seq.finish_reason.value)
                self._forget(seq.seq_id)
            touched.append(request)
        self.generated_tokens += len(touched)
        return touched

    def _logprobs(self, out: SchedulerOutput, result: SamplerOutput):
        """seq_id, token -> the Logprob to report (None where not asked);
        None when no row asked."""
        if result.logprobs is None:
            return None
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

        return logprob

    def _fail_all(self, exc: BaseException) -> None:
        message = f"engine step failed: {type(exc).__name__}: {exc}"
        for seq in self.scheduler.reset(FinishReason.ABORT):
            request = self._forget(seq.seq_id)
            if request is not None:
                request.finish(FinishReason.ABORT.value, error=message)

    def reset_prefix_cache(self) -> None:
        """Forget the prefix cache (see BlockManager.reset_prefix_cache)."""
        self.blocks.reset_prefix_cache()

    def stats(self) -> EngineStats:
        return EngineStats(
            steps=self.scheduler.stats.steps, preemptions=self.scheduler.stats.preemptions,
            kv_blocks_total=self.blocks.num_blocks, kv_blocks_used=self.blocks.num_used,
            kv_blocks_peak=self.blocks.peak_used, kv_cache_bytes=self.cache.nbytes,
            padding_waste=self.runner.padding_waste, prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated_tokens, running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting), prefix_cache_queries=self.blocks.prefix_queries,
            prefix_cache_hits=self.blocks.prefix_hits)
