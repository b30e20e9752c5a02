"""The door: idle floods never block senders, caps and called AE reject with reasons."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from pynetdicom import AE
from pynetdicom.association import Association as PynetAssociation

from dicomnode.config import AllowedCaller, NodeConfig, default_config
from dicomnode.door import (
    AssociationLimits,
    Connection,
    LogBudget,
    RejectDiagnostic,
    RejectResult,
    RejectSource,
    choose_evictions,
    limit_rejection,
)
from dicomnode.node import Node
from dicomnode.receiver import VERIFICATION_SOP_CLASS
from pipelines.synthetic import synthetic_head_ct, write_series
from tests.support import free_port, require_tool
from tests.test_receiver import copy_first

FLOOD_HOST = "127.0.0.2"  # Linux answers the whole of 127.0.0.0/8 on loopback
FLOOD_SIZE = 200
SERIES_SLICES = 4
CLOSED_EARLY = "connection closed without association request"


def _config(tmp_path: Path, **limits: Any) -> NodeConfig:
    """A node on a free loopback port, no routes, callers allowed from any host."""
    config = default_config(tmp_path, free_port())
    config.routes = []
    config.stable_age_s = 60.0
    config.allowed_callers = [
        AllowedCaller(ae_title=t) for t in ("STORESCU", "ECHOSCU", "PYNETDICOM")
    ]
    config.node.connections = AssociationLimits(**limits)
    return config


def _series(tmp_path: Path) -> Path:
    """A small generated head CT series on disk; its folder."""
    folder = tmp_path / "series"
    write_series(synthetic_head_ct(seed=3, n_slices=SERIES_SLICES, rows=64), folder)
    return folder


def _storescu(port: int, folder: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu sending a folder to the node (called AE ``DICOMNODE`` by default)."""
    tool = require_tool("storescu", "dcmtk")
    return subprocess.run(
        [tool, "-aec", "DICOMNODE", *options, "+sd", "127.0.0.1", str(port), str(folder)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _associate(port: int, host: str = "127.0.0.1", called: str = "DICOMNODE") -> PynetAssociation:
    """A pynetdicom Verification association to the node from local address ``host``."""
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title=called, bind_address=(host, 0))


def _rejection_fields(assoc: PynetAssociation) -> tuple[int, int, int]:
    """``(result, source, diagnostic)`` of the A-ASSOCIATE-RJ the association received."""
    primitive = assoc.acceptor.primitive
    assert assoc.is_rejected and primitive is not None
    return int(primitive.result), int(primitive.result_source), int(primitive.diagnostic)


class IdleFlood:
    """Holds ``size`` TCP connections from ``host`` that never send anything, re-opening
    each one the node closes, until stopped."""

    def __init__(self, port: int, host: str, size: int) -> None:
        """Prepare (not start) the flood against loopback ``port``."""
        self.port, self.host, self.size = port, host, size
        self.sockets: list[socket.socket] = []
        self.opened = 0
        self.closed_by_node = 0
        self.reopen = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idle-flood", daemon=True)

    def _connect(self) -> socket.socket:
        """One idle connection from ``host``."""
        sock = socket.create_connection(
            ("127.0.0.1", self.port), timeout=5, source_address=(self.host, 0)
        )
        self.opened += 1
        return sock

    def _run(self) -> None:
        """Open the connections, then replace every one the node has closed."""
        self.sockets = [self._connect() for _ in range(self.size)]
        while not self._stop.wait(0.05):
            for index, sock in enumerate(self.sockets):
                try:
                    data = sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
                except BlockingIOError:
                    continue  # still open, nothing sent: as the node should leave it
                except OSError:
                    data = b""
                if data == b"" and sock.fileno() != -1:
                    sock.close()
                    self.closed_by_node += 1
                    if self.reopen:
                        self.sockets[index] = self._connect()

    def start(self) -> None:
        """Start in the background and wait until every connection has been opened once."""
        self._thread.start()
        deadline = time.monotonic() + 20
        while self.opened < self.size and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.opened >= self.size

    def stop(self) -> None:
        """Stop re-opening and close every connection."""
        self._stop.set()
        self._thread.join(timeout=10)
        for sock in self.sockets:
            sock.close()


@contextmanager
def idle_flood(port: int, host: str, size: int) -> Iterator[IdleFlood]:
    """An :class:`IdleFlood` running for the duration of the block."""
    flood = IdleFlood(port, host, size)
    flood.start()
    try:
        yield flood
    finally:
        flood.stop()


def _by_event(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    """Captured log entries with message ``event``."""
    return [entry for entry in logs if entry["event"] == event]


def test_idle_flood_does_not_block_a_sender(tmp_path: Path) -> None:
    """200 silent connections, re-opened as the node closes them: storescu still stores
    a series within seconds, threads stay bounded, and every closure is logged."""
    config = _config(tmp_path, request_timeout_s=1.0, max_pending_connections=64)
    folder = _series(tmp_path)
    with structlog.testing.capture_logs() as logs, Node(config, copy_first) as node:
        port = config.node.port
        with idle_flood(port, FLOOD_HOST, FLOOD_SIZE) as flood:
            deadline = time.monotonic() + 15  # the flood at full strength: evictions began
            while time.monotonic() < deadline and not any(
                "max_pending_connections" in entry["reason"]
                for entry in _by_event(logs, CLOSED_EARLY)
            ):
                time.sleep(0.05)
            started = time.monotonic()
            done = _storescu(port, folder)
            elapsed = time.monotonic() - started
            threads = threading.active_count()  # the flood is at full strength here
            pending, _ = node._receiver.door.counts() if node._receiver else (0, 0)
            flood.reopen = False  # the last ones wait until the request time-out closes them
            time.sleep(1.5)
        assert done.returncode == 0, done.stderr
        assert elapsed < 5.0, f"storescu took {elapsed:.1f} s under the flood"
        assert node.store is not None
        (series,) = node.store.all_series()
        assert series.instance_count == SERIES_SLICES
        assert pending <= config.node.connections.max_pending_connections
        # one thread per waiting connection (pynetdicom alone: two or three per connection)
        assert threads < 2 * config.node.connections.max_pending_connections + 20
        assert flood.closed_by_node >= FLOOD_SIZE - config.node.connections.max_pending_connections
    closed = _by_event(logs, CLOSED_EARLY)
    assert {entry["peer_host"] for entry in closed} == {FLOOD_HOST}
    reasons = {entry["reason"].split(":")[0] for entry in closed}
    assert "closed without association request" in reasons
    assert any("max_pending_connections" in entry["reason"] for entry in closed)
    assert any("request_timeout_s" in entry["reason"] for entry in closed)
    assert all(isinstance(entry["peer_port"], int) for entry in closed)


def test_half_sent_request_is_closed_after_the_timeout(tmp_path: Path) -> None:
    """A peer that sends only the first bytes of an A-ASSOCIATE-RQ is cut off in time."""
    config = _config(tmp_path, request_timeout_s=0.5)
    with structlog.testing.capture_logs() as logs, Node(config, copy_first):
        sock = socket.create_connection(("127.0.0.1", config.node.port), timeout=5)
        sock.sendall(b"\x01\x00\x00\x00\x04\x00\x00\x01")  # PDU type 1, 1024 bytes announced
        started = time.monotonic()
        assert sock.recv(1) == b""  # the node closed it
        waited = time.monotonic() - started
        sock.close()
        assert _associate(config.node.port).is_established  # and still serves
    assert 0.4 < waited < 2.0
    (entry,) = _by_event(logs, CLOSED_EARLY)
    assert "request_timeout_s" in entry["reason"] and entry["peer_host"] == "127.0.0.1"


def _resident_bytes() -> int:
    """This process's resident memory (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_a_pdu_claiming_4_gib_reserves_nothing(tmp_path: Path) -> None:
    """A PDU header announcing 4 GiB followed by a few bytes: the node reads only what
    arrives (no buffer of the announced size), and keeps serving."""
    config = _config(tmp_path, request_timeout_s=5.0)
    with Node(config, copy_first):
        before = _resident_bytes()
        sock = socket.create_connection(("127.0.0.1", config.node.port), timeout=5)
        sock.sendall(b"\x01\x00\xff\xff\xff\xf0" + b"\x00" * 4096)  # 4 GiB announced
        time.sleep(1.0)  # the association's reader waits for the rest
        grown = _resident_bytes() - before
        sock.close()
        assert _associate(config.node.port).is_established
    assert grown < 64 << 20, f"resident memory grew by {grown} bytes"


def test_stopping_closes_waiting_connections(tmp_path: Path) -> None:
    """Stopping the node closes connections still waiting for a request, at once."""
    config = _config(tmp_path, request_timeout_s=30.0)
    with structlog.testing.capture_logs() as logs:
        with Node(config, copy_first):
            sock = socket.create_connection(("127.0.0.1", config.node.port), timeout=5)
            time.sleep(0.2)
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert time.monotonic() - started < 2.0
        sock.close()
        deadline = time.monotonic() + 5
        while not _by_event(logs, CLOSED_EARLY) and time.monotonic() < deadline:
            time.sleep(0.05)  # the connection's thread logs just after closing it
    (entry,) = _by_event(logs, CLOSED_EARLY)
    assert entry["reason"].endswith("the node is stopping")


def test_caps_reject_with_local_limit_and_the_node_keeps_serving(tmp_path: Path) -> None:
    """Per-host then total caps answer a transient "local limit exceeded"; released
    associations free their slots."""
    config = _config(tmp_path, max_associations=2, max_associations_per_host=1)
    local_limit = (
        RejectResult.TRANSIENT,
        RejectSource.SERVICE_PROVIDER_PRESENTATION,
        RejectDiagnostic.LOCAL_LIMIT_EXCEEDED,
    )
    with structlog.testing.capture_logs() as logs, Node(config, copy_first):
        port = config.node.port
        first = _associate(port, "127.0.0.1")
        assert first.is_established
        same_host = _associate(port, "127.0.0.1")
        assert _rejection_fields(same_host) == local_limit
        second = _associate(port, "127.0.0.2")
        assert second.is_established
        third = _associate(port, "127.0.0.3")
        assert _rejection_fields(third) == local_limit
        assert first.send_c_echo().Status == 0  # the established ones keep working
        first.release()
        second.release()
        time.sleep(0.2)
        again = _associate(port, "127.0.0.1")
        assert again.is_established
        again.release()
    rejected = _by_event(logs, "association rejected")
    assert [(e["peer_host"], e["result"]) for e in rejected] == [
        ("127.0.0.1", "transient"),
        ("127.0.0.3", "transient"),
    ]
    assert "max_associations_per_host" in rejected[0]["reason"]
    assert "(node.connections.max_associations)" in rejected[1]["reason"]
    assert all(e["reason"].startswith("local limit exceeded") for e in rejected)


def test_wrong_called_ae_title_is_rejected(tmp_path: Path) -> None:
    """An association to another AE title gets "called AE title not recognised"."""
    echoscu = require_tool("echoscu", "dcmtk")
    config = _config(tmp_path)
    with structlog.testing.capture_logs() as logs, Node(config, copy_first):
        port = str(config.node.port)
        refused = subprocess.run(
            [echoscu, "-aec", "ANY-SCP", "127.0.0.1", port],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert refused.returncode != 0
        assert "Called AE Title Not Recognized" in refused.stderr
        pynet = _associate(config.node.port, called="OTHERNODE")
        assert _rejection_fields(pynet) == (
            RejectResult.PERMANENT,
            RejectSource.SERVICE_USER,
            RejectDiagnostic.CALLED_AE_NOT_RECOGNISED,
        )
        accepted = subprocess.run(
            [echoscu, "-aec", "DICOMNODE", "127.0.0.1", port],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert accepted.returncode == 0, accepted.stderr
    rejected = _by_event(logs, "association rejected")
    assert [(e["called_aet"], e["reason"]) for e in rejected] == [
        ("ANY-SCP", "called AE title not recognised"),
        ("OTHERNODE", "called AE title not recognised"),
    ]
    assert all(e["peer_host"] == "127.0.0.1" for e in rejected)


def test_aborts_are_logged_with_peer_and_reason(tmp_path: Path) -> None:
    """A peer's A-ABORT and a connection cut mid-association are both logged."""
    config = _config(tmp_path)
    with structlog.testing.capture_logs() as logs, Node(config, copy_first):
        aborted = _associate(config.node.port)
        assert aborted.is_established
        aborted.abort()
        cut = _associate(config.node.port, "127.0.0.2")
        assert cut.is_established
        raw = cut.dul.socket.socket if cut.dul.socket is not None else None
        assert raw is not None
        socket.socket.shutdown(raw, socket.SHUT_RDWR)
        deadline = time.monotonic() + 5
        while len(_by_event(logs, "association aborted")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        again = _associate(config.node.port)
        assert again.is_established  # still serving
        again.release()
    entries = {e["peer_host"]: e["reason"] for e in _by_event(logs, "association aborted")}
    assert entries["127.0.0.1"] == "A-ABORT from the peer (service user)"
    assert entries["127.0.0.2"].startswith("A-P-ABORT: connection lost or protocol error")


def _pending(host: str, opened: float) -> Connection:
    """A pending connection record for the pure eviction rule."""
    return Connection(peer=(host, 1000), sock=socket.socket(), opened=opened)


def test_evictions_take_the_busiest_hosts_oldest_first() -> None:
    """Over the limit, the flooding host loses its oldest; a lone sender is kept."""
    flood = [_pending("10.0.0.9", float(t)) for t in range(5)]
    sender = _pending("10.0.0.1", 2.5)
    try:
        chosen = choose_evictions([*flood, sender], limit=3)
        assert chosen == flood[:3]
        assert choose_evictions([*flood, sender], limit=6) == []
    finally:
        for conn in [*flood, sender]:
            conn.sock.close()


@pytest.mark.parametrize(
    ("total", "host", "expected"),
    [(0, 0, None), (3, 1, None), (4, 0, "max_associations)"), (2, 2, "per_host)")],
)
def test_limit_rejection(total: int, host: int, expected: str | None) -> None:
    """The caps count open associations: total first, then the requesting host's."""
    limits = AssociationLimits(max_associations=4, max_associations_per_host=2)
    rejection = limit_rejection(total, host, limits)
    if expected is None:
        assert rejection is None
    else:
        assert rejection is not None and rejection.reason.endswith(expected)
        assert rejection.result is RejectResult.TRANSIENT


def test_per_host_cap_above_total_is_a_config_error() -> None:
    """A per-host cap larger than the total would be silently meaningless: refused."""
    with pytest.raises(ValueError, match="max_associations_per_host"):
        AssociationLimits(max_associations=2, max_associations_per_host=3)


def test_log_budget_drops_repeats_and_reports_them() -> None:
    """Over budget, lines are dropped per key; the next window's first line counts them."""
    now = [0.0]
    budget = LogBudget(per_window=2, window_s=10.0, clock=lambda: now[0])
    assert [budget.allow("flood") for _ in range(4)] == [
        (True, 0),
        (True, 0),
        (False, 0),
        (False, 0),
    ]
    assert budget.allow("sender") == (True, 0)  # another key has its own budget
    now[0] = 10.0
    assert budget.allow("flood") == (True, 2)
    assert budget.allow("flood") == (True, 0)
