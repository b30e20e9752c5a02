"""Idle-connection flood: does a real sender still get in?

Holds ``--idle`` TCP connections from 127.0.0.2 open to the SCP without ever sending an
A-ASSOCIATE-RQ, re-opening each one the SCP closes, and meanwhile times ``--runs``
DCMTK storescu sendings of a small generated series from 127.0.0.1. Twice:

- ``pynetdicom``: pynetdicom's own server as the node ran it before the door (default
  ``maximum_associations``, idle sockets held until the ACSE timeout);
- ``door``: the node's receiver (``dicomnode/door.py``) with ``[node.connections]``.

Reports per mode: sendings that succeeded, their times, the process's threads and CPU
seconds during the flood, connections the SCP closed. Needs dcmtk.

The flood runs in a process of its own, as an attacker would, and each mode in a fresh
process. Run from the repository root:
``PYTHONPATH=. .venv/bin/python bench/door_flood.py [--idle 200] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import socket
import statistics
import subprocess
import sys
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
FLOOD_SECONDS = 12.0


def _free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Flood:
    """``size`` silent connections from ``FLOOD_HOST``, re-opened when closed.

    Runs in a process of its own (``--flood PORT``), as an attacker would.
    """

    def __init__(self, port: int, size: int) -> None:
        """Prepare the flood against loopback ``port``."""
        self.port, self.size = port, size
        self.opened = 0
        self.closed_by_scp = 0
        self.failed_connects = 0

    def _connect(self) -> socket.socket | None:
        """One silent connection, or ``None`` when the SCP does not take it."""
        try:
            sock = socket.create_connection(
                ("127.0.0.1", self.port), timeout=5, source_address=(FLOOD_HOST, 0)
            )
        except OSError:
            self.failed_connects += 1
            return None
        self.opened += 1
        return sock

    @staticmethod
    def _closed(sock: socket.socket | None) -> bool:
        """Whether the SCP has closed ``sock`` (or it never opened)."""
        if sock is None:
            return True
        try:
            return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def run(self, seconds: float) -> dict[str, int]:
        """Open them all, then replace the closed ones every 50 ms, for ``seconds``."""
        socks = [self._connect() for _ in range(self.size)]
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.05)
            for index, sock in enumerate(socks):
                if self._closed(sock):
                    if sock is not None:
                        sock.close()
                        self.closed_by_scp += 1
                    socks[index] = self._connect()
        for sock in socks:
            if sock is not None:
                sock.close()
        return {
            "opened": self.opened,
            "closed_by_scp": self.closed_by_scp,
            "failed_connects": self.failed_connects,
        }


def _send(port: int, folder: Path) -> tuple[bool, float]:
    """One storescu sending of ``folder``: success and seconds."""
    started = time.monotonic()
    done = subprocess.run(
        [STORESCU, "-aec", "DICOMNODE", "-to", "30", "+sd", "127.0.0.1", str(port), str(folder)],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    return done.returncode == 0, round(time.monotonic() - started, 3)


def _measure(port: int, folder: Path, idle: int, runs: int) -> dict[str, Any]:
    """Send ``runs`` times while a flood process holds ``idle`` connections."""
    flood = subprocess.Popen(
        [sys.executable, __file__, "--flood", str(port), "--idle", str(idle),
         "--seconds", str(FLOOD_SECONDS)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert flood.stdout is not None
    assert flood.stdout.readline().strip() == "ready"
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    results = []
    for _ in range(runs):
        results.append(_send(port, folder))
        time.sleep(0.5)
    threads = threading.active_count()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    flood_report = json.loads(flood.communicate(timeout=FLOOD_SECONDS + 60)[0])
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    times = [t for ok, t in results if ok]
    return {
        "stored": sum(ok for ok, _ in results),
        "runs": runs,
        "median_s": statistics.median(times) if times else None,
        "times_s": [t for _, t in results],
        "scp_threads_during_flood": threads,
        "scp_cpu_s_during_sendings": round(cpu, 2),
        "flood": flood_report,
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
    """The node with its door (default ``[node.connections]``)."""
    config = default_config(work / "door", _free_port())
    config.routes = []
    config.stable_age_s = 600
    config.allowed_callers.append(AllowedCaller(ae_title="STORESCU"))
    config.node.connections = AssociationLimits()

    def nothing(spec: JobSpec) -> list[Path]:
        """No pipeline: nothing is routed."""
        return []

    with Node(config, nothing):
        return {
            **_measure(config.node.port, folder, idle, runs),
            "limits": config.node.connections.model_dump(),
        }


def main() -> int:
    """Run both modes, each in a fresh process, and print a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--mode", choices=["pynetdicom", "door"], help=argparse.SUPPRESS)
    parser.add_argument("--flood", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=FLOOD_SECONDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood is not None:
        report = Flood(args.flood, args.idle).run(args.seconds)
        sys.stdout.write(json.dumps(report) + "\n")
        return 0
    if args.mode is None:
        common = ["--idle", str(args.idle), "--runs", str(args.runs), "--slices", str(args.slices)]
        summary: dict[str, Any] = {"idle_connections": args.idle}
        for mode in ("pynetdicom", "door"):
            done = subprocess.run(
                [sys.executable, __file__, "--mode", mode, *common],
                capture_output=True, text=True, timeout=600, check=True,
            )  # fmt: skip
            summary[mode] = json.loads(done.stdout)
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return 0
    configure_logging(logging.ERROR)  # JSON lines on stderr; closures are warnings
    work = Path(tempfile.mkdtemp(prefix="dicomnode-door-"))
    folder = work / "series"
    write_series(synthetic_head_ct(seed=3, n_slices=args.slices, rows=64), folder)
    measure = _baseline if args.mode == "pynetdicom" else _door
    sys.stdout.write(json.dumps(measure(work, folder, args.idle, args.runs)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
