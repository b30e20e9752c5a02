"""The ``dicomnode deliveries`` and ``dicomnode jobs`` commands: list, retry, discard.

They open the state database named by ``--config`` (``state_dir``), also while the node
runs: a retried dead letter is due at once and the running node's outbox sends it within
``poll_interval_s``; a retried job is queued as a new job of the same series. Output has
ids, rules, pipelines, destinations, states, ages and errors: no patient or study
identifiers.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dicomnode.config import load_config
from dicomnode.deliveries import DeliveryAdmin, JobSummary, Selection, parse_age
from dicomnode.records import JobState, OutboxItem, OutboxState
from dicomnode.state import StateStore

Say = Callable[[str], None]
COMMANDS = frozenset({"deliveries", "jobs"})
DATABASE_NAME = "dicomnode.sqlite3"  # as dicomnode.node.Node.database_path
ERROR_WIDTH = 100


def format_age(seconds: float) -> str:
    """A short age: ``45s``, ``12m``, ``3.5h``, ``2.0d``."""
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def delivery_line(item: OutboxItem, now: float) -> str:
    """One row of ``deliveries list``."""
    error = (item.last_error or "").replace("\n", " ")[:ERROR_WIDTH]
    return (
        f"{item.id:>6} {item.job_id:>6} {item.destination:<16} {item.state.value:<11} "
        f"{item.attempts:>8} {format_age(now - item.created_at):>6}  {error}"
    )


DELIVERY_HEADER = (
    f"{'id':>6} {'job':>6} {'destination':<16} {'state':<11} {'attempts':>8} {'age':>6}  error"
)


def job_line(job: JobSummary, now: float) -> str:
    """One row of ``jobs list``."""
    took = ""
    if job.started_at is not None and job.finished_at is not None:
        took = f"{job.finished_at - job.started_at:.1f}s"
    note = f" (retried as job {job.retried_by})" if job.retried_by is not None else ""
    reason = (job.reason or "").replace("\n", " ")[:ERROR_WIDTH] + note
    return (
        f"{job.id:>6} {job.state.value:<8} {job.pipeline:<22} {job.rule:<14} "
        f"{','.join(job.destinations):<16} {format_age(now - job.created_at):>6} {took:>7}  "
        f"{reason}"
    )


JOB_HEADER = (
    f"{'id':>6} {'state':<8} {'pipeline':<22} {'rule':<14} {'destinations':<16} "
    f"{'age':>6} {'took':>7}  reason"
)


def _open(config_path: Path) -> StateStore:
    """The state database of the node configured in ``config_path``; it must exist."""
    config = load_config(config_path)
    path = config.state_dir / DATABASE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no state database at {path} (has the node run?)")
    return StateStore(path)


def _selection(args: argparse.Namespace) -> Selection:
    """The rows the command line selects."""
    older = parse_age(args.older_than) if args.older_than else None
    return Selection(tuple(args.state or ()), args.destination, older, tuple(args.id or ()))


def _has_selector(args: argparse.Namespace) -> bool:
    """Whether the command line narrows the rows in any way."""
    return bool(args.state or args.destination or args.older_than or args.id or args.all)


def run_deliveries(args: argparse.Namespace, say: Say) -> int:
    """``deliveries list|retry|discard``."""
    now = time.time()
    store = _open(args.config)
    try:
        admin = DeliveryAdmin(store)
        selection = _selection(args)
        if args.action == "list":
            say(DELIVERY_HEADER)
            for item in admin.deliveries(selection, now):
                say(delivery_line(item, now))
            return 0
        if not _has_selector(args):
            sys.stderr.write(f"dicomnode deliveries {args.action}: give --id, --state, "
                             "--destination, --older-than or --all\n")  # fmt: skip
            return 2
        if args.action == "retry":
            ids = admin.retry_deliveries(selection, now)
            say(f"queued again {len(ids)} dead letter(s): {' '.join(map(str, ids))}".rstrip())
        else:
            ids = admin.discard_deliveries(selection, now)
            say(f"discarded {len(ids)} delivery(ies): {' '.join(map(str, ids))}".rstrip())
        return 0
    finally:
        store.close()


def run_jobs(args: argparse.Namespace, say: Say) -> int:
    """``jobs list|retry``."""
    now = time.time()
    store = _open(args.config)
    try:
        admin = DeliveryAdmin(store)
        selection = _selection(args)
        if args.action == "list":
            say(JOB_HEADER)
            for job in admin.jobs(selection, now):
                say(job_line(job, now))
            return 0
        if not _has_selector(args):
            sys.stderr.write(
                "dicomnode jobs retry: give --id, --state, --destination, --older-than or --all\n"
            )
            return 2
        pairs = admin.retry_jobs(selection, now)
        say(f"queued again {len(pairs)} failed job(s)")
        for old, new in pairs:
            say(f"  job {old} -> job {new}")
        return 0
    finally:
        store.close()


def _add_filters(parser: argparse.ArgumentParser, states: list[str]) -> None:
    """The selectors shared by every action."""
    parser.add_argument("--config", type=Path, required=True, help="TOML configuration file")
    parser.add_argument("--state", action="append", choices=states, help="repeatable")
    parser.add_argument("--destination", help="destination name (a [destinations] key)")
    parser.add_argument(
        "--older-than", metavar="AGE", help="created at least AGE ago: 90s, 30m, 2h, 3d"
    )
    parser.add_argument("--id", action="append", type=int, help="repeatable")
    parser.add_argument("--all", action="store_true", help="retry or discard every match")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], say: Say) -> None:
    """Add the ``deliveries`` and ``jobs`` commands to the ``dicomnode`` parser."""
    deliveries = sub.add_parser("deliveries", help="list, retry or discard result deliveries")
    deliveries.add_argument("action", choices=["list", "retry", "discard"])
    _add_filters(deliveries, [state.value for state in OutboxState])
    deliveries.set_defaults(handler=lambda args: run_deliveries(args, say))
    jobs = sub.add_parser("jobs", help="list or retry pipeline jobs")
    jobs.add_argument("action", choices=["list", "retry"])
    _add_filters(jobs, [state.value for state in JobState])
    jobs.set_defaults(handler=lambda args: run_jobs(args, say))
