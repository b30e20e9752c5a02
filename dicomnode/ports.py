"""Free loopback ports for the demo, the tests and the benches.

The kernel picks a port for ``bind(("127.0.0.1", 0))`` and takes it back at ``close``, so
two calls in a row may get the same number: a node given that number for its DICOM and
its HTTP port then fails to start, and a client polling one of them reaches the other
server. :func:`free_port` never hands out a number twice in one process.
"""

from __future__ import annotations

import socket
import threading

_handed_out: set[int] = set()
_lock = threading.Lock()


def free_port() -> int:
    """A TCP port free on loopback now, and not one this process was given before."""
    with _lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
