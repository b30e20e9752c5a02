"""Why ``/health`` says "degraded": dead letters, failed jobs, refused pipelines, low disk.

:func:`degraded_reasons` is pure; :class:`HealthProblems` reads the state and the disk
each time ``/health`` is asked. Reasons carry counts and names, never patient or study
identifiers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from dicomnode.config import HOUR_S, NodeConfig
from dicomnode.deliveries import DeliveryAdmin
from dicomnode.health import PipelineStatuses
from dicomnode.pipelines_check import UNAVAILABLE
from dicomnode.state import StateStore
from dicomnode.watermark import lowest_free_bytes


def degraded_reasons(
    problems: Mapping[str, int],
    pipelines: Sequence[Mapping[str, str | None]],
    free_bytes: int,
    warn_free_bytes: int,
    ingest: str | None = None,
) -> list[str]:
    """One line per reason the node is degraded; empty when it is not. ``ingest``: why
    the receiver refuses every instance (a failed journal flush)."""
    reasons: list[str] = [] if ingest is None else [ingest]
    dead = problems.get("dead_letters", 0)
    if dead:
        reasons.append(
            f"{dead} dead letter(s): deliveries whose retry window ran out "
            "(dicomnode deliveries list --state dead_letter)"
        )
    failed = problems.get("failed_jobs", 0)
    if failed:
        reasons.append(f"{failed} failed job(s) not retried (dicomnode jobs list --state failed)")
    for status in pipelines:
        if status.get("status") == UNAVAILABLE:
            fallback = status.get("fallback")
            instead = f"; {fallback} runs instead" if fallback else "; nothing runs instead"
            reasons.append(
                f"pipeline {status.get('name')} refused at start: {status.get('reason')}{instead}"
            )
    if free_bytes < warn_free_bytes:
        reasons.append(
            f"low disk: {free_bytes} bytes free on the spool or state file system, "
            f"below limits.warn_free_bytes ({warn_free_bytes})"
        )
    return reasons


class HealthProblems:
    """The live reasons for ``/health``: reads the state database and the disk."""

    def __init__(
        self,
        config: NodeConfig,
        store: StateStore,
        pipelines: PipelineStatuses | None = None,
        clock: Callable[[], float] = time.time,
        ingest: Callable[[], str | None] | None = None,
    ) -> None:
        """Read ``store`` and the folders of ``config``; ``pipelines``: start-up statuses;
        ``ingest``: the receiver's reason to refuse every instance, if any."""
        self.config = config
        self.ingest = ingest
        self.admin = DeliveryAdmin(store)
        self.pipelines = pipelines
        self.clock = clock

    def __call__(self) -> list[str]:
        """The reasons the node is degraded now."""
        window_s = self.config.health.failed_job_window_h * HOUR_S
        problems = self.admin.problem_counts(self.clock(), window_s)
        free = lowest_free_bytes((self.config.spool_dir, self.config.state_dir))
        statuses = self.pipelines() if self.pipelines is not None else []
        ingest = self.ingest() if self.ingest is not None else None
        return degraded_reasons(
            problems, statuses, free, self.config.limits.warn_free_bytes, ingest
        )
