"""The `conveyor` command: generate, embed, and the tools built on them."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time

from engine.entrypoints.cli.common import add_engine_args, engine_kwargs
from engine.errors import ConveyorError


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text (flags follow mlx_lm.generate)")
    add_engine_args(p)
    p.add_argument("--prompt", "-p", action="append",
                   help="the prompt; '-' reads stdin; repeat for several prompts "
                   "(batched together)")
    p.add_argument("--max-tokens", "-m", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--system-prompt", help="system message for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true",
                   help="feed the prompt as raw text")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens")


def _peak_memory_gb() -> float:
    import resource

    import mlx.core as mx

    peak = mx.get_peak_memory()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(peak, rss) / 1e9


def run_generate(args: argparse.Namespace) -> int:
    from engine.core.sampling_params import SamplingParams
    from engine.entrypoints.llm import LLM

    prompts = args.prompt or ["Hello"]
    prompts = [sys.stdin.read() if p == "-" else p for p in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.seed,
                            ignore_eos=args.ignore_eos)
    llm = LLM(args.model, **engine_kwargs(args))
    tok = llm.tokenizer
    if not args.ignore_chat_template and tok.chat_template:
        def chat(p: str) -> list[int]:
            messages = ([{"role": "system", "content": args.system_prompt}]
                        if args.system_prompt else [])
            text = tok.apply_chat_template(messages + [{"role": "user", "content": p}],
                                           add_generation_prompt=True)
            return tok.encode(text, add_special_tokens=False)
        inputs = [chat(p) for p in prompts]
    else:
        inputs = [tok.encode(p) for p in prompts]
    # The plan printed at start-up counts a typical request; this run's are known.
    length = sum(map(len, inputs)) // len(inputs) + args.max_tokens
    print(f"conveyor: memory plan: holds {llm.engine.memory_plan.sequences_at(length):,} "
          f"sequences of this run's average {length:,} tokens (prompt + --max-tokens) at once",
          file=sys.stderr)

    start = time.perf_counter()
    if len(inputs) == 1:
        first = None
        n_out = 0
        for delta in llm.stream(inputs[0], params):
            if first is None:
                first = time.perf_counter()
            n_out += len(delta.outputs[0].token_ids)
            print(delta.outputs[0].text, end="", flush=True)
        print()
        end = time.perf_counter()
        n_prompt = len(inputs[0])
    else:
        outputs = llm.generate(inputs, params, use_tqdm=False)
        end = time.perf_counter()
        for i, out in enumerate(outputs):
            print(f"--- prompt {i}\n{out.outputs[0].text}")
        first = min(o.metrics.first_token_time for o in outputs) - (
            outputs[0].metrics.arrival_time) + start
        n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
        n_prompt = sum(len(i) for i in inputs)
    first = first or end
    gen_time = max(end - first, 1e-9)
    print("==========", file=sys.stderr)
    print(f"Prompt: {n_prompt} tokens, {n_prompt / max(first - start, 1e-9):.3f} tokens-per-sec",
          file=sys.stderr)
    print(f"Generation: {n_out} tokens, {max(n_out - 1, 0) / gen_time:.3f} tokens-per-sec",
          file=sys.stderr)
    print(f"Peak memory: {_peak_memory_gb():.3f} GB", file=sys.stderr)
    stats = llm.stats()
    print(f"Engine: {stats.steps} steps, {stats.preemptions} preemptions, KV blocks peak "
          f"{stats.kv_blocks_peak}/{stats.kv_blocks_total}, padding waste "
          f"{100 * stats.padding_waste:.1f}%, prefix cache {stats.prefix_cache_hits}/"
          f"{stats.prefix_cache_queries} prompt tokens "
          f"({100 * stats.prefix_cache_hit_rate:.0f}%)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    sub.choices["generate"].set_defaults(run=run_generate)
    for name, module, adder, runner in COMMANDS:
        if importlib.util.find_spec(module) is None:
            continue  # an optional part not installed
        mod = importlib.import_module(module)
        getattr(mod, adder)(sub)
        sub.choices[name].set_defaults(run=getattr(mod, runner))
    return parser


# Subcommands living in their own modules: (name, module, add parser, run).
COMMANDS = [
    ("embed", "engine.entrypoints.cli.embed", "add_embed_parser", "run_embed"),
    ("batch", "engine.entrypoints.cli.batch", "add_batch_parser", "run_batch"),
    ("serve", "engine.entrypoints.cli.serve", "add_serve_parser", "run_serve"),
    ("worker", "engine.entrypoints.cli.worker", "add_worker_parser", "run_worker"),
    ("bench", "bench.cli", "add_bench_parser", "run_bench"),
]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConveyorError as exc:
        print(f"conveyor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("conveyor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
