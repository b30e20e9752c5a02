"""Start-up checks whose failures an admin must read as one line, not a traceback."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class StartupError(Exception):
    """The node cannot start; the message says what to fix, in one line."""


def check_writable_dir(path: Path, what: str) -> None:
    """Create ``path`` if needed and prove a file can be written, fsynced and removed there.

    Raises :class:`StartupError` naming ``what`` (e.g. ``"spool_dir"``), the folder and
    the operating system's reason.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path, prefix=".write-check-")
        try:
            os.write(fd, b"dicomnode")
            os.fsync(fd)
        finally:
            os.close(fd)
            Path(name).unlink(missing_ok=True)
    except OSError as exc:
        raise StartupError(f"{what} {path} is not writable: {exc.strerror or exc}") from None


def listen_error(service: str, host: str, port: int, exc: OSError) -> StartupError:
    """The one-line error for a listening socket that cannot be opened."""
    return StartupError(f"cannot listen for {service} on {host}:{port}: {exc.strerror or exc}")
