"""C-ECHO SCU: is a peer's Application Entity reachable and answering, and if not, why?"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.association import Association

from dicomnode.receiver import VERIFICATION_SOP_CLASS
from dicomnode.status import Status


@dataclass(frozen=True)
class EchoResult:
    """The outcome of one C-ECHO: ``ok``, or ``reason`` in words an admin can act on."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        """True when the peer answered Success."""
        return self.ok


def _not_established(assoc: Association, where: str, called: str, calling: str) -> str:
    """Why no association came up: the peer's rejection (result, source, reason), an
    abort, or nothing listening / no answer in time."""
    if assoc.is_rejected:
        rejection = assoc.acceptor.primitive
        detail = (
            f"{rejection.result_str}, {rejection.source_str}: {rejection.reason_str}"
            if rejection is not None
            else "no reason given"
        )
        return (
            f"{where} rejected the association ({detail}); check that {called!r} is its AE "
            f"title and that it allows calling AE {calling!r} from this host"
        )
    if assoc.is_aborted:
        return f"{where} aborted the association (it may require TLS or refuse this host)"
    return f"no association with {where}: no answer to the association request in time"


def _unreachable(host: str, port: int, timeout_s: float) -> str | None:
    """Why a TCP connection to ``host:port`` cannot be made, or ``None`` when it can."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except ConnectionRefusedError:
        return "nothing listens there (connection refused)"
    except TimeoutError:
        return f"no TCP answer within {timeout_s:g} s (host down or a firewall)"
    except OSError as exc:
        return f"cannot connect ({exc.strerror or exc})"


def echo(
    host: str, port: int, ae_title: str, calling_aet: str, timeout_s: float = 10.0
) -> EchoResult:
    """Open an association to ``ae_title`` at ``host:port`` as ``calling_aet`` and send
    C-ECHO; the result says why when it did not succeed."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    where = f"{ae_title}@{host}:{port}"
    unreachable = _unreachable(host, port, timeout_s)
    if unreachable is not None:
        return EchoResult(False, f"no association with {where}: {unreachable}")
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        return EchoResult(False, _not_established(assoc, where, ae_title, calling_aet))
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    if not response or "Status" not in response:
        return EchoResult(False, f"{where} accepted the association but sent no C-ECHO response")
    status = int(response.Status)
    if status != Status.SUCCESS:
        return EchoResult(False, f"{where} answered C-ECHO with status 0x{status:04X}")
    return EchoResult(True, "success")
