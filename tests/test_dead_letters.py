"""Deliveries never silently give up: a PACS outage longer than the retry window makes
dead letters and a degraded /health; ``dicomnode deliveries retry`` then delivers each
exactly once; a destination answering C-ECHO again ends its back-off at once."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from dicomnode.config import NodeConfig, OutboxSettings, default_config, load_config
from dicomnode.deliveries import DeliveryAdmin, Selection
from dicomnode.jobs import JobQueue, OutboxStore
from dicomnode.node import JobSpec, Node
from dicomnode.outbox import OutboxProcessor, next_retry
from dicomnode.records import Association, InstanceRecord, OutboxItem, OutboxState
from dicomnode.state import SCHEMA, StateStore
from dicomnode.status import Status
from pipelines.synthetic import synthetic_head_ct, write_series
from tests.orthanc import Orthanc
from tests.support import REPO_ROOT, free_port, require_tool

RESULTS_PER_JOB = 2
WINDOW_S = 3.0


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _two_results(spec: JobSpec) -> list[Path]:
    """A test pipeline: the first two instances as a new derived series (real files)."""
    series_uid = generate_uid()
    written = []
    for path in spec.instance_paths[:RESULTS_PER_JOB]:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = spec.output_dir / f"CT-{ds.SOPInstanceUID}.dcm"
        ds.save_as(out, enforce_file_format=True)
        written.append(out)
    return written


def _write_config(folder: Path, pacs: Orthanc, http_port: int) -> Path:
    """A TOML config: loopback node, Orthanc as PACS, a 3 s retry window."""
    path = folder / "dicomnode.toml"
    path.write_text(
        f"""
stable_age_s = 0.5
poll_interval_s = 0.1
spool_dir = "spool"
state_dir = "state"

[node]
ae_title = "DICOMNODE"
host = "127.0.0.1"
port = {free_port()}

[[allowed_callers]]
ae_title = "STORESCU"
host = "127.0.0.1"

[destinations.PACS]
ae_title = "{pacs.ae_title}"
host = "127.0.0.1"
port = {pacs.dicom_port}

[[routes]]
name = "head-ct"
pipeline = "hyperdense_regions"
destinations = ["PACS"]

[routes.match]
modality = ["CT"]

[outbox]
initial_delay_s = 0.3
max_delay_s = 1.0
retry_window_h = {WINDOW_S / 3600.0}
probe_interval_s = 0.5
timeout_s = 5.0

