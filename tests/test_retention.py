"""Retention: delivered data older than its age is removed, undelivered data never;
every deletion counted; the serving process runs it with apscheduler."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from dicomnode import spool
from dicomnode.config import HttpSettings, NodeConfig, RetentionSettings, default_config
from dicomnode.deliveries import DeliveryAdmin, Selection
from dicomnode.jobs import JobQueue, OutboxStore
from dicomnode.node import JobSpec, Node
from dicomnode.records import Association, InstanceRecord, JobState, OutboxState
from dicomnode.retention import Retention, spool_is_empty
from dicomnode.revisions import Delivery, RevisionStore, describe_output
from dicomnode.sender import send_files
from dicomnode.state import StateStore
from dicomnode.status import Status
from pipelines.synthetic import synthetic_head_ct, write_series
from tests.scp import storage_scp
from tests.support import free_port

DAY_S = 86400.0


class Case:
    """One received series, its finished job and its one result queued to PACS."""

    def __init__(self, store: StateStore, config: NodeConfig, seed: int, at: float) -> None:
        """Spool and record a 2-slice series received ``at``; run its job to the outbox."""
        files = write_series(
            synthetic_head_ct(seed=seed, n_slices=2, rows=64), config.state_dir / f"in{seed}"
        )
        self.spooled: list[Path] = []
        for path in files:
            ds = pydicom.dcmread(path)
            stored = spool.store_instance(
                config.spool_dir, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                ds.SOPInstanceUID, path.read_bytes(),
            )  # fmt: skip
            store.record_instance(
                InstanceRecord(
                    str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID),
                    str(ds.StudyInstanceUID), str(ds.SOPClassUID), "1.2.840.10008.1.2.1",
                    stored, at, Association("CT1", "DICOMNODE"), "CT", "HEAD", "", "",
                    ("ORIGINAL",),
                )
            )  # fmt: skip
            self.spooled.append(stored)
            path.unlink()
        series = store.get_series(str(ds.SeriesInstanceUID))
        assert series is not None
        jobs = JobQueue(store)
        jobs.enqueue_for_series(series, "head", "copy", ["PACS"], at)
        job = jobs.claim(at)
        assert job is not None
        self.job_id = job.id
        self.results = config.state_dir / "results" / str(job.id)
        self.results.mkdir(parents=True)
        ds.SOPInstanceUID = generate_uid()
        result = self.results / "CT-result.dcm"
        ds.save_as(result)
        RevisionStore(store).finish(
            job, JobState.DONE, None, [describe_output(job.id, result)],
            [Delivery(result, ("PACS",))], [], at,
        )  # fmt: skip
        self.outbox_id = OutboxStore(store).items()[-1].id

    def settle(self, store: StateStore, state: OutboxState, at: float) -> None:
        """Record one delivery attempt ending in ``state``."""
        outbox = OutboxStore(store)
        item = next(i for i in outbox.items() if i.id == self.outbox_id)
        status = Status.SUCCESS if state is OutboxState.SENT else None
        outbox.record_attempt(item, at, status, None if status == 0 else "down", state, at)


def _config(tmp_path: Path) -> NodeConfig:
    config = default_config(tmp_path, free_port())
    config.retention = RetentionSettings(spool_age_h=168, results_age_h=168, state_age_h=720)
    return config


def test_only_delivered_data_older_than_its_age_is_removed(tmp_path: Path) -> None:
    config = _config(tmp_path)
    store = StateStore(config.state_dir / "dicomnode.sqlite3")
    t0 = time.time()
    delivered = Case(store, config, 1, t0)
    delivered.settle(store, OutboxState.SENT, t0 + 60)
    dead = Case(store, config, 2, t0)
    dead.settle(store, OutboxState.DEAD_LETTER, t0 + 60)
    pending = Case(store, config, 3, t0)
    pending.settle(store, OutboxState.PENDING, t0 + 60)
    recent = Case(store, config, 4, t0 + 10 * DAY_S)
    recent.settle(store, OutboxState.SENT, t0 + 10 * DAY_S)
    retention = Retention(config, store)

    first = retention.run_once(t0 + 8 * DAY_S)
    assert first["spool_files"] == 2 and first["instances"] == 2
    assert first["results_folders"] == 1 and first["jobs"] == 0
    assert not any(p.exists() for p in delivered.spooled) and not delivered.results.exists()
    assert not delivered.spooled[0].parent.exists()  # the emptied series folder too
    for kept in (dead, pending, recent):
        assert all(p.exists() for p in kept.spooled) and kept.results.is_dir()

    admin = DeliveryAdmin(store)
    assert admin.discard_deliveries(Selection(ids=(dead.outbox_id,)), t0) == [dead.outbox_id]
    second = retention.run_once(t0 + 8 * DAY_S)
    assert second["spool_files"] == 2 and second["results_folders"] == 1
    assert not any(p.exists() for p in dead.spooled)
    assert all(p.exists() for p in pending.spooled)  # still waiting to be sent

    third = retention.run_once(t0 + 31 * DAY_S)
    # The recent case's spool and results are over 7 days old now; the rows of the two
    # settled old jobs and their series are over 30 days old.
    assert (third["spool_files"], third["results_folders"]) == (2, 1)
    assert (third["jobs"], third["outbox_items"], third["series"]) == (2, 2, 2)
    fourth = retention.run_once(t0 + 41 * DAY_S)
    assert (fourth["jobs"], fourth["outbox_items"], fourth["series"]) == (1, 1, 1)
    remaining = {job.id for job in JobQueue(store).all()}
    assert remaining == {pending.job_id}
    assert [i.id for i in OutboxStore(store).items()] == [pending.outbox_id]
    totals = retention.totals()
    assert totals["spool_files"] == 6 and totals["results_folders"] == 3 and totals["jobs"] == 3
    assert totals["spool_bytes"] > 0
    store.close()


def _no_results(spec: JobSpec) -> list[Path]:
    out = spec.output_dir / "CT-copy.dcm"
    ds = pydicom.dcmread(spec.instance_paths[0])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(out)
    return [out]


def test_serving_node_runs_retention_and_exports_the_counts(tmp_path: Path) -> None:
    """Ages of zero: once delivered, the spool and results go at the next pass."""
    http_port = free_port()
    config = default_config(tmp_path, free_port()).model_copy(
        update={
            "http": HttpSettings(port=http_port),
            "stable_age_s": 0.3,
            "poll_interval_s": 0.1,
            "retention": RetentionSettings(
                interval_s=0.5, spool_age_h=0, results_age_h=0, state_age_h=None
            ),
        }
    )
    files = write_series(synthetic_head_ct(seed=7, n_slices=3, rows=64), tmp_path / "in")
    with storage_scp(config.destinations["PACS"].port) as pacs, Node(config, _no_results) as node:
        target = config.destinations["PACS"].model_copy(
            update={"ae_title": "DICOMNODE", "port": config.node.port}
        )
        assert all(r.status == 0 for r in send_files(target, files, "STORESCU").values())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            len(pacs.received) == 1 and spool_is_empty(config.spool_dir)
        ):
            time.sleep(0.1)
        assert len(pacs.received) == 1 and spool_is_empty(config.spool_dir)
        assert node.jobs.all()[0].state is JobState.DONE
        time.sleep(0.6)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert 'dicomnode_retention_deleted_total{kind="spool_files"} 3.0' in metrics
        assert 'dicomnode_retention_deleted_total{kind="results_folders"} 1.0' in metrics
