"""Qwen3 against llama of one shape and dtype, in the same run (issue 13's
speed bound: Qwen3 decodes at >= 0.8x llama on the CPU).

    python -m bench.arch_speed [--shape smollm2] [--bits 4] [--rounds 3]

Both checkpoints have random weights of the same shape (SmolLM2-135M's by
default); they differ only in Qwen3's per-head q/k RMSNorm (and the config
that names it). Each is written to a temporary directory and loaded the way
a user's checkpoint is (`--bits 4`: quantized in groups of 32 as the default
GGUF is, so the CPU multiplies integer codes; default float32). Workload:
decode-heavy 32 x 64 -> 64. Each engine runs it once untimed, then the two
alternate for `--rounds` timed rounds; every round's ratio is printed,
since a shared machine makes single runs noisy. `--steps N` then also times
N decode steps of each, interleaved one step at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import mlx.core as mx

import engine  # noqa: F401  (preloads the BLAS before MLX computes anything)
from bench import workloads
from bench.runners import describe_path, run_conveyor
from bench.synthetic import SHAPES, NullTokenizer, synthetic_model

ARCHITECTURES = ("llama", "qwen3")


def write_checkpoint(directory: Path, shape: str, model_type: str, bits: int | None) -> Path:
    """A random-weight checkpoint of `shape` (float32, or `bits`-bit codes in
    groups of 32) as config.json + model.safetensors."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model, config = synthetic_model(shape, mx.float32, model_type)
    if bits:
        nn.quantize(model, group_size=32, bits=bits)
        config["quantization"] = {"group_size": 32, "bits": bits}
    directory.mkdir(parents=True)
    mx.save_safetensors(str(directory / "model.safetensors"),
                        dict(tree_flatten(model.parameters())))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def build_engine(path: Path, kv_cache_bytes: int):
    from engine.core.llm_engine import EngineArgs, LLMEngine
    from engine.loading.loader import load_model

    model, config = load_model(path)
    return LLMEngine(model, NullTokenizer(), config,
                     EngineArgs(model=str(path), kv_cache_bytes=kv_cache_bytes))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--bits", type=int, choices=[4, 8], help="quantized checkpoints "
                   "(default: float32 weights)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=0, help="also time this many decode steps "
                   "of each, interleaved step by step (steadier on a busy machine)")
    args = p.parse_args(argv)
    work = workloads.decode_heavy(args.n, args.input_len, args.output_len)
    # 512 MiB holds 32 rows of ~350 tokens at SmolLM2's shape: no preemption.
    kv_bytes = 512 << 20
    engines = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHITECTURES:
            path = write_checkpoint(Path(tmp) / arch, args.shape, arch, args.bits)
            engines[arch] = build_engine(path, kv_bytes)
    for arch, eng in engines.items():
        run_conveyor(eng, work)  # untimed: every shape of the timed runs compiled/bound
        print(f"{arch}: {describe_path(eng)}")
    print(f"# decode-heavy {args.n} x {args.input_len} -> {args.output_len}, shape "
          f"{args.shape}, {'%d-bit codes' % args.bits if args.bits else 'float32'}")
    print(f"{'round':<6} {'llama out tok/s':>16} {'qwen3 out tok/s':>16} {'ratio':>6} "
          f"{'llama decode':>13} {'qwen3 decode':>13} {'ratio':>6}")
    ratios = []
    for r in range(args.rounds):
        # Alternate which goes first, so a slow patch of the machine hits both.
        order = ARCHITECTURES if r % 2 == 0 else ARCHITECTURES[::-1]
        res = {arch: run_conveyor(engines[arch], work) for arch in order}
        ratio = res["qwen3"].output_tps / res["llama"].output_tps
        dl, dq = res["llama"].decode_tps, res["qwen3"].decode_tps
        ratios.append(ratio)
        print(f"{r + 1:<6} {res['llama'].output_tps:>16.1f} {res['qwen3'].output_tps:>16.1f} "
              f"{ratio:>6.2f} {dl:>13.1f} {dq:>13.1f} {dq / dl:>6.2f}")
    print(f"qwen3/llama out tok/s: median {statistics.median(ratios):.2f}x over "
          f"{len(ratios)} rounds (bound: >= 0.8x)")
    if args.steps:
        interleaved_steps(engines, work, args.steps)
    return 0


def interleaved_steps(engines: dict, work: workloads.Workload, steps: int) -> None:
    """Decode steps of the two engines taken turn about (one step each), so
    both meet the same load from other jobs; per-step times compared."""
    import time

    import numpy as np

    from engine.core.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True,
                            detokenize=False)
    times: dict[str, list[float]] = {arch: [] for arch in engines}
    for eng in engines.values():
        eng.reset_prefix_cache()
        requests = [eng.add_request(p, params) for p in work.prompts]
        while not all(r.sequence.num_output_tokens for r in requests):
            eng.step()  # prefill: every row decodes from here on
    for i in range(steps):
        for arch in ARCHITECTURES if i % 2 == 0 else ARCHITECTURES[::-1]:
            start = time.perf_counter()
            engines[arch].step()
            times[arch].append(time.perf_counter() - start)
    for eng in engines.values():
        while eng.has_unfinished():
            eng.step()
    stats = {arch: np.percentile(np.array(t) * 1e3, [0, 25, 50]) for arch, t in times.items()}
    print(f"interleaved {len(work.prompts)}-row decode steps, {steps} each: ms per step "
          "(min / p25 / median)")
    for arch, (lo, p25, med) in stats.items():
        print(f"  {arch:<6} {lo:7.1f} {p25:7.1f} {med:7.1f}")
    ratio = stats["llama"] / stats["qwen3"]
    print(f"  qwen3/llama speed: {ratio[0]:.2f}x / {ratio[1]:.2f}x / {ratio[2]:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
