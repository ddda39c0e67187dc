"""`conveyor bench`: throughput, latency and single-stream runs, peers side by side."""

from __future__ import annotations

import argparse
import json
import platform
import sys

import mlx.core as mx

from bench import workloads
from bench.runners import Result, describe_path, run_conveyor, run_mlx_lm
from engine.entrypoints.cli.common import add_cpu_matmul_arg


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (see bench/RESULTS.md)")
    kinds = p.add_subparsers(dest="bench_kind", required=True)
    for kind in ("throughput", "latency"):
        k = kinds.add_parser(kind, help=f"{kind} on the standard workloads "
                             "(docs/architecture.md)")
        k.add_argument("--workload", choices=["decode-heavy", "mixed"], default="decode-heavy")
        k.add_argument("--n", type=int, help="requests (default 64 decode-heavy, 256 mixed)")
        k.add_argument("--input-len", type=int, default=128)
        k.add_argument("--output-len", type=int, default=128)
        _add_common(k)
        k.add_argument("--plot", help="also run at several concurrencies and draw "
                       "throughput vs concurrency to this PNG (needs matplotlib)")
    x = kinds.add_parser("prefix", help="prefix caching off vs on, same engine, same run")
    x.add_argument("--workload", choices=["shared-prefix", "document-qa", "decode-heavy"],
                   default="shared-prefix")
    _add_common(x)
    s = kinds.add_parser("single", help="one request: prompt and generation tok/s")
    s.add_argument("--input-len", type=int, default=512)
    s.add_argument("--output-len", type=int, default=128)
    _add_common(s)


