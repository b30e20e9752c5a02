"""Recognising a full disk, whichever layer reports it (the OS or SQLite)."""

from __future__ import annotations

import errno
import sqlite3

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full_error(exc: BaseException) -> bool:
    """Whether this one exception (not its causes) says the disk or quota is full."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return False


def caused_by_full_disk(exc: BaseException) -> bool:
    """Whether ``exc`` or any exception that caused it says the disk is full."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if is_disk_full_error(current):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
