"""`conveyor batch`: run an OpenAI Batch file (the format vLLM's run-batch
reads too) through the engine, resumably."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.entrypoints.cli.common import (
    add_engine_args,
    add_limit_args,
    engine_kwargs,
    serving_limits,
)
from engine.errors import ConveyorError

_EPILOG = """\
input (one JSON object a line, OpenAI Batch format):
  {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
   "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}}
  url: /v1/completions, /v1/chat/completions or /v1/embeddings

output (one line a request, appended as each one finishes, in any order):
  {"id": "batch_req_7", "custom_id": "r1", "response": {"status_code": 200,
   "request_id": "...", "body": {... OpenAI response, with usage ...}}, "error": null}
  A line whose request the API refuses (unknown url or model, bad field,
  prompt too long, ...) gets the status and error body the HTTP server would
  send, plus "error" {"code", "message"}; a line that is no request at all
  (invalid JSON, no custom_id, repeated custom_id) gets "error" alone. The
  job goes on either way. A line's "model" must name the served model (or
  be left out).

Resuming: run the same command again after an interruption (even kill -9).
Lines whose custom_id the output file already answers are skipped, and a
torn last line is cut off first, so every custom_id ends up answered once.
One run per output file at a time: a second run on the same output exits 2.

On Ray (--ray): the driver reads the input and alone writes the output, as
above; engine actors answer the lines as a stream (new lines join each
actor's running batch). A killed actor is restarted and the lines it held
answered again; a killed driver is resumed by running it again.
"--ray auto" joins the Ray that `ray start --head` started on this machine
(or that RAY_ADDRESS names); with none, it starts a local one that lives as
long as the driver. For long jobs start one first, so that a killed driver
leaves no Ray processes behind.

Exit status: 0 when the job ran (bad lines included); 2 when it could not
(missing input file, unusable output file, model not found).
"""


def add_batch_parser(subparsers) -> argparse.ArgumentParser:
    """Register `batch` on the `conveyor` command's subparsers."""
    p = subparsers.add_parser(
        "batch", help="run an OpenAI/vLLM batch file (.jsonl), resumably",
        description="Run every request of an OpenAI Batch input file and append the "
        "results to --output as they finish.", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", "-i", required=True, type=Path, help="requests.jsonl")
    p.add_argument("--output", "-o", required=True, type=Path,
                   help="results.jsonl (appended to; re-run to resume)")
    add_engine_args(p)
    p.add_argument("--served-model-name", help="the name lines may give as `model` "
                   "(default: --model as given, or its last path part)")
    add_limit_args(p)
    p.add_argument("--embedding-model", help="model for /v1/embeddings lines "
                   "(default: all-MiniLM-L6-v2; loaded only if such a line appears)")
    d = p.add_argument_group("datasets (a prompt column instead of OpenAI batch lines)")
    d.add_argument("--input-format", choices=["openai", "jsonl", "parquet"], default="openai",
                   help="openai: OpenAI Batch lines (default); jsonl/parquet: rows with a "
                   "prompt column (and optionally custom_id), each a /v1/completions request")
    d.add_argument("--prompt-column", default="prompt", help="(default: %(default)s)")
    d.add_argument("--max-tokens", type=int, help="for dataset rows (default: the API's)")
    d.add_argument("--temperature", type=float, help="for dataset rows (default: the API's)")
    r = p.add_argument_group("Ray (pip install \"conveyor[ray]\")")
    r.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="answer the lines on a pool of engine actors on the Ray cluster at "
                   "ADDRESS (auto, the default: the one `ray start` started here or "
                   "RAY_ADDRESS names, else a local Ray)")
    r.add_argument("--ray-workers", type=int, default=2,
                   help="engine actors, each one GPU or --ray-cpus-per-worker CPUs "
                   "(default: %(default)s)")
    r.add_argument("--ray-cpus-per-worker", type=int, default=1,
                   help="CPUs of an actor on a CPU-only cluster (default: %(default)s)")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no progress bar and no summary")
    p.set_defaults(run=run_batch)
    return p


def run_batch(args: argparse.Namespace) -> int:
    """Run `conveyor batch`; 0 when the job ran, 2 when it could not."""
    from engine.entrypoints.batch.batch_job import run_batch_file

    try:
        engine_args = engine_kwargs(args)
        if args.ray is not None or args.input_format != "openai":
            summary = _run_on_ray(args, engine_args)
        else:
            summary = run_batch_file(
                args.input, args.output, model=args.model,
                embedding_model=args.embedding_model, served_model_name=args.served_model_name,
                max_num_seqs=engine_args.pop("max_num_seqs"), progress=not args.quiet,
                engine_args=engine_args, limits=serving_limits(args))
    except ConveyorError as exc:
        print(f"conveyor: error: {exc}", file=sys.stderr)
        return 2
    if summary.repaired_bytes:
        print(f"conveyor: dropped a torn last line ({summary.repaired_bytes} bytes) from "
              f"{args.output}; its request was run again", file=sys.stderr)
    if not args.quiet:
        print(f"conveyor: batch: {summary.describe()} -> {args.output}", file=sys.stderr)
    return 0


def _run_on_ray(args: argparse.Namespace, engine_args: dict):
    """The job on a Ray actor pool (a dataset input without --ray: a local Ray)."""
    from engine.entrypoints.ray.engine_worker import WorkerConfig
    from engine.entrypoints.ray.ray_batch import run_ray_batch

    config = WorkerConfig(model=args.model, embedding_model=args.embedding_model,
                          served_model_name=args.served_model_name,
                          max_num_seqs=engine_args.pop("max_num_seqs"), engine_args=engine_args,
                          limits=serving_limits(args))
    sampling = {k: v for k, v in (("max_tokens", args.max_tokens),
                                  ("temperature", args.temperature)) if v is not None}
    return run_ray_batch(args.input, args.output, config, address=args.ray or "auto",
                         workers=args.ray_workers, cpus_per_worker=args.ray_cpus_per_worker,
                         input_format=args.input_format, prompt_column=args.prompt_column,
                         sampling=sampling, progress=not args.quiet)


if __name__ == "__main__":
    import engine  # noqa: F401  (preloads the BLAS before mlx)

    parser = argparse.ArgumentParser(prog="conveyor")
    add_batch_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args()
    sys.exit(parsed.run(parsed))
