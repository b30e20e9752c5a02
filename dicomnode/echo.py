"""C-ECHO SCU: is a peer's Application Entity reachable and answering?"""

from __future__ import annotations

from pynetdicom import AE

from dicomnode.receiver import VERIFICATION_SOP_CLASS
from dicomnode.status import Status


def echo(host: str, port: int, ae_title: str, calling_aet: str, timeout_s: float = 10.0) -> bool:
    """Open an association to ``ae_title`` at ``host:port`` and return whether C-ECHO
    succeeded."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    return bool(response) and response.get("Status") == Status.SUCCESS
