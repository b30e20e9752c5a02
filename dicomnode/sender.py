"""Storage SCU: send files to one destination over one association."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydicom import uid
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom.presentation import PresentationContext, build_context

from dicomnode import phi
from dicomnode.config import Destination
from dicomnode.tls import client_context

log = structlog.get_logger(__name__)

MAX_CONTEXTS = 128


@dataclass(frozen=True)
class SendResult:
    """The outcome for one file: the peer's status, or why no status came back."""

    status: int | None
    error: str | None


def _contexts(metas: dict[Path, tuple[str, str]]) -> list[PresentationContext]:
    """One context per SOP class, offering each file's own syntax plus the uncompressed."""
    syntaxes: dict[str, list[str]] = {}
    for sop_class, syntax in metas.values():
        offered = syntaxes.setdefault(sop_class, [])
        for candidate in (syntax, uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian):
            if candidate not in offered:
                offered.append(candidate)
    return [build_context(sop_class, offered) for sop_class, offered in syntaxes.items()]


def send_files(
    destination: Destination, files: Sequence[Path], calling_aet: str, timeout_s: float = 30.0
) -> dict[Path, SendResult]:
    """C-STORE ``files`` to ``destination`` in one association; a result per file."""
    results: dict[Path, SendResult] = {}
    metas: dict[Path, tuple[str, str]] = {}
    for path in files:
        try:
            meta = read_file_meta_info(path)
            metas[path] = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        except (OSError, InvalidDicomError, AttributeError) as exc:
            results[path] = SendResult(None, f"cannot read file meta: {exc}")
    if not metas:
        return results
    phi.remember_files(metas)  # after a restart this process may not have seen them yet
    contexts = _contexts(metas)
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} SOP classes exceed {MAX_CONTEXTS} contexts")
    ae = AE(ae_title=calling_aet)
    ae.requested_contexts = contexts
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    tls = destination.tls
    tls_args = (
        None if tls is None else (client_context(tls), tls.server_hostname or destination.host)
    )
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
    )
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "not established (refused or aborted)"
        over = " over TLS" if tls is not None else ""
        error = (
            f"association {why}{over}: {destination.ae_title}@{destination.host}:{destination.port}"
        )
        results.update((path, SendResult(None, error)) for path in metas)
        return results
    try:
        for path in metas:
            if not assoc.is_established:
                results[path] = SendResult(None, "association lost before sending")
                continue
            response = assoc.send_c_store(path)
            status = response.get("Status") if response else None
            if status is None:
                results[path] = SendResult(None, "no response (timeout or abort)")
            else:
                results[path] = SendResult(int(status), None)
    finally:
        if assoc.is_established:
            assoc.release()
    return results
