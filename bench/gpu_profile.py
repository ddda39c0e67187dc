"""Where a GPU step's time goes, op by op and phase by phase.

Run on the GPU machine (see shared/gpu/README.md):
    PYTHONPATH=$PWD python3 -m bench.gpu_profile [--ops] [--engine 1b:256,8b:64]

--prefill-attention 8b:64:128,8b:1:8192: fresh prompt chunks of one layer,
the paged kernel against dense causal attention (where dense_prefill's
MIN_CHUNK comes from). --split-k 256,64: each 8B projection as MLX runs it,
pre-transposed, with the operands swapped, and with K split into a batched
matmul (the split lost at every shape).
--ops: each projection of the Llama-1B/8B shapes as MLX runs it at 64 and 256
rows (separate and fused q/k/v, gate/up), the elementwise kernels between
them, and one decoder layer without attention, compiled, against their sum.
--engine: the decode-heavy workload through LLMEngine on default settings,
each phase of a step timed on the host (scheduling, batch building, graph
building, sampling, the launch of the graph, the wait for the device, the
bookkeeping after it): a step spent in "launch" with little "wait" is spent
inside MLX's async_eval.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import defaultdict

import mlx.core as mx
import mlx.nn as nn

import engine  # noqa: F401
from bench import workloads
from bench.synthetic import SHAPES, NullTokenizer, synthetic_model


def timed_us(fn, repeat: int = 50) -> float:
    for _ in range(3):
        mx.eval(fn())
    mx.synchronize()
    t = time.perf_counter()
    outs = [fn() for _ in range(repeat)]
    mx.eval(outs)
    mx.synchronize()
    return (time.perf_counter() - t) / repeat * 1e6


def ops(name: str, rows: int) -> dict:
    s = SHAPES[name]
    d, f = s["hidden_size"], s["intermediate_size"]
    hd = d // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * hd
    bf = mx.bfloat16

    def w(o, i):
        return (mx.random.normal((o, i)) * 0.02).astype(bf)

    x = mx.random.normal((rows, d)).astype(bf)
    xf = mx.random.normal((rows, f)).astype(bf)
    mats = {"q": w(d, d), "k": w(kv, d), "v": w(kv, d), "qkv": w(d + 2 * kv, d), "o": w(d, d),
            "gate": w(f, d), "up": w(f, d), "gate_up": w(2 * f, d), "down": w(d, f),
            "head": w(s["vocab_size"], d)}
    mx.eval(x, xf, mats)
    out = {}
    for k, m in mats.items():
        inp = xf if k == "down" else x
        us = timed_us(lambda m=m, inp=inp: inp @ m.T)
        flops = 2 * rows * m.shape[0] * m.shape[1]
        out[k] = {"us": round(us, 1), "tflops": round(flops / us / 1e6, 1),
                  "weight_tb_s": round(m.size * 2 / us / 1e6, 2)}
    norm_w = mx.ones((d,), bf)
    q = mx.random.normal((rows, s["num_attention_heads"], hd)).astype(bf)
    pos = mx.arange(rows, dtype=mx.int32) + 100
    g = mx.random.normal((rows, f)).astype(bf)
    mx.eval(norm_w, q, pos, g)
    out["rms_norm"] = round(timed_us(lambda: mx.fast.rms_norm(x, norm_w, 1e-5)), 1)
    out["rope_q"] = round(timed_us(lambda: mx.fast.rope(
        q[:, :, None, :], hd, traditional=False, base=500000.0, scale=1.0, offset=pos)), 1)
    out["silu_mul"] = round(timed_us(lambda: nn.silu(g) * xf), 1)
    silu_mul = mx.compile(lambda a, b: nn.silu(a) * b)
    out["silu_mul_compiled"] = round(timed_us(lambda: silu_mul(g, xf)), 1)
    out["add"] = round(timed_us(lambda: x + x), 1)
    out["launch_only"] = round(timed_us(lambda: x[:1] + 1), 1)
    return out


def layer_without_attention(name: str, rows: int) -> dict:
    model, _ = synthetic_model(name, mx.bfloat16)
    layer = model.layers[0]
    s = SHAPES[name]
    x = (mx.random.normal((rows, s["hidden_size"])) * 0.1).astype(mx.bfloat16)
    pos = mx.arange(rows, dtype=mx.int32) + 100

    class NoAttention:
        def attend(self, q, k, v, scale, window=None, softcap=None):
            return q

    def run(x, pos):
        return layer(x, pos, NoAttention())

    compiled = mx.compile(run)
    eager = timed_us(lambda: run(x, pos))
    comp = timed_us(lambda: compiled(x, pos))
    head = timed_us(lambda: model.model.norm(x))
    def stack(h, pos):
        for block in model.layers:
            h = block(h, pos, NoAttention())
        return h

    all_layers = mx.compile(stack)
    whole = timed_us(lambda: all_layers(x, pos), repeat=10)
    return {"layer_eager_us": round(eager, 1), "layer_compiled_us": round(comp, 1),
            "all_layers_compiled_us": round(whole, 1), "norm_us": round(head, 1),
            "layers": len(model.layers)}


def attention_sweep(name: str, rows: int, context: int = 192) -> dict:
    """The paged attention kernel of one layer for `rows` decode rows of
    `context` tokens: the tensor-core form at 1, 2 and 4 warps, and the
    scalar form at each (warps, unroll, lanes) tried."""
    import numpy as np

    from kvcache.attention import cuda as cuda_attention

    s = SHAPES[name]
    heads, kvh = s["num_attention_heads"], s["num_key_value_heads"]
    d, bs = s["hidden_size"] // heads, 16
    width = -(-context // bs)
    blocks = rows * width + 1
    rng = np.random.default_rng(0)
    tables = rng.permutation(blocks - 1)[:rows * width].reshape(rows, width).astype(np.int32)
    meta = cuda_attention.CudaMetadata(
        mx.array(tables), mx.arange(rows, dtype=mx.int32),
        mx.full((rows,), context - 1, dtype=mx.int32), mx.arange(rows, dtype=mx.int32))
    k_pool = mx.random.normal((blocks * bs * kvh, d)).astype(mx.bfloat16)
    v_pool = mx.random.normal((blocks * bs * kvh, d)).astype(mx.bfloat16)
    q = mx.random.normal((rows, heads, d)).astype(mx.bfloat16)
    kv = mx.random.normal((rows, kvh, d)).astype(mx.bfloat16)
    mx.eval(k_pool, v_pool, q, kv)
    out = {}

    def attend():
        return cuda_attention.paged_attention(q, k_pool, v_pool, kv, kv, meta, d**-0.5, bs, kvh)

    saved = (cuda_attention.WARPS, cuda_attention.UNROLL, cuda_attention.LANES_PER_KEY,
             cuda_attention.TENSOR_CORES, cuda_attention.TC_WARPS, cuda_attention.TC_PIPELINE)
    try:
        for warps in (1, 2, 4):  # the tensor-core form (cuda_tensor_core.py)
            for pipe in (False, True):
                cuda_attention.TC_WARPS, cuda_attention.TC_PIPELINE = warps, pipe
                out[f"tensor_cores_w{warps}p{int(pipe)}_us"] = round(timed_us(attend, repeat=32), 1)
        cuda_attention.TC_WARPS, cuda_attention.TC_PIPELINE = saved[4:]
        cuda_attention.TENSOR_CORES = False
        for warps, unroll, lanes in ((4, 4, 32), (4, 4, None), (4, 2, None), (4, 8, None),
                                     (8, 2, None), (2, 4, None), (2, 2, None), (4, 4, 8)):
            cuda_attention.WARPS, cuda_attention.UNROLL = warps, unroll
            cuda_attention.LANES_PER_KEY = lanes
            auto = cuda_attention.lanes_per_key(d, heads // kvh)
            out[f"w{warps}u{unroll}l{lanes or auto}_us"] = round(timed_us(attend, repeat=32), 1)
    finally:
        (cuda_attention.WARPS, cuda_attention.UNROLL, cuda_attention.LANES_PER_KEY,
         cuda_attention.TENSOR_CORES, cuda_attention.TC_WARPS, cuda_attention.TC_PIPELINE) = saved
    kv_bytes = rows * context * kvh * d * 2 * 2
    out["kv_read_floor_us"] = round(kv_bytes / 4.8e6, 1)
    return out


def prefill_attention(name: str, chunks: int, length: int) -> dict:
    """Fresh prompt chunks of one layer: the paged kernel attending them
    against the kernel storing them plus dense causal attention
    (kvcache/attention/dense_prefill.py, forced on whatever MIN_CHUNK says)."""
    import numpy as np

    from kvcache.attention import cuda as cuda_attention
    from kvcache.attention import dense_prefill
    from kvcache.attention.metadata import CommonAttentionMetadata
    from kvcache.attention.sdpa import causal_attention

    s = SHAPES[name]
    heads, kvh = s["num_attention_heads"], s["num_key_value_heads"]
    d, bs = s["hidden_size"] // heads, 16
    n, width = chunks * length, -(-length // bs)
    blocks = chunks * width + 1
    tables = np.random.default_rng(0).permutation(blocks - 1).reshape(chunks, width)
    positions = np.tile(np.arange(length), chunks)
    table_of = np.repeat(np.arange(chunks), length)
    common = CommonAttentionMetadata(
        slots=tables[table_of, positions // bs] * bs + positions % bs, positions=positions,
        query_start=np.arange(chunks + 1) * length, context_lens=np.full(chunks, length),
        block_tables=tables, num_decode=0, num_padding=0, block_size=bs,
        scratch_block=blocks - 1)
    saved, dense_prefill.MIN_CHUNK = dense_prefill.MIN_CHUNK, 1
    span, cuda_attention.SOLO_SPAN = cuda_attention.SOLO_SPAN, 0
    try:
        split = cuda_attention.CudaMetadata.from_common(common, heads // kvh)
        cuda_attention.SOLO_SPAN = span
        plain = cuda_attention.CudaMetadata.from_common(common, heads // kvh)
        dense = cuda_attention.CudaMetadata.from_common(common, heads // kvh, plan_dense=True)
    finally:
        dense_prefill.MIN_CHUNK, cuda_attention.SOLO_SPAN = saved, span
    pools = [mx.zeros((blocks * bs * kvh, d), mx.bfloat16) for _ in range(2)]
    q = mx.random.normal((n, heads, d)).astype(mx.bfloat16)
    k, v = (mx.random.normal((n, kvh, d)).astype(mx.bfloat16) for _ in range(2))
    mx.eval(pools, q, k, v)

    def kernel():
        return cuda_attention.paged_attention(q, *pools, k, v, plain, d**-0.5, bs, kvh)

    def kernel_split():  # every run's keys split over the block's warps (SOLO_SPAN 0)
        return cuda_attention.paged_attention(q, *pools, k, v, split, d**-0.5, bs, kvh)

    def with_dense():
        out = cuda_attention.paged_attention(q, *pools, k, v, dense, d**-0.5, bs, kvh)
        return dense_prefill.attend(dense.dense, out, q, k, v, d**-0.5)

    def store_only():
        return cuda_attention.paged_attention(q, *pools, k, v, dense, d**-0.5, bs, kvh)

    # MLX's attention alone on inputs already in its layout: what the dense
    # path would cost without its gathers and merge (the rest of dense_us).
    group = dense.dense.groups[0]
    batched = [x[group.rows].reshape(group.chunks, group.length, x.shape[1], d)
               for x in (q, k, v)]
    mx.eval(batched)

    def sdpa_only():
        return causal_attention(*batched, d**-0.5)

    def diff(a, b):
        return mx.abs(a().astype(mx.float32) - b().astype(mx.float32)).max().item()

    return {name: round(timed_us(fn, repeat=8), 1) for name, fn in (
        ("kernel_us", kernel), ("kernel_split_us", kernel_split), ("dense_us", with_dense),
        ("of_which_store_only_us", store_only), ("of_which_sdpa_us", sdpa_only))} | {
        "max_diff_dense": diff(kernel, with_dense), "max_diff_split": diff(kernel, kernel_split)}


def matmul_split_k(rows: int, n: int, k: int, layers: int = 8) -> dict:
    """x [rows, k] @ W.T [k, n] as MLX runs it, over `layers` weights (beyond
    the L2), against W pre-transposed and against K split in 2 or 4 as one
    batched matmul plus a sum (more thread blocks for narrow outputs)."""
    bf = mx.bfloat16
    ws = [(mx.random.normal((n, k)) * 0.02).astype(bf) for _ in range(layers)]
    x = mx.random.normal((rows, k)).astype(bf)
    mx.eval(ws, x)
    variants = {"plain": (ws, lambda x, w: x @ w.T),
                "pre_transposed": ([mx.contiguous(w.T) for w in ws], lambda x, w: x @ w),
                # The same product with the operands' roles swapped (W x^T, then
                # back): cuBLAS picks its kernel by shape, so a swap may pick another.
                "swapped": (ws, lambda x, w: mx.contiguous((w @ x.T).T))}
    for parts in (2, 4):
        split = [mx.contiguous(w.reshape(n, parts, k // parts).transpose(1, 0, 2)) for w in ws]
        variants[f"split{parts}"] = (split, lambda x, w, p=parts: (
            x.reshape(rows, p, k // p).transpose(1, 0, 2) @ w.transpose(0, 2, 1)).sum(axis=0))
    out = {}
    for label, (weights, mm) in variants.items():
        mx.eval(weights)
        step = mx.compile(lambda x, weights=weights, mm=mm: [mm(x, w) for w in weights])
        us = timed_us(lambda: step(x), repeat=5) / layers
        out[label] = {"us": round(us, 1), "tflops": round(2 * rows * n * k / us / 1e6, 1)}
    return out


class PhaseClock:
    """Host seconds spent in wrapped callables, by phase, over decode steps."""

    def __init__(self):
        self.total = defaultdict(float)
        self.steps = 0

    def wrap(self, obj, attr: str, phase: str):
        fn = getattr(obj, attr)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[phase] += time.perf_counter() - t
        setattr(obj, attr, timed)


class TimedMx:
    """The mlx.core module with eval timed (the host waiting for the device)
    and async_eval timed ("launch": MLX walking the step's graph and handing
    each kernel to the driver; on CUDA it records them into CUDA graphs
    there, and may wait on the device too: at 8B the launch grows with the
    rows at the same graph, bench/RESULTS.md session 9)."""

    def __init__(self, clock: PhaseClock):
        self._clock = clock

    def __getattr__(self, name):
        return getattr(mx, name)

    def eval(self, *a):
        t = time.perf_counter()
        mx.eval(*a)
        self._clock.total["wait"] += time.perf_counter() - t

    def async_eval(self, *a):
        t = time.perf_counter()
        mx.async_eval(*a)
        self._clock.total["launch"] += time.perf_counter() - t


def engine_phases(name: str, n: int) -> dict:
    from engine.core import llm_engine
    from engine.core.llm_engine import EngineArgs, LLMEngine
    from engine.core.sampling_params import SamplingParams

    model, config = synthetic_model(name, mx.bfloat16)
    eng = LLMEngine(model, NullTokenizer(), config, EngineArgs())
    clock = PhaseClock()

    def submit(out_len):
        for p in workloads.decode_heavy(n, 128, out_len).prompts:
            eng.add_request(p, SamplingParams(temperature=0, max_tokens=out_len,
                                              ignore_eos=True, detokenize=False))

    submit(8)  # warm-up: compiles graphs and kernels at these shapes
    while eng.has_unfinished():
        eng.step()
    submit(128)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running) \
            or eng.scheduler.waiting:
        eng.step()
    for _ in range(4):
        eng.step()
    clock.wrap(eng.scheduler, "schedule", "schedule")
    clock.wrap(eng.runner, "prepare", "prepare")
    clock.wrap(eng.runner, "forward", "forward_graph")
    clock.wrap(eng.scheduler, "plan_results", "plan_results")
    clock.wrap(eng.scheduler, "resolve", "resolve")
    real_sample = llm_engine.sample

    def sample(*a, **k):
        t = time.perf_counter()
        try:
            return real_sample(*a, **k)
        finally:
            clock.total["sample_graph"] += time.perf_counter() - t
    llm_engine.sample = sample
    llm_engine.mx = TimedMx(clock)
    steps, t = 64, time.perf_counter()
    try:
        for _ in range(steps):
            eng.step()
        mx.synchronize()
    finally:
        llm_engine.sample, llm_engine.mx = real_sample, mx
    wall = time.perf_counter() - t
    phases = {k: round(v / steps * 1e3, 3) for k, v in clock.total.items()}
    phases["other_host"] = round(wall / steps * 1e3 - sum(phases.values()), 3)
    for rid in list(eng.requests):
        eng.abort_request(rid)
    return {"model": name, "n": n, "step_ms": round(wall / steps * 1e3, 3),
            "tok_s": round(n * steps / wall), "phases_ms": phases}


_MAX_ROWS, _MAX_TOKENS = 4096, 65536


def _spec_list(fields: str):
    """An argparse type for comma-separated specs like "8b:256": `fields`
    names each colon-separated part ("model", "rows", "tokens"; a trailing
    "?" makes the last one optional). Returns a list of tuples (model names
    as their SHAPES key, counts as ints); a bad spec is an argparse error."""
    names = fields.split(":")
    optional = names[-1].endswith("?")
    names[-1] = names[-1].rstrip("?")
    models = sorted(k.removeprefix("llama-") for k in SHAPES if k.startswith("llama-"))

    def part(kind: str, text: str):
        if kind == "model":
            if text not in models:
                raise argparse.ArgumentTypeError(f"model {text!r} is not one of {models}")
            return f"llama-{text}"
        top = _MAX_ROWS if kind == "rows" else _MAX_TOKENS
        if not text.isdigit() or not 1 <= int(text) <= top:
            raise argparse.ArgumentTypeError(f"{kind} must be a whole number from 1 to "
                                             f"{top:,}, not {text!r}")
        return int(text)

    def parse(text: str) -> list[tuple]:
        specs = []
        for spec in filter(None, text.split(",")):
            parts = spec.split(":")
            if not (len(parts) == len(names) or optional and len(parts) == len(names) - 1):
                raise argparse.ArgumentTypeError(f"{spec!r} is not {fields.replace('?', '')}")
            specs.append(tuple(part(k, t) for k, t in zip(names, parts)))
        return specs
    return parse


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", action="store_true")
    ap.add_argument("--engine", type=_spec_list("model:rows"), default=[],
                    help="model:rows,... e.g. 1b:256,8b:64")
    ap.add_argument("--layers", type=_spec_list("model:rows"), default=[],
                    help="model:rows,...: the stack without attention")
    ap.add_argument("--attention", type=_spec_list("model:rows:tokens?"), default=[],
                    help="model:rows[:context],...: kernel variants (context 192 if left out)")
    ap.add_argument("--no-fuse", action="store_true", help="projections unfused")
    ap.add_argument("--prefill-attention", type=_spec_list("model:rows:tokens"), default=[],
                    help="model:chunks:length,...: kernel vs dense prefill attention")
    ap.add_argument("--split-k", type=_spec_list("rows"), default=[],
                    help="rows,...: each 8B projection split or not")
    return ap


def main() -> None:
    args = parser().parse_args()
    for name, chunks, length in args.prefill_attention:
        print(json.dumps({"model": name, "chunks": chunks, "length": length,
                          **prefill_attention(name, chunks, length)}), flush=True)
    for (rows,) in args.split_k:
        s = SHAPES["llama-8b"]
        d, f = s["hidden_size"], s["intermediate_size"]
        kv = s["num_key_value_heads"] * d // s["num_attention_heads"]
        for label, n, k in (("qkv", d + 2 * kv, d), ("o", d, d), ("gate_up", 2 * f, d),
                            ("down", d, f)):
            print(json.dumps({"rows": rows, "proj": label,
                              **matmul_split_k(rows, n, k)}), flush=True)
    if args.no_fuse:
        from engine.platform.base import Platform
        from engine.platform.cuda import CudaPlatform
        CudaPlatform.prepare_model = Platform.prepare_model
        CudaPlatform.fuse_projections = False
    for name, n, *context in args.attention:
        context = context[0] if context else 192
        print(json.dumps({"model": name, "rows": n, "context": context,
                          **attention_sweep(name, n, context)}), flush=True)
    for name, n in args.layers:
        print(json.dumps({"model": name, "rows": n, **layer_without_attention(name, n)}),
              flush=True)
    if args.ops:
        for name in ("llama-1b", "llama-8b"):
            for rows in (64, 256):
                print(json.dumps({"model": name, "rows": rows, **ops(name, rows)}), flush=True)
                print(json.dumps({"model": name, "rows": rows,
                                  **layer_without_attention(name, rows)}), flush=True)
    for name, n in args.engine:
        print(json.dumps(engine_phases(name, n)), flush=True)
        # The last engine's weights and KV pool, given back before the next
        # one plans its memory (it would otherwise see them in use).
        gc.collect()
        mx.clear_cache()


if __name__ == "__main__":
    main()
