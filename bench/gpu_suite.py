"""The GPU benchmark suite: one process, several sizes, a short table last.

Run on the GPU machine (see shared/gpu/README.md):
    PYTHONPATH=$PWD python3 -m bench.gpu_suite [--quick]
It checks the paged path against mlx-lm on a small synthetic model first,
then times decode-heavy for synthetic Llama-1B/8B at N=64 and 256, Conveyor
vs mlx-lm's BatchGenerator on the same weights, and a step-time breakdown.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import mlx.core as mx

import engine  # noqa: F401
from bench import workloads
from bench.cli import _machine, _mlx_lm_twin
from bench.runners import run_conveyor, run_mlx_lm
from bench.synthetic import NullTokenizer, synthetic_model
from engine.core.llm_engine import EngineArgs, LLMEngine
from kvcache.paged_cache import PagedKVCache


def kv_budget(model, work, block_size=16, slack=1.15) -> int:
    a = model.args
    per_block = PagedKVCache.bytes_per_block(a.num_hidden_layers, block_size,
                                             a.num_key_value_heads, a.head_dim, mx.bfloat16)
    blocks = sum(-(-(len(p) + n) // block_size)
                 for p, n in zip(work.prompts, work.output_lens))
    return int(blocks * per_block * slack) + 16 * per_block


def write_cost() -> dict:
    """Is a scatter into a preallocated pool done in place on this backend?"""
    out = {}
    for gib in (0.25, 1.0):
        rows = int(gib * 2**30 / (128 * 2))
        pool = mx.zeros((rows, 128), mx.bfloat16)
        mx.eval(pool)
        idx = mx.arange(256, dtype=mx.int32) * 7
        val = mx.ones((256, 128), mx.bfloat16)
        for _ in range(3):
            pool[idx] = val
            mx.eval(pool)
        t = time.perf_counter()
        for _ in range(20):
            pool[idx] = val
            mx.eval(pool)
        out[f"write_ms_{gib}GiB"] = (time.perf_counter() - t) / 20 * 1e3
        del pool
    return out


def step_breakdown(engine_, n_steps=10) -> dict:
    """Time the phases of decode steps (each phase evaluated on its own)."""
    from engine.core.sampler import SamplingRow, sample

    sched, runner = engine_.scheduler, engine_.runner
    phases = {"schedule": 0.0, "prepare": 0.0, "forward": 0.0, "sample": 0.0, "update": 0.0}
    for _ in range(n_steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        batch = runner.prepare(out)
        t2 = time.perf_counter()
        logits = runner.forward(batch)
        mx.eval(logits, *engine_.cache.k, *engine_.cache.v)
        t3 = time.perf_counter()
        rows = [SamplingRow(engine_.requests[c.seq_id].params, 0, [], []) for c in out.chunks]
        toks = sample(logits, rows, engine_.sampler_kernels).token_ids.tolist()
        t4 = time.perf_counter()
        sched.update(out, toks)
        t5 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            phases[k] += v * 1e3 / n_steps
    return {k: round(v, 2) for k, v in phases.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="llama-1b,llama-8b")
    ap.add_argument("--sizes", default="64,256")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="uncompiled decode steps")
    ap.add_argument("--max-num-batched-tokens", type=int,
                    help="Conveyor's token budget a step (default: the engine's)")
    args = ap.parse_args()
    print("machine:", _machine(), flush=True)
    print("write cost:", write_cost(), flush=True)
    rows = []
    for name in args.models.split(","):
        model, config = synthetic_model(name, mx.bfloat16)
        twin = None if args.no_peer else _mlx_lm_twin(model, config)
        for n in [int(s) for s in args.sizes.split(",")]:
            work = workloads.decode_heavy(n, 128, 16 if args.quick else 128)
            eng = LLMEngine(model, NullTokenizer(), config, EngineArgs(
                max_num_seqs=max(256, n), max_num_batched_tokens=args.max_num_batched_tokens,
                kv_cache_bytes=kv_budget(model, work),
                compile=False if args.no_compile else None))
            # Warm-up at the batch size and prompt length measured: compiles its
            # decode graphs and JIT-compiles the prefill's kernels, as a server
            # does for each shape bucket on first use (on a fresh machine that
            # JIT took up to ~0.5 s of a ~1 s 1B run).
            run_conveyor(eng, workloads.decode_heavy(n, 128, 4))
            ours = run_conveyor(eng, work)
            # Breakdown on a fresh decode batch of the same size.
            for p in work.prompts:
                eng.add_request(p, __import__("engine").SamplingParams(
                    temperature=0, max_tokens=64, ignore_eos=True, detokenize=False))
            while any(s.num_computed_tokens < s.num_prompt_tokens
                      for s in eng.scheduler.running) or eng.scheduler.waiting:
                eng.step()
            phases = step_breakdown(eng)
            for rid in list(eng.requests):
                eng.abort_request(rid)
            row = {"model": name, "n": n, "conveyor_out_tok_s": round(ours.output_tps),
                   "conveyor_decode_tok_s": round(ours.decode_tps or 0),
                   "conveyor_peak_gb": round(ours.peak_memory_gb, 1),
                   "kv_gib": round(eng.cache.nbytes / 2**30, 2), "decode_step_ms": phases}
            del eng
            gc.collect()
            mx.clear_cache()
            if twin is not None:
                run_mlx_lm(twin, workloads.decode_heavy(n, 128, 4), n)  # same warm-up
                peer = run_mlx_lm(twin, work, batch_size=n)
                row["mlx_lm_out_tok_s"] = round(peer.output_tps)
                row["mlx_lm_decode_tok_s"] = round(peer.decode_tps or 0)
                row["mlx_lm_peak_gb"] = round(peer.peak_memory_gb, 1)
                row["ratio"] = round(ours.output_tps / peer.output_tps, 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
            mx.clear_cache()
        del model, twin
        gc.collect()
        mx.clear_cache()
    print("\nmodel      N    conveyor   mlx-lm   ratio   decode step ms (fwd / sample / other)")
    for r in rows:
        ph = r["decode_step_ms"]
        other = ph["schedule"] + ph["prepare"] + ph["update"]
        print(f"{r['model']:<9} {r['n']:>4} {r['conveyor_out_tok_s']:>10} "
              f"{r.get('mlx_lm_out_tok_s', '-'):>8} {r.get('ratio', '-'):>6}   "
              f"{ph['forward']:.1f} / {ph['sample']:.1f} / {other:.1f}")


if __name__ == "__main__":
    main()
