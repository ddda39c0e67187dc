"""`conveyor serve`: the OpenAI-compatible HTTP server (engine/server.py)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from engine.entrypoints.cli.common import add_engine_args, engine_kwargs
from engine.errors import ConveyorError

DEFAULT_EMBEDDING_NAME = "all-MiniLM-L6-v2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on the `conveyor` command's subparsers."""
    from engine.entrypoints.openai.server import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_WAITING

    p = subparsers.add_parser(
        "serve", help="serve the OpenAI API (completions, chat, embeddings) over HTTP",
        description="Serve /v1/completions, /v1/chat/completions, /v1/embeddings, "
        "/v1/models, /health, /metrics and /openapi.json. All clients share one "
        "continuous-batching engine.")
    add_engine_args(p)
    p.add_argument("--served-model-name", help="the name clients pass as `model` "
                   "(default: --model as given)")
    p.add_argument("--embedding-model", default="default",
                   help="encoder for /v1/embeddings: directory or repo id; 'default' is "
                   "all-MiniLM-L6-v2, 'none' serves no embeddings (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s; 0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--api-key", default=os.environ.get("CONVEYOR_API_KEY"),
                   help="require `Authorization: Bearer <key>` on /v1/* (default: "
                   "$CONVEYOR_API_KEY; the environment keeps it out of `ps`)")
    p.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                   help="refuse new requests (429) while this many wait for admission "
                   "(default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body (413 above it; default: %(default)s)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    return p


def _listen(host: str, port: int) -> socket.socket:
    # Bound here rather than by uvicorn so that a busy port is a one-line
    # user error, not uvicorn's exit.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConveyorError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from engine.entrypoints.async_llm import AsyncLLM
    from engine.entrypoints.openai.server import build_app

    engine_args = engine_kwargs(args)  # checks the engine flags before the port is taken
    for name in ("max_waiting", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ConveyorError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.port < 65536:
        raise ConveyorError(f"--port must be in [0, 65535], got {args.port}")
    sock = _listen(args.host, args.port)
    if not args.api_key and not _is_loopback(args.host):
        print(f"conveyor: warning: listening on {args.host} without --api-key: anyone who "
              "can reach this port can use the model", file=sys.stderr)
    llm = embedder = None
    try:
        if args.embedding_model.lower() != "none":
            from engine.entrypoints.openai.server import EmbeddingWorker

            chosen = None if args.embedding_model == "default" else args.embedding_model
            embedder = EmbeddingWorker.load(chosen, name=chosen or DEFAULT_EMBEDDING_NAME)
        llm = AsyncLLM(args.model, **engine_args)
        app = build_app(llm, embedder,
                        model_name=args.served_model_name or args.model or DEFAULT_MODEL_NAME,
                        embedding_model_name=embedder.name if embedder else None,
                        api_key=args.api_key,
                        max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes)
        host, port = sock.getsockname()[:2]
        print(f"conveyor: serving on http://{host}:{port}", file=sys.stderr, flush=True)
        config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if llm is not None:
            llm.close()
        if embedder is not None:
            embedder.close()
        sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conveyor")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_serve(args)
    except ConveyorError as exc:
        print(f"conveyor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