[http]
host = "127.0.0.1"
port = {http_port}
""",
        encoding="utf-8",
    )
    return path


def _cli(config: Path, *args: str) -> str:
    """Run ``dicomnode`` as an administrator would; return its stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", *args, "--config", str(config)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def _health(port: int) -> dict[str, object]:
    """The JSON of ``/health``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
        body: dict[str, object] = json.loads(reply.read())
    return body


def test_outage_longer_than_window_dead_letters_then_retry_delivers_once(
    tmp_path: Path,
) -> None:
    storescu = require_tool("storescu", "dcmtk")
    pacs = Orthanc(tmp_path / "orthanc")  # not started: the PACS is down
    http_port = free_port()
    config_path = _write_config(tmp_path, pacs, http_port)
    config = load_config(config_path)
    files = write_series(synthetic_head_ct(seed=5, n_slices=4, rows=64), tmp_path / "in")
    try:
        with Node(config, _two_results) as node:
            sent = subprocess.run(
                [storescu, "-aec", "DICOMNODE", "127.0.0.1", str(config.node.port),
                 *map(str, files)],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert sent.returncode == 0, sent.stderr

            def all_dead() -> bool:
                items = node.outbox.items()
                return len(items) == RESULTS_PER_JOB and all(
                    i.state is OutboxState.DEAD_LETTER for i in items
                )

            _wait(all_dead, 30, "dead letters")
            items = node.outbox.items()
            assert all(i.attempts >= 2 for i in items)  # retried within the window
            assert all("dead letter after" in (i.last_error or "") for i in items)
            health = _health(http_port)
            assert health["status"] == "degraded"
            assert any("dead letter" in str(r) for r in health["reasons"])  # type: ignore[attr-defined]

            listed = _cli(config_path, "deliveries", "list", "--state", "dead_letter")
            assert len(listed.strip().splitlines()) == 1 + RESULTS_PER_JOB
            assert files[0].name not in listed
            study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
            assert study not in listed  # no study or patient identifiers

            pacs.start()
            retried = _cli(config_path, "deliveries", "retry", "--state", "dead_letter")
            assert f"queued again {RESULTS_PER_JOB} dead letter(s)" in retried
            again = _cli(config_path, "deliveries", "retry", "--all")
            assert "queued again 0 dead letter(s)" in again

            _wait(
                lambda: all(i.state is OutboxState.SENT for i in node.outbox.items()),
                30, "retried deliveries",
            )  # fmt: skip
            time.sleep(1.0)  # a second delivery, if any, would arrive now
            assert len(pacs.get("/instances")) == RESULTS_PER_JOB
            for item in node.outbox.items():
                stored = [a for a in node.outbox.attempts(item.id) if a.status == Status.SUCCESS]
                assert len(stored) == 1
            assert _health(http_port)["status"] == "ok"
    finally:
        pacs.stop()


def _queued_item(tmp_path: Path, config: NodeConfig, queued_at: float) -> OutboxStore:
    """A state store with one result of a done job waiting in the outbox."""
    source = write_series(synthetic_head_ct(seed=6, n_slices=1, rows=64), tmp_path / "src")[0]
    store = StateStore(tmp_path / "state.sqlite3")
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    store.record_instance(
        InstanceRecord(
            str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID),
            str(ds.SOPClassUID), "1.2.840.10008.1.2.1", source, queued_at,
            Association("CT1", "DICOMNODE"), "CT", "HEAD", "", "", ("ORIGINAL",),
        )
    )  # fmt: skip
    series = store.get_series(str(ds.SeriesInstanceUID))
    assert series is not None
    jobs = JobQueue(store)
    jobs.enqueue_for_series(series, "head", "copy", ["PACS"], queued_at)
    job = jobs.claim(queued_at)
    assert job is not None
    result = tmp_path / "result.dcm"
    shutil.copy(source, result)
    jobs.complete(job, [result], queued_at)
    return OutboxStore(store)


def test_c_echo_ends_a_backed_off_destinations_wait(tmp_path: Path) -> None:
    """Back-off of an hour; the PACS comes back and answers C-ECHO: sent at the next
    pass, not an hour later."""
    pacs = Orthanc(tmp_path / "orthanc")
    config = default_config(tmp_path, free_port())
    config.destinations["PACS"].ae_title = pacs.ae_title
    config.destinations["PACS"].port = pacs.dicom_port
    config.outbox = OutboxSettings(initial_delay_s=3600, max_delay_s=3600, probe_interval_s=1)
    now = time.time()
    outbox = _queued_item(tmp_path, config, now)
    sender = OutboxProcessor(config, outbox)
    assert sender.process_due(now) == 0  # down: refused
    item = outbox.items()[0]
    assert item.state is OutboxState.PENDING and item.next_attempt_at == now + 3600
    assert sender.process_due(now + 2) == 0  # still down: the probe fails, no attempt
    assert outbox.items()[0].attempts == 1
    try:
        pacs.start()
        assert sender.process_due(now + 2.5) == 0  # probed 0.5 s ago: not yet again
        assert sender.process_due(now + 4) == 1  # C-ECHO answered: back-off reset, sent
        assert outbox.items()[0].state is OutboxState.SENT
        assert len(pacs.get("/instances")) == 1
    finally:
        pacs.stop()


def test_last_retry_falls_on_the_window_end() -> None:
    """Back-off never schedules past the window; at its end the item is a dead letter."""
    settings = OutboxSettings(initial_delay_s=10, max_delay_s=100, retry_window_h=0.01)
    item = OutboxItem(1, 1, Path("x.dcm"), "PACS", OutboxState.PENDING, 0, 0.0, None, 0.0)
    assert next_retry(item, 1, 0.0, settings) == 10.0
    assert next_retry(item, 5, 30.0, settings) == 36.0  # 100 s back-off capped by the window
    assert next_retry(item, 6, 36.0, settings) is None
    capped = settings.model_copy(update={"max_attempts": 3})
    assert next_retry(item, 3, 5.0, capped) is None


def test_an_older_database_is_migrated(tmp_path: Path) -> None:
    """Items an older version gave up on ("failed") become dead letters that can be
    retried; the new columns are added."""
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA)
        db.execute(
            "INSERT INTO jobs (series_instance_uid, study_instance_uid, rule, pipeline, "
            "destinations, state, created_at) VALUES ('1.2', '1.2.3', 'r', 'p', '[\"PACS\"]', "
            "'done', 0)"
        )
        db.execute(
            "INSERT INTO outbox (job_id, path, destination, state, attempts, "
            "next_attempt_at, last_error, created_at) VALUES "
            "(1, 'x.dcm', 'PACS', 'failed', 10, 0, 'gave up after 10 attempts', 0)"
        )
    store = StateStore(path)
    item = OutboxStore(store).items()[0]
    assert item.state is OutboxState.DEAD_LETTER and item.delivered_at is None
    admin = DeliveryAdmin(store)
    assert admin.retry_deliveries(Selection(states=("dead_letter",)), 50.0) == [item.id]
    again = OutboxStore(store).items()[0]
    assert (again.state, again.window_start, again.next_attempt_at) == (
        OutboxState.PENDING, 50.0, 50.0,
    )  # fmt: skip
    store.close()
