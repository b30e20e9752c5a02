"""Association policy at the door: connection and association limits, idle connections.

pynetdicom counts every accepted TCP connection against ``AE.maximum_associations``,
even one that never sends an A-ASSOCIATE-RQ, and keeps it (two threads) until its ACSE
timeout: a handful of silent sockets then refuses every real sender. Here:

- a *pending* connection (accepted, TLS handshake and A-ASSOCIATE-RQ not yet done) is
  closed after ``request_timeout_s``; at most ``max_pending_connections`` are kept, and a
  newcomer beyond that closes the oldest pending connection of the host holding the most,
  so one flooding host evicts its own sockets first;
- only associations that were *requested* count against ``max_associations`` and
  ``max_associations_per_host``; beyond them the request gets an A-ASSOCIATE-RJ
  "local limit exceeded" (transient: the sender retries later);
- a pending connection holds one thread blocked in ``poll`` (no CPU): the association
  and its DUL thread start only once its request begins to arrive;
- TLS handshakes run in the connection's own thread, never in the accepting one;
- every refusal, eviction, time-out and abort is logged with the peer's address.

The decisions are pure functions (:func:`choose_evictions`, :func:`limit_rejection`);
:class:`Door` keeps the registry; :class:`GuardedAssociationServer` wires them into
pynetdicom's server.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

log = structlog.get_logger(__name__)

Peer = tuple[str, int]


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ Result field (PS3.8 9.3.4)."""

    PERMANENT = 0x01
    TRANSIENT = 0x02


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ Source field (PS3.8 9.3.4)."""

    SERVICE_USER = 0x01
    SERVICE_PROVIDER_ACSE = 0x02
    SERVICE_PROVIDER_PRESENTATION = 0x03


class RejectDiagnostic(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. field; its meaning depends on the source."""

    NO_REASON = 0x01  # source SERVICE_USER
    CALLING_AE_NOT_RECOGNISED = 0x03  # source SERVICE_USER
    CALLED_AE_NOT_RECOGNISED = 0x07  # source SERVICE_USER
    LOCAL_LIMIT_EXCEEDED = 0x02  # source SERVICE_PROVIDER_PRESENTATION


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ to send, and the reason an administrator reads in the log."""

    result: RejectResult
    source: RejectSource
    diagnostic: RejectDiagnostic
    reason: str


CALLED_AE_NOT_RECOGNISED = Rejection(
    RejectResult.PERMANENT,
    RejectSource.SERVICE_USER,
    RejectDiagnostic.CALLED_AE_NOT_RECOGNISED,
    "called AE title not recognised",
)
CALLING_AE_NOT_RECOGNISED = Rejection(
    RejectResult.PERMANENT,
    RejectSource.SERVICE_USER,
    RejectDiagnostic.CALLING_AE_NOT_RECOGNISED,
    "calling AE title not recognised from this host",
)
TOTAL_LIMIT_REASON = (
    "local limit exceeded: {n} associations open (node.connections.max_associations)"
)
HOST_LIMIT_REASON = (
    "local limit exceeded: {n} associations open from this host "
    "(node.connections.max_associations_per_host)"
)
EVICTED_REASON = (
    "closed without association request: {n} connections were waiting for one "
    "(node.connections.max_pending_connections); the oldest of the busiest host was closed"
)
TIMEOUT_REASON = (
    "closed without association request: none within {s:g} s (node.connections.request_timeout_s)"
)
PEER_CLOSED_REASON = "closed by the peer before any association request"
WAIT_MARGIN_MS = 1000  # the reaper closes a silent connection first; this is a backstop
TLS_FAILED_REASON = "TLS handshake failed: {why}"
ABORT_PRIMITIVES = (A_ABORT, A_P_ABORT)
LOCAL_ABORT_REASON = "aborted by the node (time-out or local error)"
ABORT_SOURCES = {0x00: "the peer (service user)", 0x02: "the peer's DICOM stack (service provider)"}
PROVIDER_ABORT_REASONS = {
    0x00: "reason not specified",
    0x01: "unrecognised PDU",
    0x02: "unexpected PDU",
    0x04: "unrecognised PDU parameter",
    0x05: "unexpected PDU parameter",
    0x06: "invalid PDU parameter value",
}
SHUTDOWN_REASON = "closed without association request: the node is stopping"


class AssociationLimits(BaseModel):
    """``[node.connections]``: how many associations and waiting connections the node holds."""

    model_config = ConfigDict(extra="forbid")

    max_associations: int = Field(default=32, ge=1, le=1024)
    max_associations_per_host: int = Field(default=16, ge=1, le=1024)
    max_pending_connections: int = Field(default=64, ge=1, le=4096)
    request_timeout_s: float = Field(default=5.0, gt=0, le=300)

    @model_validator(mode="after")
    def _per_host_within_total(self) -> AssociationLimits:
        """A per-host cap above the total cap would never apply."""
        if self.max_associations_per_host > self.max_associations:
            raise ValueError("max_associations_per_host must not exceed max_associations")
        return self


@dataclass
class Connection:
    """One accepted TCP connection and what became of it."""

    peer: Peer
    sock: socket.socket
    opened: float
    association: Association | None = None
    requested: bool = False
    abort_reason: str | None = None  # why it was aborted, when an A-(P-)ABORT came in
    counted: bool = False  # an accepted request that holds an association slot
    close_reason: str | None = None


def _waiting(conn: Connection) -> bool:
    """Whether a connection still waits for its A-ASSOCIATE-RQ and is not being closed."""
    return not conn.requested and conn.close_reason is None


def describe_abort(primitive: object) -> str:
    """An A-ABORT or A-P-ABORT primitive in words (PS3.8 9.3.8 and 7.4)."""
    if isinstance(primitive, A_P_ABORT):
        reason = PROVIDER_ABORT_REASONS.get(primitive.provider_reason or 0, "reason not given")
        return f"A-P-ABORT: connection lost or protocol error ({reason})"
    if isinstance(primitive, A_ABORT):
        source = ABORT_SOURCES.get(primitive.abort_source or 0, "unknown source")
        return f"A-ABORT from {source}"
    return LOCAL_ABORT_REASON


def choose_evictions(pending: Sequence[Connection], limit: int) -> list[Connection]:
    """The pending connections to close so that at most ``limit`` remain.

    Each is the oldest of the host then holding the most pending connections (ties: the
    host whose oldest connection is oldest), so a flooding host loses its own first.
    """
    by_host: dict[str, list[Connection]] = {}
    for conn in sorted(pending, key=lambda c: c.opened):
        by_host.setdefault(conn.peer[0], []).append(conn)
    chosen: list[Connection] = []
    for _ in range(max(0, len(pending) - limit)):
        host = max(by_host, key=lambda h: (len(by_host[h]), -by_host[h][0].opened))
        chosen.append(by_host[host].pop(0))
        if not by_host[host]:
            del by_host[host]
    return chosen


def limit_rejection(
    open_total: int, open_for_host: int, limits: AssociationLimits
) -> Rejection | None:
    """A "local limit exceeded" rejection when one more association would pass a cap."""
    if open_total >= limits.max_associations:
        reason = TOTAL_LIMIT_REASON.format(n=open_total)
    elif open_for_host >= limits.max_associations_per_host:
        reason = HOST_LIMIT_REASON.format(n=open_for_host)
    else:
        return None
    return Rejection(
        RejectResult.TRANSIENT,
        RejectSource.SERVICE_PROVIDER_PRESENTATION,
        RejectDiagnostic.LOCAL_LIMIT_EXCEEDED,
        reason,
    )


def hard_close(sock: socket.socket) -> None:
    """Shut a connection down at the TCP level, waking any thread blocked on it.

    ``socket.socket.shutdown`` is called on the plain socket layer so that a TLS socket
    is cut without a TLS close-notify exchange with a peer that may never answer.
    """
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError as exc:  # already closed by its own thread or by the peer
        log.debug("connection already closed", error=exc.strerror)


class Door:
    """Thread-safe registry of the SCP's connections, applying :class:`AssociationLimits`."""

    def __init__(
        self, limits: AssociationLimits, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Apply ``limits``; ``clock`` gives the time in seconds (monotonic)."""
        self.limits = limits
        self.clock = clock
        self._lock = threading.Lock()
        self._connections: dict[int, Connection] = {}  # by id() of the accepted socket

    def opened(self, sock: socket.socket, peer: Peer) -> list[Connection]:
        """Register an accepted connection; return pending ones to close (already marked)."""
        with self._lock:
            self._connections[id(sock)] = Connection(peer, sock, self.clock())
            pending = [c for c in self._connections.values() if _waiting(c)]
            victims = choose_evictions(pending, self.limits.max_pending_connections)
            for victim in victims:
                victim.close_reason = EVICTED_REASON.format(n=len(pending))
            return victims

    def attach(self, sock: socket.socket, association: Association) -> None:
        """Remember the association serving ``sock`` (to find it, and wake it when closing)."""
        with self._lock:
            conn = self._connections.get(id(sock))
            if conn is not None:
                conn.association = association
                if conn.close_reason is not None:  # closed before its thread got here
                    association.dul.to_user_queue.put(None)

    def request(self, association: Association, refusal: Rejection | None) -> Rejection | None:
        """An A-ASSOCIATE-RQ arrived: return the rejection to send, or ``None`` to go on.

        ``refusal`` is a rejection already decided by the caller (AE titles); otherwise
        the association caps decide, counting only requested, accepted associations.
        """
        with self._lock:
            conn = next(
                (c for c in self._connections.values() if c.association is association), None
            )
            if conn is None:
                return refusal
            conn.requested = True
            if refusal is not None:
                return refusal
            counted = [c for c in self._connections.values() if c.counted]
            same_host = sum(1 for c in counted if c.peer[0] == conn.peer[0])
            rejection = limit_rejection(len(counted), same_host, self.limits)
            conn.counted = rejection is None
            return rejection

    def note_abort(self, association: Association, primitive: object) -> None:
        """Keep why ``association`` is being aborted, from its A-ABORT or A-P-ABORT."""
        reason = describe_abort(primitive)
        with self._lock:
            for conn in self._connections.values():
                if conn.association is association:
                    conn.abort_reason = reason

    def abort_reason(self, association: Association) -> str:
        """Why ``association`` was aborted, as far as is known."""
        with self._lock:
            for conn in self._connections.values():
                if conn.association is association and conn.abort_reason is not None:
                    return conn.abort_reason
        return LOCAL_ABORT_REASON

    def closed(self, sock: socket.socket, reason: str | None = None) -> Connection | None:
        """Forget ``sock``'s connection; ``reason`` explains a close not marked before."""
        with self._lock:
            conn = self._connections.pop(id(sock), None)
            if conn is not None and conn.close_reason is None:
                conn.close_reason = reason
            return conn

    def expired(self) -> list[Connection]:
        """Mark and return pending connections older than the request time-out."""
        deadline = self.clock() - self.limits.request_timeout_s
        reason = TIMEOUT_REASON.format(s=self.limits.request_timeout_s)
        with self._lock:
            late = [c for c in self._connections.values() if _waiting(c) and c.opened <= deadline]
            for conn in late:
                conn.close_reason = reason
            return late

    def close_all_pending(self, reason: str) -> list[Connection]:
        """Mark every connection still waiting for its request as closing; return them."""
        with self._lock:
            waiting = [c for c in self._connections.values() if _waiting(c)]
            for conn in waiting:
                conn.close_reason = reason
            return waiting

    def counts(self) -> tuple[int, int]:
        """``(pending connections not being closed, associations holding a slot)``."""
        with self._lock:
            conns = list(self._connections.values())
        return sum(1 for c in conns if _waiting(c)), sum(1 for c in conns if c.counted)


def close_pending(conn: Connection) -> None:
    """Close a pending connection and wake its association thread, if it has one.

    The association reactor waits on its DUL's ``to_user_queue`` for the A-ASSOCIATE-RQ;
    a ``None`` there is how pynetdicom itself reports that none came, so it stops at once
    instead of holding its threads until its ACSE timeout.
    """
    hard_close(conn.sock)
    if conn.association is not None:
        conn.association.dul.to_user_queue.put(None)


def _peer(address: Any) -> Peer:
    """``(host, port)`` of a client address (IPv6 addresses carry two more fields)."""
    return str(address[0]), int(address[1])


class LogBudget:
    """At most ``per_window`` log lines per key and window; the rest are counted.

    A flood must not turn into a log flood: a line over budget is dropped, and how many
    were dropped is reported on the key's first line of a later window.
    """

    MAX_KEYS = 1024

    def __init__(
        self,
        per_window: int = 20,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Allow ``per_window`` lines per key every ``window_s`` seconds of ``clock``."""
        self.per_window = per_window
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, list[float]] = {}  # key -> [window start, lines, dropped]

    def allow(self, key: str) -> tuple[bool, int]:
        """Whether to log a line for ``key`` now, and how many were dropped before it."""
        now = self.clock()
        with self._lock:
            if len(self._state) > self.MAX_KEYS:
                self._state = {k: v for k, v in self._state.items() if now - v[0] < self.window_s}
            state = self._state.setdefault(key, [now, 0, 0])
            carried = 0
            if now - state[0] >= self.window_s:
                carried = int(state[2])
                state[:] = [now, 0, 0]
            state[1] += 1
            if state[1] > self.per_window:
                state[2] += 1
                return False, 0
            return True, carried


def _reason_kind(reason: str) -> str:
    """A reason with its numbers blanked: lines differing only in counts are one kind."""
    return re.sub(r"\d+(\.\d+)?", "#", reason)


def _log_closed(conn: Connection, budget: LogBudget) -> None:
    """Log a connection that ended without an association request, with its reason."""
    reason = conn.close_reason or PEER_CLOSED_REASON
    allowed, dropped = budget.allow(f"{conn.peer[0]} {_reason_kind(reason)}")
    if not allowed:
        return
    log.warning(
        "connection closed without association request",
        peer_host=conn.peer[0],
        peer_port=conn.peer[1],
        reason=reason,
        open_s=round(time.monotonic() - conn.opened, 3),
        **({"similar_lines_dropped": dropped} if dropped else {}),
    )


READ_STEP = 1 << 20  # most bytes asked of the kernel per read of a PDU


class BulkReadSocket(AssociationSocket):
    """pynetdicom's association socket, reading what it asks for in as few system calls
    as the kernel allows (pynetdicom reads 4 KiB per ``recv`` and appends each piece:
    about 130 calls and copies for a 512 x 512 CT slice). Memory grows only with the
    bytes that arrive, as before: a PDU header claiming 4 GiB reserves nothing."""

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` from the socket; fewer only if the peer closed it."""
        assert self.socket is not None
        data = bytearray()
        while len(data) < nr_bytes:
            piece = self.socket.recv(min(nr_bytes - len(data), READ_STEP))
            if not piece:
                break
            data += piece
        return data


class GuardedRequestHandler(RequestHandler):
    """Serves one connection in its own thread: TLS handshake, association, clean-up."""

    server: GuardedAssociationServer

    def handle(self) -> None:
        """Handshake (TLS), run the association to its end, then report its closing."""
        door = self.server.door
        reason: str | None = None
        try:
            if isinstance(self.request, ssl.SSLSocket):
                try:
                    self.request.do_handshake()
                except (ssl.SSLError, OSError) as exc:
                    reason = TLS_FAILED_REASON.format(why=_tls_reason(exc))
                    self.server.shutdown_request(self.request)
                    return
            if not await_data(self.request, door.limits.request_timeout_s):
                self.server.shutdown_request(self.request)
                return
            assoc = self._create_association()
            assoc.dul.socket.__class__ = BulkReadSocket  # same object, faster reads
            door.attach(self.request, assoc)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()
        finally:
            conn = door.closed(self.request, reason)
            if conn is not None and not conn.requested:
                _log_closed(conn, self.server.log_budget)


def await_data(sock: socket.socket, timeout_s: float) -> bool:
    """Wait, without polling, until the peer sends something; ``False`` if it closed.

    pynetdicom's DUL thread polls its socket every millisecond from the moment its
    association starts: a few dozen silent connections would keep the CPUs busy. So the
    association (two more threads) is only created once its request has begun to arrive.
    The reaper's shutdown of the socket ends the wait (``poll``, not ``select``: file
    descriptors above 1023 are fine).
    """
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI)
    if not poller.poll(timeout_s * 1000 + WAIT_MARGIN_MS):
        return False
    if isinstance(sock, ssl.SSLSocket):
        return True  # a TLS record (or its close): the association reads it
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except OSError:
        return False


def _tls_reason(exc: BaseException) -> str:
    """Why a TLS handshake failed, in OpenSSL's words when it gives them."""
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None)
    return str(reason or type(exc).__name__).lower().replace("_", " ")


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with :class:`Door` applied to every connection."""

    daemon_threads = True  # stopping never waits for peers; associations end on their own
    request_queue_size = 128  # listen() backlog: a burst of connects must not drop SYNs

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[EventHandlerType] | None = None,
        *,
        door: Door,
    ) -> None:
        """Create the server as pynetdicom does, with ``door`` and our request handler."""
        self.door = door
        self.log_budget = LogBudget()
        self._stopping = threading.Event()
        super().__init__(
            ae, address, ae_title, contexts, ssl_context,
            evt_handlers=evt_handlers, request_handler=GuardedRequestHandler,
        )  # fmt: skip
        interval = min(0.5, door.limits.request_timeout_s / 4)
        self._reaper = threading.Thread(
            target=self._reap, args=(interval,), name="dicomnode-door-reaper", daemon=True
        )

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept; wrap in TLS without handshaking (that runs in the connection's thread)."""
        assert self.socket is not None  # bound in __init__
        client, address = self.socket.accept()
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Register the connection, closing the pending ones it pushes over the limit."""
        for victim in self.door.opened(request, _peer(client_address)):
            close_pending(victim)
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a connection handler's failure instead of printing a traceback."""
        peer = _peer(client_address)
        log.error("connection handler failed", peer_host=peer[0], peer_port=peer[1], exc_info=True)

    def start_reaper(self) -> None:
        """Start closing connections that send no request in time."""
        self._reaper.start()

    def _reap(self, interval: float) -> None:
        """Every ``interval`` s, close pending connections past the request time-out."""
        while not self._stopping.wait(interval):
            for conn in self.door.expired():
                close_pending(conn)

    def shutdown(self) -> None:
        """Stop accepting, stop the reaper and close connections still waiting."""
        self._stopping.set()
        super().shutdown()
        for conn in self.door.close_all_pending(SHUTDOWN_REASON):
            close_pending(conn)


def start_guarded_server(
    ae: AE,
    address: tuple[str, int],
    handlers: list[EventHandlerType],
    door: Door,
    ssl_context: ssl.SSLContext | None = None,
) -> GuardedAssociationServer:
    """Listen on ``address`` in a background thread, as ``AE.start_server(block=False)``.

    pynetdicom's own cap is lifted well above ours (``door`` enforces the limits) but
    kept as a backstop against threads that linger after their connection closed.
    """
    limits = door.limits
    ae.maximum_associations = 4 * (limits.max_associations + limits.max_pending_connections)
    server = ae.make_server(
        address,
        evt_handlers=handlers,
        ssl_context=ssl_context,
        server_class=GuardedAssociationServer,
        door=door,
    )
    assert isinstance(server, GuardedAssociationServer)  # make_server built server_class
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(
        target=make_target(server.serve_forever), name=f"AcceptorServer@{stamp}", daemon=True
    )
    thread.start()
    server.start_reaper()
    ae._servers.append(server)  # so that AE.shutdown() also stops it, as for start_server
    return server
