"""The Redis URL of `conveyor worker`, kept out of `ps` and out of messages.

A password on the command line is visible to every user of the machine
(`ps`, /proc/PID/cmdline), so a URL that carries one is taken only from the
environment ($CONVEYOR_REDIS_URL) or a file (--redis-url-file); every
message that names the server shows the URL with its password masked and
has any copy of the password scrubbed."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from engine.errors import ConveyorError

ENV_VAR = "CONVEYOR_REDIS_URL"
DEFAULT_URL = "redis://127.0.0.1:6379/0"


def password_of(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def redact(url: str) -> str:
    """`url` with its password (if any) replaced by ***."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
    except ValueError:
        return "<the Redis URL>"


def scrub(message: str, url: str) -> str:
    """`message` with the URL redacted and any copy of its password masked."""
    message = message.replace(url, redact(url))
    secret = password_of(url)
    return message.replace(secret, "***") if secret else message


def resolve(argv_url: str | None, url_file: Path | None,
            environ: dict[str, str] | None = None) -> str:
    """The URL to use: --redis (refused if it holds a password), else the
    file, else $CONVEYOR_REDIS_URL, else the local default."""
    environ = os.environ if environ is None else environ
    if argv_url is not None and url_file is not None:
        raise ConveyorError("give --redis or --redis-url-file, not both")
    if argv_url is not None:
        if password_of(argv_url):
            raise ConveyorError(f"--redis {redact(argv_url)} carries a password, which `ps` "
                                f"shows to every user; put the URL in ${ENV_VAR} or in a "
                                "file named by --redis-url-file")
        return argv_url
    if url_file is not None:
        try:
            lines = url_file.read_text().split()
        except OSError as exc:
            raise ConveyorError(f"cannot read --redis-url-file {url_file}: "
                                f"{exc.strerror}") from None
        if not lines:
            raise ConveyorError(f"--redis-url-file {url_file} is empty")
        return lines[0]
    return environ.get(ENV_VAR) or DEFAULT_URL
