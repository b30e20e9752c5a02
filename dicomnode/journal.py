"""Ingest journal: an instance is acknowledged once it is durable in an append-only
journal file, and a background mover puts it into the spool and the state afterwards.

One C-STORE costs one ``fdatasync`` of the journal (shared by the instances that
concurrent associations append meanwhile: group commit) instead of three flushes in a
row (file, folder, SQLite WAL). Records are written one after the other under a lock, so
a record is durable only when every record before it is: recovery stops at the first
torn record, which was never acknowledged.

Segments: ``<state_dir>/journal/<number>.journal``, preallocated; the next one is
prepared by a background thread before it is needed (a spare, used in number order). A
record is a fixed prefix (magic, header length, payload length, SHA-256 of header and
file meta), a JSON header (the :class:`InstanceRecord` without its path), the file
meta and the dataset bytes as sent (whose SHA-256 is the record's ``sha256``).

The mover writes the files under their final names and records them in the state in
batches (one transaction per batch). A segment is retired (deleted) once each of its
records is recorded and, after one ``os.sync``, on disk; until then startup recovery
replays its records that are missing or differ in the spool or state (idempotent).

Completeness never sees a series with an acknowledged instance not yet recorded:
:meth:`Journal.has_pending` is the state's hold on concluding it, and an association's
release is answered only once its instances are recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice, takewhile
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field

from dicomnode import spool
from dicomnode.completeness import InstanceFacts
from dicomnode.records import Association, InstanceRecord, RecordOutcome, StoredInstance
from dicomnode.state import InstanceConflict, StateStore

log = structlog.get_logger(__name__)

MIB = 1 << 20
MAGIC = b"DNJ1"
PREFIX = struct.Struct("<4sIQ32s")  # magic, header bytes, payload bytes, sha256(header+meta)
SUFFIX = ".journal"
IDLE_RETIRE_S = 1.0  # a fully moved segment with no append for this long is retired
MOVE_RETRY_S = 1.0  # pause after a batch that could not be moved (full disk, locked state)


class JournalSettings(BaseModel):
    """``[node.journal]``: how received instances are made durable before Success."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    segment_mib: int = Field(default=64, ge=1, le=4096)
    move_interval_s: float = Field(default=0.05, ge=0, le=60)
    move_batch: int = Field(default=64, ge=1, le=4096)


class JournalBroken(OSError):
    """A journal flush failed: nothing more is acknowledged until the node restarts."""


def classify(
    existing: StoredInstance | None, series_uid: str, study_uid: str, sha256: str | None
) -> RecordOutcome:
    """What recording an instance of this series, study and dataset hash over
    ``existing`` (its UID's stored instance) does; raise :class:`InstanceConflict` when
    the UID belongs to another series or study."""
    if existing is None:
        return RecordOutcome.NEW
    if (existing.series_instance_uid, existing.study_instance_uid) != (series_uid, study_uid):
        raise InstanceConflict(existing)
    stored = existing.sha256
    if stored is None and existing.path.is_file():
        stored = spool.dataset_sha256(existing.path)
    return RecordOutcome.UNCHANGED if stored == sha256 else RecordOutcome.REPLACED


def encode_header(rec: InstanceRecord, meta_bytes: int) -> bytes:
    """The JSON header of a record (``path`` is derived from the UIDs on replay)."""
    body: dict[str, Any] = {
        "sop": rec.sop_instance_uid, "series": rec.series_instance_uid,
        "study": rec.study_instance_uid, "sop_class": rec.sop_class_uid,
        "syntax": rec.transfer_syntax_uid, "received_at": rec.received_at,
        "calling": rec.association.calling_aet, "called": rec.association.called_aet,
        "modality": rec.modality, "body_part": rec.body_part_examined,
        "description": rec.series_description, "protocol": rec.protocol_name,
        "image_type": list(rec.image_type), "sha256": rec.sha256, "meta": meta_bytes,
        "facts": None if rec.facts is None else vars(rec.facts),  # flat: asdict is 5x slower
    }  # fmt: skip
    return json.dumps(body, separators=(",", ":")).encode()


