"""Outbox: back-off while a destination is down, delivery once it is up, give-up."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom import dcmread

from dicomnode.config import NodeConfig, OutboxSettings, default_config
from dicomnode.jobs import JobQueue, OutboxStore
from dicomnode.outbox import OutboxProcessor, backoff_delay
from dicomnode.records import Association, InstanceRecord, OutboxState
from dicomnode.state import StateStore
from dicomnode.status import Status
from tests.scp import storage_scp
from tests.support import free_port


def test_backoff_doubles_and_is_capped() -> None:
    """Delays: initial, doubling, never above the cap."""
    settings = OutboxSettings(initial_delay_s=2, max_delay_s=10, max_attempts=9)
    assert [backoff_delay(n, settings) for n in range(1, 6)] == [2, 4, 8, 10, 10]


def _queued_result(tmp_path: Path, source: Path, config: NodeConfig) -> OutboxStore:
    """A state store with one done job whose one result waits in the outbox."""
    store = StateStore(tmp_path / "state.sqlite3")
    store.record_instance(
        InstanceRecord(
            "1.2.3.4.1", "1.2.3.4", "1.2.3", "1.2.840.10008.5.1.4.1.1.2",
            "1.2.840.10008.1.2.1", source, 0.0, Association("CT1", "DICOMNODE"),
            "CT", "HEAD", "", "", ("ORIGINAL",),
        )
    )  # fmt: skip
    series = store.get_series("1.2.3.4")
    assert series is not None
    jobs = JobQueue(store)
    jobs.enqueue_for_series(series, "head", "copy", list(config.destinations), 0.0)
    job = jobs.claim(0.0)
    assert job is not None
    result = tmp_path / "result.dcm"
    shutil.copy(source, result)
    jobs.complete(job, [result], 100.0)
    return OutboxStore(store)


def _config(tmp_path: Path, max_attempts: int = 5) -> NodeConfig:
    """A config whose PACS listens on a free port, with 1 s initial back-off."""
    config = default_config(tmp_path, free_port())
    config.destinations["PACS"].port = free_port()
    config.outbox = OutboxSettings(initial_delay_s=1, max_delay_s=3, max_attempts=max_attempts)
    return config


def test_retries_while_down_then_delivers(tmp_path: Path, ge_headct_dir: Path) -> None:
    """Attempts back off while the PACS is down; once it is up the file is delivered."""
    config = _config(tmp_path)
    outbox = _queued_result(tmp_path, ge_headct_dir / "01.dcm", config)
    sender = OutboxProcessor(config, outbox)

    assert sender.process_due(100.0) == 0  # refused: PACS is not listening
    item = outbox.items()[0]
    assert (item.state, item.attempts, item.next_attempt_at) == (OutboxState.PENDING, 1, 101.0)
    assert sender.process_due(100.9) == 0 and outbox.items()[0].attempts == 1  # not yet due
    assert sender.process_due(101.0) == 0
    assert outbox.items()[0].next_attempt_at == 103.0  # doubled

    with storage_scp(config.destinations["PACS"].port) as pacs:
        assert sender.process_due(103.0) == 1
    item = outbox.items()[0]
    assert (item.state, item.attempts) == (OutboxState.SENT, 3)
    attempts = outbox.attempts(item.id)
    assert [a.attempted_at for a in attempts] == [100.0, 101.0, 103.0]
    assert [a.status for a in attempts] == [None, None, Status.SUCCESS]
    assert all("association" in (a.error or "") for a in attempts[:2])
    assert len(pacs.received) == 1
    sent = dcmread(ge_headct_dir / "01.dcm", stop_before_pixels=True)
    assert pacs.received[0].SOPInstanceUID == sent.SOPInstanceUID


def test_failure_status_is_retried_then_given_up(tmp_path: Path, ge_headct_dir: Path) -> None:
    """A PACS answering a failure status is retried; at max attempts it is a dead letter."""
    config = _config(tmp_path, max_attempts=2)
    outbox = _queued_result(tmp_path, ge_headct_dir / "01.dcm", config)
    sender = OutboxProcessor(config, outbox)
    with storage_scp(config.destinations["PACS"].port, status=Status.OUT_OF_RESOURCES):
        sender.process_due(100.0)
        sender.process_due(101.0)
    item = outbox.items()[0]
    assert item.state is OutboxState.DEAD_LETTER
    assert item.last_error is not None
    assert item.last_error.startswith("dead letter after 2 attempts in ")
    assert item.last_error.endswith(": status 0xA700")
    assert [a.status for a in outbox.attempts(item.id)] == [Status.OUT_OF_RESOURCES] * 2
    assert sender.process_due(1000.0) == 0


def test_unreadable_result_is_recorded(tmp_path: Path, ge_headct_dir: Path) -> None:
    """A result file that vanished is an attempt with an error, not a crash."""
    config = _config(tmp_path, max_attempts=1)
    outbox = _queued_result(tmp_path, ge_headct_dir / "01.dcm", config)
    (tmp_path / "result.dcm").unlink()
    OutboxProcessor(config, outbox).process_due(100.0)
    item = outbox.items()[0]
    assert item.state is OutboxState.DEAD_LETTER
    assert "cannot read file meta" in (item.last_error or "")