def _add_common(p) -> None:
    p.add_argument("--model", help="model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--synthetic", choices=["smollm2", "llama-1b", "llama-8b"],
                   help="a random-weight model of this shape instead of --model")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--compare", choices=["mlx-lm"], help="run a peer on the same work")
    p.add_argument("--peer-weights", choices=["as-loaded", "same"], default="as-loaded",
                   help="the peer's weights: as mlx-lm loads them (quantized stays "
                   "quantized), or exactly Conveyor's (e.g. dequantized fp32)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="default: 2048 on the CPU, 8192 on a GPU")
    p.add_argument("--kv-cache-bytes", type=int)
    p.add_argument("--kv-cache-dtype", choices=["float32", "float16", "bfloat16"],
                   help="Conveyor's K/V storage (default: the model's dtype)")
    p.add_argument("--no-paged-kernel", dest="paged_kernel", action="store_false", default=None,
                   help="Conveyor's attention on the portable MLX path")
    add_cpu_matmul_arg(p)
    p.add_argument("--no-host-forward", dest="host_forward", action="store_false", default=None,
                   help="Conveyor runs its CPU forward as an MLX graph")
    p.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                   default=None, help="Conveyor runs one step at a time (for comparison)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def _machine() -> str:
    from engine.platform import blas, current_platform

    dev = current_platform().name
    if dev != "cpu":
        dev += " " + mx.device_info().get("device_name", "")
    return (f"{dev}; {platform.machine()}; mlx {mx.__version__}; "
            f"blas {blas.loaded() and blas.loaded().rsplit('/', 1)[-1]}")


def _build(args):
    """(Conveyor engine, peer model factory)."""
    from engine.core.llm_engine import EngineArgs, LLMEngine

    eargs = EngineArgs(model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       kv_cache_bytes=args.kv_cache_bytes, paged_kernel=args.paged_kernel,
                       kv_cache_dtype=args.kv_cache_dtype, cpu_matmul=args.cpu_matmul,
                       host_forward=args.host_forward, async_scheduling=args.async_scheduling)
    if args.synthetic:
        from bench.synthetic import NullTokenizer, synthetic_model
        from engine.platform import current_platform

        # The platform's choice for a bfloat16 checkpoint: float32 on the CPU.
        dtype = getattr(mx, args.dtype) if args.dtype else \
            current_platform().default_dtype({"torch_dtype": "bfloat16"})
        model, config = synthetic_model(args.synthetic, dtype)
        engine = LLMEngine(model, NullTokenizer(), config, eargs)
        return engine, lambda: _mlx_lm_twin(model, config)
    engine = LLMEngine.from_args(eargs)

    def peer():
        from mlx_lm.utils import load_model

        from engine.loading.loader import resolve_model_path

        if args.peer_weights == "same":
            return _mlx_lm_twin(_float_weights(engine, args), engine.config)
        return load_model(resolve_model_path(args.model))[0]

    return engine, peer


def _float_weights(engine, args):
    """Conveyor's model with float weights: itself, or, where its quantized
    layers run in the int8 kernel, the same checkpoint dequantized instead."""
    from engine.platform.int8_linear import Int8Embedding, Int8Linear

    if not any(isinstance(m, (Int8Linear, Int8Embedding)) for _, m in
               engine.model.named_modules()):
        return engine.model
    from engine.loading.loader import load_model, resolve_model_path

    return load_model(resolve_model_path(args.model), dtype=args.dtype, cpu_matmul="float32")[0]


def _mlx_lm_twin(model, config):
    """mlx-lm's llama holding exactly the same weights (parameter names match
    once projections a platform fused are split back into views)."""
    from mlx_lm.models import llama

    from models.layers.fusion import unfused_parameters

    twin = llama.Model(llama.ModelArgs.from_dict(config))
    twin.load_weights(unfused_parameters(model), strict=True)
    return twin


def _workload(args):
    if args.workload == "mixed":
        return workloads.mixed(args.n or 256)
    return workloads.decode_heavy(args.n or 64, args.input_len, args.output_len)


def run_bench(args: argparse.Namespace) -> int:
    if args.bench_kind == "single":
        return _run_single(args)
    if args.bench_kind == "prefix":
        return _run_prefix(args)
    engine, peer = _build(args)
    work = _workload(args)
    # Each engine runs the identical workload once untimed, then timed: every
    # shape the timed run meets (the full prefill included) is compiled before.
    run_conveyor(engine, work)
    results = [run_conveyor(engine, work)]
    if args.compare == "mlx-lm":
        model = peer()
        batch = min(len(work.prompts), args.max_num_seqs)
        run_mlx_lm(model, work, batch_size=batch)
        results.append(run_mlx_lm(model, work, batch_size=batch))
    _report(args, results)
    if args.plot:
        _plot(args, engine, work)
    return 0


def _report(args, results: list[Result]) -> None:
    machine = _machine()
    if args.json:
        for r in results:
            print(json.dumps({"machine": machine, **r.as_dict()}))
        return
    print(f"# {results[0].workload}: {results[0].requests} requests, "
          f"{results[0].prompt_tokens} prompt tokens; {machine}")
    print(f"{'engine':<10} {'out tok/s':>10} {'total tok/s':>12} {'decode tok/s':>13} "
          f"{'seconds':>9} {'peak GB':>8}")
    for r in results:
        decode = f"{r.decode_tps:.1f}" if r.decode_tps else "-"
        print(f"{r.engine:<10} {r.output_tps:>10.1f} {r.total_tps:>12.1f} {decode:>13} "
              f"{r.seconds:>9.2f} {r.peak_memory_gb:>8.2f}")
    if len(results) > 1:
        line = (f"ratio conveyor/mlx-lm: output tok/s "
                f"{results[0].output_tps / results[1].output_tps:.2f}x")
        if results[0].decode_tps and results[1].decode_tps:
            line += f", decode phase {results[0].decode_tps / results[1].decode_tps:.2f}x"
        print(line)
    extra = results[0].extra
    if args.bench_kind == "latency":
        for key in ("ttft_s", "tpot_s", "e2e_s"):
            print(f"{key:<7} " + "  ".join(f"{k} {v * 1e3:.1f} ms" for k, v in extra[key].items()))
    print(f"conveyor ran: {extra['path']}")
    print(f"KV: {extra['kv_bytes_allocated'] / 2**20:.0f} MiB allocated, "
          f"{extra['kv_bytes_peak_used'] / 2**20:.0f} MiB peak in use; "
          f"{extra['steps']} steps, {extra['preemptions']} preemptions, "
          f"padding waste {100 * extra['padding_waste']:.1f}%")


def _plot(args, engine, work) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("conveyor: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return
    levels = [c for c in (1, 4, 16, 64, 256) if c <= len(work.prompts)]
    tps = []
    for c in levels:
        sub = workloads.Workload(work.name, work.prompts[:c], work.output_lens[:c])
        tps.append(run_conveyor(engine, sub).output_tps)
    plt.figure(figsize=(5, 3.5))
    plt.plot(levels, tps, marker="o")
    plt.xscale("log", base=2)
    plt.xlabel("concurrent requests")
    plt.ylabel("output tok/s")
    plt.title(f"Conveyor {work.name}")
    plt.tight_layout()
    plt.savefig(args.plot)


def _run_prefix(args) -> int:
    """The same workload with the prefix cache off, then on (emptied first):
    output tok/s and time to first token."""
    work = {"shared-prefix": workloads.shared_prefix, "document-qa": workloads.document_qa,
            "decode-heavy": workloads.decode_heavy}[args.workload]()
    engine, _ = _build(args)
    run_conveyor(engine, work)  # untimed: the same shapes as the timed runs
    rows = []
    # Two rounds of off then on, the second reported: the first timed run
    # after start-up runs slower whichever setting it has.
    for _ in range(2):
        rows = []
        for enabled in (False, True):
            engine.blocks.enable_prefix_caching = enabled
            rows.append((enabled, run_conveyor(engine, work)))
    engine.blocks.enable_prefix_caching = True
    if args.json:
        for enabled, r in rows:
            print(json.dumps({"machine": _machine(), "prefix_caching": enabled, **r.as_dict()}))
        return 0
    print(f"# {work.name}: {len(work.prompts)} requests, {work.num_prompt_tokens} prompt "
          f"tokens, {work.num_output_tokens} new; {_machine()}")
    print(f"conveyor ran: {rows[0][1].extra['path']}")
    print(f"{'prefix cache':<13} {'out tok/s':>10} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} "
          f"{'seconds':>8} {'hit tokens':>11}")
    for enabled, r in rows:
        ttft = r.extra["ttft_s"]
        print(f"{'on' if enabled else 'off':<13} {r.output_tps:>10.1f} "
              f"{ttft['p50'] * 1e3:>12.1f} {ttft['p90'] * 1e3:>12.1f} {r.seconds:>8.2f} "
              f"{r.extra['prefix_cache_hits']:>11}")
    off, on = rows[0][1], rows[1][1]
    print(f"ratio on/off: output tok/s {on.output_tps / off.output_tps:.2f}x, TTFT p50 "
          f"{off.extra['ttft_s']['p50'] / on.extra['ttft_s']['p50']:.2f}x lower")
    return 0


def _run_single(args) -> int:
    import time

    from engine.core.sampling_params import SamplingParams

    engine, peer = _build(args)
    prompt = workloads.decode_heavy(1, args.input_len, 1).prompts[0]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                            detokenize=False)
    rows = []
    for attempt in range(2):  # the first run warms up
        start = time.perf_counter()
        request = engine.add_request(prompt, params)
        first = None
        while engine.has_unfinished():
            engine.step()
            if first is None and request.sequence.num_output_tokens:
                first = time.perf_counter()
        end = time.perf_counter()
    rows.append(("conveyor", len(prompt) / (first - start),
                 (args.output_len - 1) / (end - first)))
    if args.compare == "mlx-lm":
        from mlx_lm.generate import generate_step

        model = peer()
        for attempt in range(2):
            start = time.perf_counter()
            first = None
            for i, _ in enumerate(generate_step(mx.array(prompt), model,
                                                max_tokens=args.output_len)):
                if i == 0:
                    first = time.perf_counter()
            end = time.perf_counter()
        rows.append(("mlx-lm", len(prompt) / (first - start),
                     (args.output_len - 1) / (end - first)))
    print(f"# single stream: {len(prompt)}-token prompt, {args.output_len} new tokens; "
          f"{_machine()}")
    print(f"conveyor ran: {describe_path(engine)}")
    print(f"{'engine':<10} {'prompt tok/s':>13} {'gen tok/s':>10}")
    for name, p, g in rows:
        print(f"{name:<10} {p:>13.1f} {g:>10.1f}")
    if len(rows) == 2:
        print(f"ratio conveyor/mlx-lm: prompt {rows[0][1] / rows[1][1]:.2f}x, "
              f"generation {rows[0][2] / rows[1][2]:.2f}x")
    return 0
