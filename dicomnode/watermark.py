"""The free-space watermark: refuse new data before the spool or state disk is full.

Below ``limits.min_free_bytes`` free on the file system of ``spool_dir`` or ``state_dir``
new associations are rejected (A-ASSOCIATE-RJ, transient, "local limit exceeded") and a
C-STORE on an open association is answered ``0xA700`` (Out of Resources); below
``limits.warn_free_bytes`` ``/health`` says "degraded".
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from dicomnode.door import RejectDiagnostic, Rejection, RejectResult, RejectSource

LOW_SPACE_REASON = "free space below limits.min_free_bytes ({minimum}): {free} bytes free"


def free_bytes(path: Path) -> int:
    """Bytes available to unprivileged writers on the file system holding ``path``
    (its nearest existing parent when it does not exist yet)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    stats = os.statvfs(existing)
    return int(stats.f_bavail * stats.f_frsize)


def lowest_free_bytes(paths: Iterable[Path]) -> int:
    """The least free space among the file systems of ``paths``."""
    return min(free_bytes(path) for path in paths)


def low_space_reason(free: int, minimum: int) -> str | None:
    """Why new data is refused at ``free`` bytes free, or ``None`` when there is room."""
    if free >= minimum:
        return None
    return LOW_SPACE_REASON.format(free=free, minimum=minimum)


def space_rejection(free: int, minimum: int) -> Rejection | None:
    """The A-ASSOCIATE-RJ (transient, local limit exceeded) for too little free space."""
    reason = low_space_reason(free, minimum)
    if reason is None:
        return None
    return Rejection(
        RejectResult.TRANSIENT,
        RejectSource.SERVICE_PROVIDER_PRESENTATION,
        RejectDiagnostic.LOCAL_LIMIT_EXCEEDED,
        f"local limit exceeded: {reason}",
    )
