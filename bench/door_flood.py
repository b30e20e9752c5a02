"""Idle-connection flood: does a real sender still get in?

Holds ``--idle`` TCP connections from 127.0.0.2 open to the SCP without ever sending an
A-ASSOCIATE-RQ, re-opening each one the SCP closes, and meanwhile times ``--runs``
DCMTK storescu sendings of a small generated series from 127.0.0.1. Twice:

- ``pynetdicom``: pynetdicom's own server as the node ran it before the door (default
  ``maximum_associations``, idle sockets held until the ACSE timeout);
- ``door``: the node's receiver (``dicomnode/door.py``) with ``[node.limits]``.

Reports per mode: sendings that succeeded, their times, the process's threads and CPU
seconds during the flood, connections the SCP closed. Needs dcmtk.

Run: ``.venv/bin/python bench/door_flood.py [--idle 200] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom.events import Event

from dicomnode.config import AllowedCaller, default_config
from dicomnode.door import AssociationLimits
from dicomnode.logs import configure_logging
from dicomnode.node import JobSpec, Node
from dicomnode.receiver import Receiver
from dicomnode.state import StateStore
from dicomnode.status import Status
from pipelines.synthetic import synthetic_head_ct, write_series

STORESCU = "/usr/bin/storescu"
FLOOD_HOST = "127.0.0.2"


def _free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Flood:
    """``size`` silent connections from ``FLOOD_HOST``, re-opened when closed."""

    def __init__(self, port: int, size: int) -> None:
        """Prepare the flood against loopback ``port``."""
        self.port, self.size = port, size
        self.closed_by_scp = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def _connect(self) -> socket.socket:
        """One silent connection."""
        return socket.create_connection(
            ("127.0.0.1", self.port), timeout=5, source_address=(FLOOD_HOST, 0)
        )

    def _run(self) -> None:
        """Open them all, then replace the closed ones every 50 ms."""
        socks = [self._connect() for _ in range(self.size)]
        self._ready.set()
        while not self._stop.wait(0.05):
            for index, sock in enumerate(socks):
                try:
                    if sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) != b"":
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                sock.close()
                self.closed_by_scp += 1
                socks[index] = self._connect()
        for sock in socks:
            sock.close()

    def __enter__(self) -> Flood:
        """Start and wait until every connection is open."""
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop and close everything."""
        self._stop.set()
        self._thread.join(10)


def _send(port: int, folder: Path) -> tuple[bool, float]:
    """One storescu sending of ``folder``: success and seconds."""
    started = time.monotonic()
    done = subprocess.run(
        [STORESCU, "-aec", "DICOMNODE", "-to", "30", "+sd", "127.0.0.1", str(port), str(folder)],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    return done.returncode == 0, round(time.monotonic() - started, 3)


def _measure(port: int, folder: Path, idle: int, runs: int) -> dict[str, Any]:
    """Send ``runs`` times under a flood of ``idle`` connections."""
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    with Flood(port, idle) as flood:
        results = [_send(port, folder) for _ in range(runs)]
        threads = threading.active_count()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    times = [t for ok, t in results if ok]
    return {
        "stored": sum(ok for ok, _ in results),
        "runs": runs,
        "median_s": statistics.median(times) if times else None,
        "times_s": [t for _, t in results],
        "threads_during_flood": threads,
        "cpu_s": round(cpu, 2),
        "closed_by_scp": flood.closed_by_scp,
    }


def _baseline(work: Path, folder: Path, idle: int, runs: int) -> dict[str, Any]:
    """pynetdicom's own server with the node's AE and a C-STORE that answers Success."""
    config = default_config(work / "baseline", _free_port())
    store = StateStore(work / "baseline.sqlite")
    ae = Receiver(config, store).build_ae()
    success: Callable[[Event], int] = lambda _event: int(Status.SUCCESS)  # noqa: E731
    server = ae.start_server(
        ("127.0.0.1", config.node.port), block=False, evt_handlers=[(evt.EVT_C_STORE, success)]
    )
    assert server is not None
    try:
        return _measure(config.node.port, folder, idle, runs)
    finally:
        server.shutdown()
        store.close()


def _door(work: Path, folder: Path, idle: int, runs: int) -> dict[str, Any]:
    """The node with its door (default ``[node.limits]``)."""
    config = default_config(work / "door", _free_port())
    config.routes = []
    config.stable_age_s = 600
    config.allowed_callers.append(AllowedCaller(ae_title="STORESCU"))
    config.node.limits = AssociationLimits()

    def nothing(spec: JobSpec) -> list[Path]:
        """No pipeline: nothing is routed."""
        return []

    with Node(config, nothing):
        return {
            **_measure(config.node.port, folder, idle, runs),
            "limits": config.node.limits.model_dump(),
        }


def main() -> int:
    """Run both modes and print a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=4)
    args = parser.parse_args()
    configure_logging(logging.WARNING)  # JSON lines on stderr
    work = Path(tempfile.mkdtemp(prefix="dicomnode-door-"))
    folder = work / "series"
    write_series(synthetic_head_ct(seed=3, n_slices=args.slices, rows=64), folder)
    summary = {
        "idle_connections": args.idle,
        "pynetdicom": _baseline(work, folder, args.idle, args.runs),
        "door": _door(work, folder, args.idle, args.runs),
    }
    print(json.dumps(summary, indent=2))  # noqa: T201 - a benchmark's report
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
