"""Group commit: instances stored at the same time on concurrent associations are made
durable together, each acknowledged only once it is.

Every C-STORE handler writes and fsyncs its own file, then hands its record here. The
first handler to arrive while no commit runs leads: it fsyncs each folder that gained a
file once and records every waiting instance in one SQLite transaction (one WAL fsync),
then wakes them. Handlers that arrive meanwhile wait and form the next group. With one
association a group is one instance: the same work as before, no thread hop.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from dicomnode import spool
from dicomnode.records import InstanceRecord, RecordOutcome
from dicomnode.state import InstanceConflict, StateStore


@dataclass
class _Waiting:
    """One handler's record and, once its group is committed, what came of it."""

    record: InstanceRecord
    outcome: RecordOutcome | InstanceConflict | None = None
    error: Exception | None = None
    done: bool = False


class GroupCommit:
    """Fsyncs spool folders and records instances for concurrent handlers, in groups."""

    def __init__(self, store: StateStore) -> None:
        """Record into ``store``."""
        self._store = store
        self._changed = threading.Condition()
        self._queue: list[_Waiting] = []
        self._leading = False
        self.groups = 0  # groups committed since start
        self.instances = 0  # instances in them

    @property
    def waiting(self) -> int:
        """Records handed in and not yet taken into a group."""
        with self._changed:
            return len(self._queue)

    def record(self, rec: InstanceRecord) -> RecordOutcome:
        """Make ``rec`` durable: fsync its file's folder, record it; return once committed.

        ``rec.path`` must already be written and fsynced under its final name. Raises
        :class:`InstanceConflict` as :meth:`StateStore.record_instance` does, and the
        ``OSError`` or ``sqlite3.Error`` that failed the group.
        """
        mine = _Waiting(rec)
        with self._changed:
            self._queue.append(mine)
            while self._leading and not mine.done:
                self._changed.wait()
            if not mine.done:
                self._leading = True
                group, self._queue = self._queue, []
        if not mine.done:
            try:
                _commit(self._store, group)
            finally:
                with self._changed:
                    self._leading = False
                    self.groups += 1
                    self.instances += len(group)
                    for waiting in group:
                        waiting.done = True
                    self._changed.notify_all()
        if mine.error is not None:
            raise mine.error
        if mine.outcome is None:
            raise RuntimeError("group commit interrupted")
        if isinstance(mine.outcome, InstanceConflict):
            raise mine.outcome
        return mine.outcome


def _commit(store: StateStore, group: list[_Waiting]) -> None:
    """Fsync the group's folders once each, then record it in one transaction; a failure
    is every member's."""
    try:
        for folder in dict.fromkeys(waiting.record.path.parent for waiting in group):
            spool.fsync_dir(folder)
        outcomes = store.record_instances([waiting.record for waiting in group])
    except Exception as exc:  # OSError, sqlite3.Error: answered to each peer
        for waiting in group:
            waiting.error = exc
        return
    for waiting, outcome in zip(group, outcomes, strict=True):
        waiting.outcome = outcome
