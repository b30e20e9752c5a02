"""Outbox processing: send due items, record each attempt, back off on failure."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from dicomnode.config import Destination, NodeConfig, OutboxSettings
from dicomnode.jobs import OutboxStore
from dicomnode.records import OutboxItem, OutboxState
from dicomnode.sender import SendResult, send_files
from dicomnode.status import is_stored

log = structlog.get_logger(__name__)

Sender = Callable[[Destination, Sequence[Path], str, float], dict[Path, SendResult]]


def backoff_delay(attempts: int, settings: OutboxSettings) -> float:
    """Seconds before the next try after ``attempts`` failures: doubling, capped."""
    return float(min(settings.initial_delay_s * 2 ** max(attempts - 1, 0), settings.max_delay_s))


class OutboxProcessor:
    """Delivers pending outbox items, one association per destination per batch."""

    def __init__(self, config: NodeConfig, outbox: OutboxStore, send: Sender = send_files) -> None:
        """Send with ``send`` (default: :func:`send_files`) to ``config``'s destinations."""
        self.config = config
        self.outbox = outbox
        self.send = send

    def process_due(self, now: float | None = None) -> int:
        """Attempt every due item; return how many were delivered."""
        moment = time.time() if now is None else now
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
            calling = self.config.outbox.calling_ae_title or self.config.node.ae_title
            results = self.send(
                destination, [item.path for item in items], calling, self.config.outbox.timeout_s
            )
            attempted_at = time.time() if now is None else now
            for item in items:
                result = results.get(item.path, SendResult(None, "not attempted"))
                delivered += self._record(item, attempted_at, result)
        return delivered

    def _record(self, item: OutboxItem, now: float, result: SendResult) -> bool:
        """Record one attempt; reschedule or give up on failure. Returns delivered."""
        settings = self.config.outbox
        bound = log.bind(job_id=item.job_id, outbox_id=item.id, destination=item.destination)
        if result.status is not None and is_stored(result.status):
            self.outbox.record_attempt(item, now, result.status, None, OutboxState.SENT, now)
            bound.info("result delivered", status=f"0x{result.status:04X}")
            return True
        error = result.error or f"status 0x{result.status or 0:04X}"
        attempts = item.attempts + 1
        if attempts >= settings.max_attempts:
            reason = f"gave up after {attempts} attempts: {error}"
            self.outbox.record_attempt(item, now, result.status, reason, OutboxState.FAILED, now)
            bound.error("delivery failed", reason=reason)
            return False
        retry_at = now + backoff_delay(attempts, settings)
        self.outbox.record_attempt(item, now, result.status, error, OutboxState.PENDING, retry_at)
        bound.warning("delivery will be retried", error=error, attempt=attempts, retry_at=retry_at)
        return False