def decode_header(header: bytes, spool_dir: Path) -> tuple[InstanceRecord, int]:
    """The record and file meta length of a header; raises ``ValueError`` if malformed."""
    body = json.loads(header)
    facts = body["facts"]
    if facts is not None:
        orientation = facts["orientation"]
        facts = InstanceFacts(
            **{**facts, "orientation": None if orientation is None else tuple(orientation)}
        )
    rec = InstanceRecord(
        sop_instance_uid=body["sop"], series_instance_uid=body["series"],
        study_instance_uid=body["study"], sop_class_uid=body["sop_class"],
        transfer_syntax_uid=body["syntax"],
        path=spool.instance_path(spool_dir, body["study"], body["series"], body["sop"]),
        received_at=float(body["received_at"]),
        association=Association(body["calling"], body["called"]),
        modality=body["modality"], body_part_examined=body["body_part"],
        series_description=body["description"], protocol_name=body["protocol"],
        image_type=tuple(body["image_type"]), sha256=body["sha256"], facts=facts,
    )  # fmt: skip
    return rec, int(body["meta"])


@dataclass
class _Segment:
    """One journal file: its open descriptor, size, append position and record counts."""

    number: int
    path: Path
    fd: int
    size: int
    end: int = 0
    records: int = 0
    moved: int = 0
    sealed: bool = False
    last_append: float = 0.0


@dataclass(frozen=True)
class _Entry:
    """One acknowledged record waiting to be moved: where its payload lies."""

    seq: int
    segment: _Segment
    offset: int  # of the payload: file meta, then dataset
    length: int
    record: InstanceRecord
    at: float  # monotonic time of the append


@dataclass(frozen=True)
class ScannedRecord:
    """A whole record found in a segment by :func:`scan`."""

    record: InstanceRecord
    payload: bytes  # file meta + dataset


def scan(path: Path, spool_dir: Path) -> Iterator[ScannedRecord]:
    """The whole records of one segment in order, up to the first torn or empty one."""
    data = path.read_bytes()
    offset = 0
    while offset + PREFIX.size <= len(data):
        magic, header_len, payload_len, check = PREFIX.unpack_from(data, offset)
        start = offset + PREFIX.size
        if magic != MAGIC or start + header_len + payload_len > len(data):
            return
        header = data[start : start + header_len]
        payload = data[start + header_len : start + header_len + payload_len]
        try:
            rec, meta_bytes = decode_header(header, spool_dir)
        except (ValueError, KeyError, TypeError):
            return
        if hashlib.sha256(header + payload[:meta_bytes]).digest() != check:
            return
        if hashlib.sha256(payload[meta_bytes:]).hexdigest() != rec.sha256:
            return
        yield ScannedRecord(rec, payload)
        offset = start + header_len + payload_len


def _write_at(fd: int, parts: list[bytes], offset: int) -> None:
    """Write ``parts`` one after the other at ``offset`` (all of them; one system call
    unless the kernel writes less than asked)."""
    views = [memoryview(part) for part in parts]
    while views:
        written = os.pwritev(fd, views, offset)
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views:
            views[0] = views[0][written:]


