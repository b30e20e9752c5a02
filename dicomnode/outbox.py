"""Outbox processing: send due items, record each attempt, back off on failure.

An item is retried with capped exponential back-off for ``outbox.retry_window_h`` after it
was queued (or last sent again by hand); then it becomes a dead letter, kept until an
administrator retries or discards it (:mod:`dicomnode.deliveries`). A destination whose
items are backed off is probed with C-ECHO every ``outbox.probe_interval_s``: once it
answers, its items are due at once instead of waiting out their back-off.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from dicomnode.config import Destination, NodeConfig, OutboxSettings
from dicomnode.deliveries import DeliveryAdmin
from dicomnode.jobs import OutboxStore
from dicomnode.probe import probe_destination
from dicomnode.records import OutboxItem, OutboxState
from dicomnode.sender import SendResult, send_files
from dicomnode.status import is_stored

log = structlog.get_logger(__name__)

Sender = Callable[[Destination, Sequence[Path], str, float], dict[Path, SendResult]]
Prober = Callable[[Destination, str, float], bool]


def backoff_delay(attempts: int, settings: OutboxSettings) -> float:
    """Seconds before the next try after ``attempts`` failures: doubling, capped."""
    return float(min(settings.initial_delay_s * 2 ** max(attempts - 1, 0), settings.max_delay_s))


def next_retry(
    item: OutboxItem, attempts: int, now: float, settings: OutboxSettings
) -> float | None:
    """When to try ``item`` again after its ``attempts``-th failure at ``now``; ``None``
    when its retry window is over (or ``max_attempts`` reached): a dead letter.

    The last try falls on the window's end, so a window is always used to its end.
    """
    window_end = item.window_start + settings.retry_window_s
    if now >= window_end:
        return None
    if settings.max_attempts is not None and attempts >= settings.max_attempts:
        return None
    return min(now + backoff_delay(attempts, settings), window_end)


class OutboxProcessor:
    """Delivers pending outbox items, one association per destination per batch."""

    def __init__(
        self,
        config: NodeConfig,
        outbox: OutboxStore,
        send: Sender = send_files,
        probe: Prober = probe_destination,
    ) -> None:
        """Send with ``send`` (default: :func:`send_files`) to ``config``'s destinations;
        probe backed-off destinations with ``probe`` (default: C-ECHO)."""
        self.config = config
        self.outbox = outbox
        self.send = send
        self.probe = probe
        self.admin = DeliveryAdmin(outbox.store)
        self._probed_at: dict[str, float] = {}

    @property
    def calling_ae_title(self) -> str:
        """The AE title the node calls destinations with."""
        return self.config.outbox.calling_ae_title or self.config.node.ae_title

    def process_due(self, now: float | None = None) -> int:
        """Probe backed-off destinations, then attempt every due item; return how many
        were delivered."""
        moment = time.time() if now is None else now
        self.probe_backed_off(moment)
        by_destination: dict[str, list[OutboxItem]] = defaultdict(list)
        for item in self.outbox.due(moment):
            by_destination[item.destination].append(item)
        delivered = 0
        for name, items in by_destination.items():
            destination = self.config.destinations.get(name)
            if destination is None:
                for item in items:
                    self._record(item, moment, SendResult(None, f"unknown destination {name!r}"))
                continue
            results = self.send(
                destination,
                [item.path for item in items],
                self.calling_ae_title,
                self.config.outbox.timeout_s,
            )
            attempted_at = time.time() if now is None else now
            for item in items:
                result = results.get(item.path, SendResult(None, "not attempted"))
                delivered += self._record(item, attempted_at, result)
        return delivered

    def probe_backed_off(self, now: float) -> list[str]:
        """C-ECHO each destination whose pending items wait out a back-off (at most every
        ``probe_interval_s``); make the items of those that answer due now. Returns the
        destinations whose back-off was reset."""
        interval = self.config.outbox.probe_interval_s
        reset: list[str] = []
        for name in self.admin.backed_off_destinations(now):
            destination = self.config.destinations.get(name)
            if destination is None or now - self._probed_at.get(name, -interval) < interval:
                continue
            self._probed_at[name] = now
            if self.probe(destination, self.calling_ae_title, self.config.outbox.timeout_s):
                count = self.admin.reset_backoff(name, now)
                log.info("destination answers C-ECHO again; back-off reset", destination=name,
                         items=count)  # fmt: skip
                reset.append(name)
        return reset

    def _record(self, item: OutboxItem, now: float, result: SendResult) -> bool:
        """Record one attempt; reschedule, or make a dead letter, on failure. Returns
        delivered."""
        settings = self.config.outbox
        bound = log.bind(job_id=item.job_id, outbox_id=item.id, destination=item.destination)
        if result.status is not None and is_stored(result.status):
            self.outbox.record_attempt(item, now, result.status, None, OutboxState.SENT, now)
            bound.info("result delivered", status=f"0x{result.status:04X}")
            self._probed_at.pop(item.destination, None)
            return True
        error = result.error or f"status 0x{result.status or 0:04X}"
        attempts = item.attempts + 1
        retry_at = next_retry(item, attempts, now, settings)
        if retry_at is None:
            hours = (now - item.window_start) / 3600.0
            reason = f"dead letter after {attempts} attempts in {hours:.2f} h: {error}"
            self.outbox.record_attempt(
                item, now, result.status, reason, OutboxState.DEAD_LETTER, now
            )
            bound.error("delivery dead-lettered", reason=reason)
            return False
        self.outbox.record_attempt(item, now, result.status, error, OutboxState.PENDING, retry_at)
        bound.warning("delivery will be retried", error=error, attempt=attempts, retry_at=retry_at)
        return False
