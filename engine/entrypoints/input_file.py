"""Opening a user's input file, with the errors a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from engine.errors import ConveyorError


def open_input(path: Path) -> BinaryIO:
    """`path` opened for binary reading; a missing file, a directory or an
    unreadable file is a one-line ConveyorError naming it."""
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise ConveyorError(f"input file not found: {path}") from None
    except IsADirectoryError:
        raise ConveyorError(f"input is a directory, not a file: {path}") from None
    except OSError as exc:
        raise ConveyorError(f"cannot read {path}: {exc.strerror}") from None
