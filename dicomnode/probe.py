"""C-ECHO probe of a destination (plain or TLS): does its Application Entity answer?"""

from __future__ import annotations

from pynetdicom import AE

from dicomnode.config import Destination
from dicomnode.receiver import VERIFICATION_SOP_CLASS
from dicomnode.status import Status
from dicomnode.tls import client_context


def probe_destination(destination: Destination, calling_aet: str, timeout_s: float) -> bool:
    """Whether ``destination`` accepts an association from ``calling_aet`` and answers
    C-ECHO with Success, over TLS when the destination has a ``tls`` section."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    tls = destination.tls
    tls_args = (
        None if tls is None else (client_context(tls), tls.server_hostname or destination.host)
    )
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
    )
    if not assoc.is_established:
        return False
    try:
        response = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    return bool(response) and response.get("Status") == Status.SUCCESS
