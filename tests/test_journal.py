"""The ingest journal: acknowledged records reach the spool and the state, a torn record is
discarded, recovery is idempotent, completeness waits for journaled instances, and an
instance acknowledged before a kill -9 is there after the restart (real node process,
real DCMTK storescu)."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from bench.peers import NodeProcess, node_config_toml, parse_storescu, state_rows
from bench.peers import storescu_command as peer_storescu_command
from dicomnode import spool
from dicomnode.degraded import degraded_reasons
from dicomnode.journal import MIB, PREFIX, SUFFIX, Journal, JournalBroken, JournalSettings
from dicomnode.records import Association, InstanceRecord, RecordOutcome, SeriesState
from dicomnode.state import InstanceConflict, StateStore
from pipelines.synthetic import synthetic_head_ct, write_series
from tests.support import free_port, require_tool

SLOW = JournalSettings(move_interval_s=60.0)  # records stay journaled until a flush or close


def _instances(
    folder: Path, seed: int = 5, slices: int = 3, rows: int = 32
) -> list[tuple[InstanceRecord, bytes, bytes]]:
    """Generated CT instances as the receiver hands them to the journal: the record,
    the preamble + file meta, and the dataset bytes as sent."""
    found = []
    for path in write_series(synthetic_head_ct(seed=seed, n_slices=slices, rows=rows), folder):
        data = path.read_bytes()
        (group_length,) = struct.unpack_from("<I", data, spool.META_GROUP_LENGTH_END - 4)
        meta = data[: spool.META_GROUP_LENGTH_END + group_length]
        dataset = data[len(meta) :]
        ds = dcmread(path, stop_before_pixels=True)
        rec = InstanceRecord(
            sop_instance_uid=str(ds.SOPInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            path=folder.parent / "spool" / "placeholder", received_at=1.0 + len(found),
            association=Association("STORESCU", "DICOMNODE"), modality="CT",
            body_part_examined="HEAD", series_description="", protocol_name="",
            image_type=("ORIGINAL", "PRIMARY", "AXIAL"), sha256=hashlib.sha256(dataset).hexdigest(),
        )  # fmt: skip
        found.append((rec, meta, dataset))
    return found


def _at(rec: InstanceRecord, spool_dir: Path) -> InstanceRecord:
    """The record with its path in ``spool_dir``."""
    path = spool.instance_path(
        spool_dir, rec.study_instance_uid, rec.series_instance_uid, rec.sop_instance_uid
    )
    return InstanceRecord(**{**rec.__dict__, "path": path})


@pytest.fixture()
def parts(tmp_path: Path) -> list[tuple[InstanceRecord, bytes, bytes]]:
    """Three generated instances of one series, with paths in ``tmp_path/spool``."""
    return [(_at(r, tmp_path / "spool"), m, d) for r, m, d in _instances(tmp_path / "in")]


def _journal(tmp_path: Path, name: str, settings: JournalSettings = SLOW) -> Journal:
    """A journal in ``tmp_path/<name>/journal`` over a state and spool of its own."""
    base = tmp_path / name
    store = StateStore(base / "state.sqlite3")
    return Journal(base / "journal", tmp_path / "spool", store, settings)


def test_records_reach_spool_and_state(
    tmp_path: Path, parts: list[tuple[InstanceRecord, bytes, bytes]]
) -> None:
    """Appended records are recorded with their bytes as files and the segment retired."""
    journal = _journal(tmp_path, "node", JournalSettings(move_interval_s=0.0))
    journal.start()
    for rec, meta, dataset in parts:
        assert journal.append(rec, meta, dataset) is RecordOutcome.NEW
    assert journal.wait_moved(30.0)
    journal.close()
    for rec, meta, dataset in parts:
        assert rec.path.read_bytes() == meta + dataset
        stored = journal.store.stored_instance(rec.sop_instance_uid)
        assert stored is not None and stored.sha256 == rec.sha256
    assert not list(journal.folder.glob(f"*{SUFFIX}"))


def test_identical_and_conflicting_resends_while_journaled(
    tmp_path: Path, parts: list[tuple[InstanceRecord, bytes, bytes]]
) -> None:
    """A journaled UID re-sent with its bytes is unchanged, with other bytes it replaces,
    in another series it is refused; the same once it is recorded."""
    journal = _journal(tmp_path, "node")
    journal.start()
    rec, meta, dataset = parts[0]
    other_series = InstanceRecord(**{**rec.__dict__, "series_instance_uid": "1.2.3.4"})
    for _ in ("journaled", "recorded"):
        assert journal.append(rec, meta, dataset) in (RecordOutcome.NEW, RecordOutcome.UNCHANGED)
        assert journal.append(rec, meta, dataset) is RecordOutcome.UNCHANGED
        with pytest.raises(InstanceConflict):
            journal.append(other_series, meta, dataset)
        assert journal.wait_moved(30.0)
    changed = dataset[:-2] + b"\x01\x00"
    replaced = InstanceRecord(**{**rec.__dict__, "sha256": hashlib.sha256(changed).hexdigest()})
    assert journal.append(replaced, meta, changed) is RecordOutcome.REPLACED
    journal.close()
    assert rec.path.read_bytes() == meta + changed
    series = journal.store.get_series(rec.series_instance_uid)
    assert series is not None and series.instance_count == 1 and series.content_changes == 1


def _crash_copy(journal: Journal, target: Path, cut_into_last: int | None = None) -> Path:
    """The journal folder as a crash would leave it: a copy of its segments, the last
    record cut ``cut_into_last`` bytes after its start (the rest zeros, as preallocated).
    The spare segment prepared ahead (zeros) is copied too: recovery finds nothing in it."""
    target.mkdir(parents=True)
    for segment in journal.folder.glob(f"*{SUFFIX}"):
        shutil.copy(segment, target / segment.name)
    if cut_into_last is not None:
        segment = sorted(target.glob(f"*{SUFFIX}"))[0]  # the one with records
        data = bytearray(segment.read_bytes())
        starts, offset = [], 0
        while data[offset : offset + 4] == b"DNJ1":
            starts.append(offset)
            _, header, payload, _ = PREFIX.unpack_from(data, offset)
            offset += PREFIX.size + header + payload
        cut = starts[-1] + cut_into_last
        data[cut:] = bytes(len(data) - cut)
        segment.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("cut", [3, PREFIX.size + 10, 4000], ids=["prefix", "header", "pixels"])
def test_torn_last_record_is_discarded(
    tmp_path: Path, parts: list[tuple[InstanceRecord, bytes, bytes]], cut: int
) -> None:
    """A record cut anywhere (it was never acknowledged) is dropped; those before it are
    replayed into the spool and state."""
    journal = _journal(tmp_path, "node")
    journal.start()
    for rec, meta, dataset in parts:
        journal.append(rec, meta, dataset)
    crashed = _crash_copy(journal, tmp_path / "crashed", cut_into_last=cut)
    journal.close()
    shutil.rmtree(tmp_path / "spool")
    store = StateStore(tmp_path / "after" / "state.sqlite3")
    assert Journal(crashed, tmp_path / "spool", store, SLOW).recover() == 2
    for rec, meta, dataset in parts[:2]:
        assert rec.path.read_bytes() == meta + dataset
    assert store.stored_instance(parts[2][0].sop_instance_uid) is None
    assert not parts[2][0].path.exists()
    assert not list(crashed.glob(f"*{SUFFIX}"))


def test_recovery_is_idempotent(
    tmp_path: Path, parts: list[tuple[InstanceRecord, bytes, bytes]]
) -> None:
    """Replaying a journal whose records are already moved changes nothing; a spooled
    file that did not reach the disk (power loss) is written again from the journal."""
    journal = _journal(tmp_path, "node", JournalSettings(move_interval_s=0.0))
    journal.start()
    for rec, meta, dataset in parts:
        journal.append(rec, meta, dataset)
    assert journal.wait_moved(30.0)  # moved, segment not retired: the crash lands here
    crashed = _crash_copy(journal, tmp_path / "crashed")
    journal.close()
    store = journal.store
    before = store.get_series(parts[0][0].series_instance_uid)
    again = _crash_copy(Journal(crashed, tmp_path / "spool", store, SLOW), tmp_path / "again")
    assert Journal(crashed, tmp_path / "spool", store, SLOW).recover() == 0
    assert store.get_series(parts[0][0].series_instance_uid) == before
    parts[1][0].path.write_bytes(b"")  # its data never reached the disk
    assert Journal(again, tmp_path / "spool", store, SLOW).recover() == 1
    assert parts[1][0].path.read_bytes() == parts[1][1] + parts[1][2]
    assert store.get_series(parts[0][0].series_instance_uid) == before


def test_series_with_journaled_instances_is_not_concluded(
    tmp_path: Path, parts: list[tuple[InstanceRecord, bytes, bytes]]
) -> None:
    """Completeness cannot conclude a series while one of its acknowledged instances is
    still journaled, and can once it is recorded."""
    journal = _journal(tmp_path, "node")
    store = journal.store
    store.unrecorded = journal.has_pending
    journal.start()
    first, meta, dataset = parts[0]
    journal.append(first, meta, dataset)
    assert journal.wait_moved(30.0)
    journal.append(*parts[1])
    series = store.get_series(first.series_instance_uid)
    assert series is not None and series.instance_count == 1
    assert journal.has_pending(first.series_instance_uid)
    assert not store.conclude_series(series, SeriesState.ROUTED, None)
    assert journal.wait_moved(30.0)
    series = store.get_series(first.series_instance_uid)
    assert series is not None and series.instance_count == 2
    assert store.conclude_series(series, SeriesState.ROUTED, None)
    journal.close()


def test_acknowledged_then_killed_before_moving_is_there_after_restart(tmp_path: Path) -> None:
    """kill -9 after storescu saw instances acknowledged and before the journal moved
    them (a long move interval, no release): after the restart each acknowledged
    instance is recorded and spooled with the bytes sent."""
    require_tool("storescu", "dcmtk")
    files = [p.resolve() for p in write_series(synthetic_head_ct(seed=8, n_slices=6, rows=64),
                                               tmp_path / "in")]  # fmt: skip
    port = free_port()
    config = node_config_toml(tmp_path, port, None, stable_age_s=3600.0, route=False)
    with config.open("a") as toml:
        toml.write("\n[node.journal]\nmove_interval_s = 60.0\n")
    node = NodeProcess(config, port, tmp_path / "node.log")
    node.start()
    sender = subprocess.Popen(peer_storescu_command(port, files), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert sender.stderr is not None
    lines: list[str] = []
    for line in sender.stderr:
        lines.append(line)
        if sum("Received Store Response" in seen for seen in lines) == 4:
            node.kill9()
            break
    lines += sender.communicate(timeout=60)[1].splitlines()
    acknowledged = [p for p, text in parse_storescu(lines, Path.cwd()).items() if text == "Success"]
    assert len(acknowledged) == 4
    state = tmp_path / "state" / "dicomnode.sqlite3"
    assert state_rows(state, "SELECT sop_instance_uid FROM instances") == []  # not moved yet
    node.start()
    try:
        recorded = {
            row["sop_instance_uid"]: Path(row["path"])
            for row in state_rows(state, "SELECT sop_instance_uid, path FROM instances")
        }
        for path in acknowledged:
            sent = dcmread(path)
            kept = dcmread(recorded[str(sent.SOPInstanceUID)])
            assert kept.PixelData == sent.PixelData
    finally:
        node.stop()


def _segment_numbers(folder: Path) -> list[int]:
    """The numbers of the segment files in ``folder``."""
    return sorted(int(path.stem) for path in folder.glob(f"*{SUFFIX}"))


def _wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_next_segment_is_prepared_ahead_and_replays_in_order(tmp_path: Path) -> None:
    """A spare segment (reserved, flushed) is ready before the first append and after each
    roll-over, so appends take it in number order and none is made on an answer's path;
    after a crash every record replays, a later record of a UID over an earlier one."""
    journal = _journal(tmp_path, "node", JournalSettings(segment_mib=1, move_interval_s=60.0))
    journal.start()
    assert _wait_for(lambda: _segment_numbers(journal.folder) == [1])  # the spare
    spare = journal.folder / f"{1:012d}{SUFFIX}"
    assert spare.stat().st_size == MIB and spare.stat().st_blocks * 512 >= MIB  # reserved
    parts = [(_at(r, tmp_path / "spool"), m, d)
             for r, m, d in _instances(tmp_path / "in", seed=6, slices=10, rows=256)]  # fmt: skip
    first, meta, dataset = parts[0]
    changed = dataset[:-2] + b"\x07\x00"
    later = InstanceRecord(**{**first.__dict__, "sha256": hashlib.sha256(changed).hexdigest()})
    for rec, rec_meta, rec_dataset in [*parts, (later, meta, changed)]:
        journal.append(rec, rec_meta, rec_dataset)  # 11 records of 130 KiB: two segments
    assert _wait_for(lambda: _segment_numbers(journal.folder) == [1, 2, 3])  # 3: next spare
    crashed = _crash_copy(journal, tmp_path / "crashed")
    journal.close()
    assert not list(journal.folder.glob(f"*{SUFFIX}"))  # the unused spare is deleted too
    shutil.rmtree(tmp_path / "spool")
    store = StateStore(tmp_path / "after" / "state.sqlite3")
    assert Journal(crashed, tmp_path / "spool", store, SLOW).recover() == len(parts)
    assert first.path.read_bytes() == meta + changed
    for rec, rec_meta, rec_dataset in parts[1:]:
        assert rec.path.read_bytes() == rec_meta + rec_dataset


def test_failed_flush_refuses_every_instance_and_says_so(
    tmp_path: Path, parts: list[tuple[InstanceRecord, bytes, bytes]]
) -> None:
    """After a failed fdatasync nothing is acknowledged any more (fail-stop) and the
    journal and /health's reasons say why, until a restart (recovery from the disk)."""
    journal = _journal(tmp_path, "node")
    journal.start()
    journal.append(*parts[0])
    assert journal.broken_reason() is None
    segment = journal._segments[-1]
    os.close(segment.fd)  # the next flush meets a file that cannot be flushed:
    segment.fd = os.open("/dev/null", os.O_RDWR)  # writes succeed, fdatasync is EINVAL
    with pytest.raises(OSError):
        journal.append(*parts[1])
    with pytest.raises(JournalBroken):
        journal.append(*parts[2])
    reason = journal.broken_reason()
    assert reason is not None and "flush failed" in reason and "restarted" in reason
    assert reason in degraded_reasons({}, [], free_bytes=1 << 40, warn_free_bytes=0,
                                      ingest=reason)  # fmt: skip
    journal.close()
    assert journal.store.stored_instance(parts[2][0].sop_instance_uid) is None
