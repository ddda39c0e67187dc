"""`conveyor serve`: the OpenAI-compatible HTTP server (engine.entrypoints.openai.server)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from engine.entrypoints.cli.common import (
    add_engine_args,
    add_limit_args,
    engine_kwargs,
    serving_limits,
)
from engine.entrypoints.serving.limits import DEFAULT_MAX_WAITING
from engine.entrypoints.serving.models import DEFAULT_EMBEDDING_NAME, ModelNames
from engine.errors import ConveyorError


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on the `conveyor` command's subparsers."""
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
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host header name to accept besides localhost/127.0.0.1/::1 "
                   "(repeatable). A server on a loopback address refuses every other name "
                   "(403), so a web page cannot reach it through DNS rebinding; on another "
                   "address any name is accepted unless this is given")
    p.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                   help="refuse new requests (429) while this many wait for admission "
                   "(default: %(default)s)")
    add_limit_args(p)
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


def _allowed_hosts(host: str, extra: list[str]) -> list[str] | None:
    """Host header names to accept: loopback names (and `extra`) for a
    loopback server; for another address only `extra` when given, else any."""
    from engine.entrypoints.openai.transport import LOOPBACK_HOSTS

    if _is_loopback(host):
        return [*LOOPBACK_HOSTS, *extra]
    return [host, *LOOPBACK_HOSTS, *extra] if extra else None


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from engine.entrypoints.async_llm import AsyncLLM
    from engine.entrypoints.openai.server import build_app

    engine_args = engine_kwargs(args)  # checks the engine flags before the port is taken
    limits = serving_limits(args, max_waiting=args.max_waiting)
    if not 0 <= args.port < 65536:
        raise ConveyorError(f"--port must be in [0, 65535], got {args.port}")
    sock = _listen(args.host, args.port)
    allowed_hosts = _allowed_hosts(args.host, args.allowed_host)
    if not args.api_key and not _is_loopback(args.host):
        print(f"conveyor: warning: listening on {args.host} without --api-key: anyone who "
              "can reach this port can use the model", file=sys.stderr)
    llm = embedder = None
    try:
        embedding_names = None
        if args.embedding_model.lower() != "none":
            from engine.entrypoints.openai.embedding_worker import EmbeddingWorker

            chosen = None if args.embedding_model == "default" else args.embedding_model
            embedding_names = ModelNames.of(chosen, default=DEFAULT_EMBEDDING_NAME)
            embedder = EmbeddingWorker.load(chosen, name=embedding_names.label)
        llm = AsyncLLM(args.model, **engine_args)
        app = build_app(llm, embedder,
                        model_name=ModelNames.of(args.model, served=args.served_model_name),
                        embedding_model_name=embedding_names, api_key=args.api_key,
                        limits=limits, allowed_hosts=allowed_hosts)
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