def _create_segment(path: Path, number: int, size: int) -> _Segment:
    """A new segment file of ``size`` bytes, reserved (``fallocate``: an append does not
    meet a full disk) and flushed with its folder.

    Not written with zeros: an append into written blocks flushes 0.69x as long on a
    quiet disk (``bench/journal_sync.py``, 0.47 against 0.68 ms), but writing every
    segment twice cost more CPU and disk time than it saved (``bench/README.md``)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
        spool.fsync_dir(path.parent)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return _Segment(number, path, fd, size)


def _discard(segment: _Segment) -> None:
    """Close and delete a segment that never took a record."""
    os.close(segment.fd)
    segment.path.unlink(missing_ok=True)


class Journal:
    """The receiver's journal, its mover thread and the thread that prepares segments."""

    def __init__(
        self, folder: Path, spool_dir: Path, store: StateStore, settings: JournalSettings
    ) -> None:
        """Journal into ``folder``; move into ``spool_dir`` and ``store``."""
        self.folder = folder
        self.spool_dir = spool_dir
        self.store = store
        self.settings = settings
        self._cond = threading.Condition()
        self._segments: list[_Segment] = []  # oldest first; the last one takes appends
        self._next_number = 1
        self._seq = 0  # records written
        self._durable = 0  # records flushed
        self._syncing = False
        self._dirty: dict[int, _Segment] = {}  # written since the last flush
        self._broken: OSError | None = None
        self._broken_at = 0.0  # time.time() of the failed flush
        self._spare: _Segment | None = None  # the next segment, prepared ahead
        self._preparing = False
        self._preparer: threading.Thread | None = None
        self._queue: deque[_Entry] = deque()  # acknowledged or being flushed, not moved
        self._by_sop: dict[str, _Entry] = {}  # the latest queued record of each UID
        self._series = Counter[str]()  # queued records per series
        self._moved_through = 0  # highest seq recorded in the state
        self._moves = 0  # batches moved (changes when records leave the queue)
        self._flush_wanted = 0  # a seq someone waits to see moved
        self._stopping = False
        self._mover: threading.Thread | None = None

    # -- receiving ---------------------------------------------------------------------

    def append(
        self, rec: InstanceRecord, meta: bytes, dataset: bytes,
        check: Callable[[], None] | None = None,
    ) -> RecordOutcome:  # fmt: skip
        """Journal one instance and return once it is durable. :func:`classify` decides
        against the queued records and the state, atomically with the append; an
        unchanged instance is not written; ``check`` (the free-space watermark) runs
        before a new or different one is, and may raise to refuse it.

        Raises :class:`InstanceConflict`, or ``OSError`` when it cannot be written or
        flushed (nothing is then acknowledged).
        """
        header = encode_header(rec, len(meta))
        prefix = PREFIX.pack(
            MAGIC, len(header), len(meta) + len(dataset), hashlib.sha256(header + meta).digest()
        )
        length = len(prefix) + len(header) + len(meta) + len(dataset)
        with self._cond:
            moves = self._moves
        while True:
            recorded = self.store.stored_instance(rec.sop_instance_uid)
            with self._cond:
                self._await_room(length)
                entry = self._by_sop.get(rec.sop_instance_uid)
                if entry is None and self._moves != moves:
                    moves = self._moves  # a batch moved since: read the state again
                    continue
                outcome = classify(
                    _stored(entry.record) if entry else recorded,
                    rec.series_instance_uid, rec.study_instance_uid, rec.sha256,
                )  # fmt: skip
                if outcome is RecordOutcome.UNCHANGED:
                    seq = entry.seq if entry else 0  # identical to a record maybe in flight
                    break
                if check is not None:
                    check()
                if self._broken is not None:
                    raise JournalBroken(self._broken.errno, f"journal: {self._broken.strerror}")
                segment = self._segment_for(length)
                at = segment.end
                _write_at(segment.fd, [prefix, header, meta, dataset], at)
                segment.end += length
                segment.records += 1
                segment.last_append = time.monotonic()
                self._seq += 1
                seq = self._seq
                self._dirty[segment.number] = segment
                entry = _Entry(seq, segment, at + len(prefix) + len(header),
                               len(meta) + len(dataset), rec, segment.last_append)  # fmt: skip
                self._queue.append(entry)
                self._by_sop[rec.sop_instance_uid] = entry
                self._series[rec.series_instance_uid] += 1
                break
        self._flush_through(seq)
        return outcome

    def _segment_for(self, length: int) -> _Segment:
        """The segment the next record of ``length`` bytes goes to (lock held): the
        current one, else the spare prepared ahead, else one made here and now."""
        if self._segments and not self._segments[-1].sealed:
            current = self._segments[-1]
            if current.end + length <= current.size:
                return current
            current.sealed = True
        spare, self._spare = self._spare, None
        newest = self._segments[-1].number if self._segments else 0
        if spare is not None and spare.size >= length and spare.number > newest:
            segment = spare
        else:  # none, or unusable (a huge record; numbered before one made here)
            if spare is not None:
                _discard(spare)
            segment = self._new_segment(max(self.settings.segment_mib * MIB, length))
        self._segments.append(segment)
        self._cond.notify_all()  # the preparer makes the next spare
        return segment

    def _await_room(self, length: int) -> None:
        """Wait (lock held, released meanwhile) while the record does not fit the current
        segment and the spare is being prepared: nearly ready, cheaper than another."""
        while self._preparing and self._spare is None:
            current = self._segments[-1] if self._segments else None
            if current is not None and not current.sealed and current.end + length <= current.size:
                return
            self._cond.wait()

    def _new_segment(self, size: int) -> _Segment:
        """Number (lock held) and create a segment of ``size`` bytes."""
        number = self._next_number
        self._next_number += 1
        return _create_segment(self.folder / f"{number:012d}{SUFFIX}", number, size)

    def _prepare_loop(self) -> None:
        """Keep one spare segment ready, so that no answer waits for a segment's creation
        (two flushes: :func:`_create_segment`). Should the thread ever end unexpectedly,
        appends make their segments themselves again."""
        try:
            self._prepare_spares()
        finally:
            with self._cond:
                self._preparing = False
                self._cond.notify_all()

    def _prepare_spares(self) -> None:
        """The preparer's loop, until the journal stops."""
        failing = False
        while True:
            with self._cond:
                while not self._stopping and self._spare is not None:
                    self._cond.wait()
                if self._stopping:
                    return
                number = self._next_number
                self._next_number += 1
                self._preparing = True
            path = self.folder / f"{number:012d}{SUFFIX}"
            try:
                spare: _Segment | None = _create_segment(
                    path, number, self.settings.segment_mib * MIB
                )
            except OSError as exc:  # a full disk: appends make their own (and refuse)
                if not failing:
                    log.error("next journal segment not prepared; retrying", error=exc.strerror)
                failing, spare = True, None
            with self._cond:
                self._preparing = False
                if spare is not None and (self._stopping or self._spare is not None):
                    _discard(spare)
                elif spare is not None:
                    self._spare, failing = spare, False
                self._cond.notify_all()
                if failing:
                    self._cond.wait(MOVE_RETRY_S)

    def _flush_through(self, seq: int) -> None:
        """Return once record ``seq`` is durable: flush it and whatever was written with it
        (one ``fdatasync`` per segment for the whole group), or wait for the flush that
        covers it."""
        with self._cond:
            while self._durable < seq:
                if self._broken is not None:
                    raise JournalBroken(self._broken.errno, f"journal: {self._broken.strerror}")
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                target, dirty = self._seq, list(self._dirty.values())
                self._dirty.clear()
                break
            else:
                return
        error: OSError | None = None
        try:
            for segment in dirty:
                os.fdatasync(segment.fd)
        except OSError as exc:
            error = exc
        with self._cond:
            self._syncing = False
            if error is None:
                self._durable = target
            else:  # after a failed flush the page cache cannot be trusted: stop here
                self._broken, self._broken_at = error, time.time()
                log.error("journal flush failed; instances are refused until restart",
                          error=error.strerror)  # fmt: skip
            self._cond.notify_all()
        if error is not None:
            raise error

    # -- what completeness and the node see --------------------------------------------

    def has_pending(self, series_uid: str) -> bool:
        """Whether an acknowledged instance of the series is not recorded yet."""
        with self._cond:
            return self._series[series_uid] > 0

    def broken_reason(self) -> str | None:
        """Why every instance is refused since a journal flush failed, ``None`` if none
        failed. Fail-stop: after a failed ``fdatasync`` the kernel may have dropped the
        dirty pages and a later flush can succeed without them, so what the journal holds
        is only known again from the disk, by the restart's recovery."""
        with self._cond:
            if self._broken is None:
                return None
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._broken_at))
            return (
                f"ingest journal flush failed at {at} ({self._broken.strerror}): every "
                "C-STORE is refused until the node is restarted"
            )

    def pending(self) -> int:
        """Instances journaled and not recorded yet."""
        with self._cond:
            return len(self._queue)

    def wait_moved(self, timeout_s: float) -> bool:
        """Wait until everything journaled so far is recorded; return whether it is."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            target = self._seq
            self._flush_wanted = max(self._flush_wanted, target)
            self._cond.notify_all()
            while self._moved_through < target and self._queue:
                left = deadline - time.monotonic()
                if left <= 0 or self._mover is None:
                    return False
                self._cond.wait(left)
            return True

    # -- the mover ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the mover thread."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._stopping = False
        self._mover = threading.Thread(target=self._move_loop, name="dicomnode-journal-mover",
                                       daemon=True)  # fmt: skip
        self._mover.start()
        self._preparer = threading.Thread(
            target=self._prepare_loop, name="dicomnode-journal-segments", daemon=True
        )
        self._preparer.start()

    def close(self) -> None:
        """Move what is queued, stop the mover and the preparer, retire every segment."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in (self._mover, self._preparer):
            if thread is not None:
                thread.join()
        self._mover = self._preparer = None
        with self._cond:
            for segment in self._segments:
                segment.sealed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            _discard(spare)
        self._retire()

    def _take_batch(self) -> list[_Entry] | None:
        """Wait for durable records worth moving (a full batch, the oldest waiting
        ``move_interval_s``, a flush wanted, or stopping), or for a segment to retire
        (``[]``); ``None`` when stopping with nothing left."""
        with self._cond:
            while True:
                durable = takewhile(lambda e: e.seq <= self._durable, self._queue)
                ready = list(islice(durable, self.settings.move_batch))
                now = time.monotonic()
                if ready:
                    waited = now - ready[0].at
                    if (self._stopping or self._flush_wanted >= ready[0].seq
                            or waited >= self.settings.move_interval_s
                            or len(ready) >= self.settings.move_batch):  # fmt: skip
                        return ready
                    self._cond.wait(self.settings.move_interval_s - waited)
                elif self._stopping:
                    return None
                elif self._retirable(now):
                    return []
                else:
                    self._cond.wait(IDLE_RETIRE_S / 2)

    def _move_loop(self) -> None:
        """Move batches until stopped; a batch that fails is retried (logged once)."""
        failing: str | None = None
        while (batch := self._take_batch()) is not None:
            if not batch:
                self._retire()
                continue
            try:
                self._move(batch)
            except (OSError, sqlite3.Error) as exc:  # full disk, locked state: retry
                if str(exc) != failing:
                    log.error("journal records not moved; retrying", error=str(exc))
                failing = str(exc)
                with self._cond:
                    self._cond.wait(MOVE_RETRY_S)
                if self._stopping:
                    return  # left in the journal: recovery moves them at the next start
                continue
            if failing is not None:
                log.info("journal records moved again", after=failing)
            failing = None
            self._retire()

    def _move(self, batch: list[_Entry]) -> None:
        """Write a batch's files under their final names and record them together."""
        _materialise([(e.record, os.pread(e.segment.fd, e.length, e.offset)) for e in batch],
                     self.store)  # fmt: skip
        with self._cond:
            for entry in batch:
                self._queue.popleft()
                if self._by_sop.get(entry.record.sop_instance_uid) is entry:
                    del self._by_sop[entry.record.sop_instance_uid]
                self._series[entry.record.series_instance_uid] -= 1
                if not self._series[entry.record.series_instance_uid]:
                    del self._series[entry.record.series_instance_uid]
                entry.segment.moved += 1
            self._moved_through = batch[-1].seq
            self._moves += 1
            self._cond.notify_all()

    def _retirable(self, now: float) -> list[_Segment]:
        """Leading segments whose records are all moved (lock held); the one taking
        appends only after it was idle for :data:`IDLE_RETIRE_S`."""
        done = []
        for segment in self._segments:
            if segment.moved < segment.records or segment.number in self._dirty:
                break
            idle = now - segment.last_append >= IDLE_RETIRE_S and not self._syncing
            if not (segment.sealed or (idle and segment.records)):
                break
            done.append(segment)
        return done

    def _retire(self) -> None:
        """Delete the leading fully moved segments once their moved files are on disk."""
        with self._cond:
            done = self._retirable(time.monotonic())
            for segment in done:
                segment.sealed = True
        if not done:
            return
        os.sync()  # the moved files and folders of these segments, in one call
        with self._cond:
            for segment in done:
                self._segments.remove(segment)
        for segment in done:
            os.close(segment.fd)
            segment.path.unlink(missing_ok=True)

    # -- recovery ----------------------------------------------------------------------

    def recover(self) -> int:
        """Replay the segments a previous run left: records missing or different in the
        spool or state are moved, then the segments are deleted. Returns how many were
        moved; running it again moves none."""
        self.folder.mkdir(parents=True, exist_ok=True)
        paths = sorted(self.folder.glob(f"*{SUFFIX}"))
        latest: dict[str, ScannedRecord] = {}
        for path in paths:
            for found in scan(path, self.spool_dir):
                latest[found.record.sop_instance_uid] = found  # a later record replaces
            self._next_number = max(self._next_number, int(path.stem) + 1)
        todo = [found for found in latest.values() if not self._materialised(found)]
        for start in range(0, len(todo), self.settings.move_batch):
            chunk = todo[start : start + self.settings.move_batch]
            _materialise([(found.record, found.payload) for found in chunk], self.store)
        if paths:
            os.sync()
            for path in paths:
                path.unlink()
            log.info("journal recovered", segments=len(paths), records=len(latest),
                     moved=len(todo))  # fmt: skip
        return len(todo)

    def _materialised(self, found: ScannedRecord) -> bool:
        """Whether a scanned record is recorded with its hash and spooled with its bytes."""
        rec = found.record
        existing = self.store.stored_instance(rec.sop_instance_uid)
        if existing is None or existing.sha256 != rec.sha256:
            return False
        try:
            return existing.path.read_bytes() == found.payload
        except OSError:
            return False


def _stored(rec: InstanceRecord) -> StoredInstance:
    """A queued record seen as the state's :class:`StoredInstance`."""
    return StoredInstance(rec.series_instance_uid, rec.study_instance_uid, rec.path, rec.sha256)


def _materialise(batch: list[tuple[InstanceRecord, bytes]], store: StateStore) -> None:
    """Write each payload under its record's path (flushed later, by the segment's
    retirement), then record the batch in one transaction."""
    for rec, payload in batch:
        spool.write_atomic(rec.path, payload, durable=False)
    outcomes = store.record_instances([rec for rec, _ in batch])
    for (rec, _), outcome in zip(batch, outcomes, strict=True):
        if isinstance(outcome, InstanceConflict):  # classify() refused these before
            log.error("journaled instance conflicts with a recorded one; kept in the spool",
                      path=str(rec.path))  # fmt: skip
