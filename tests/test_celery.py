"""Scale-out on Celery with a real Redis broker (Debian's ``redis-server``) and real
``dicomnode worker`` processes: a worker killed mid-job leaves its job to another worker,
which completes it exactly once; jobs spread over two workers; a job that fails on a
worker reaches PACS as a failure notice, as it does in-process; a worker's job records
its stage split on the node, with the node's own side of it (dispatch, broker, transfer,
result), and, with ``[case_store]`` on the node, its case record, which a node stopped
before storing it gets again from a worker at its next start; the shadow version of the
model the worker's store names runs on a worker after the results are acknowledged, and
its prediction is recorded on the node as in-process (also after a restart), while a
shadow that fails on the worker is logged and leaves the job done."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import redis
import structlog
from pydicom.dataset import Dataset

from dicomnode.case_store import list_cases, load_record, save_arrays, study_key
from dicomnode.config import NodeConfig
from dicomnode.distributed import (
    PayloadError,
    celery_processor,
    pack_files,
    unpack_case,
    unpack_files,
)
from dicomnode.node import FOLLOW_UP_MARKER, JobSpec, Node, write_follow_up_marker
from dicomnode.processing import reporting
from dicomnode.records import JobState
from dicomnode.shadow import read_records, run_shadow
from model_store.lifecycle import set_shadow
from model_store.registry import STORE_ROOT
from pipelines.followup.pairs import generate_pair
from pipelines.outputs.sr import RISK_PROBABILITY
from pipelines.settings import PipelinesSettings
from pipelines.synthetic import synthetic_head_ct, write_series
from tests.orthanc import Orthanc
from tests.pacs_reports import node_config, storescu, wait_for
from tests.scp import storage_scp
from tests.support import free_port, require_tool

REPO = Path(__file__).resolve().parents[1]
VISIBILITY_TIMEOUT_S = 3.0
NODE_SIDE = ("dispatch", "broker", "transfer", "result")  # the stages of scale-out
MODEL, SERVICE, SHADOW = "ht_after_mt", "1.1.0", "1.0.0"


@pytest.fixture()
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A throw-away Redis on a free loopback port, persisting nothing."""
    executable = require_tool("redis-server", "redis-server")
    port = free_port()
    process = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(host="127.0.0.1", port=port)
    wait_for(lambda: _pings(client), 20, "redis-server to answer")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    """Whether Redis answers PING."""
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc-celery"))
    pacs.start()
    yield pacs
    pacs.stop()


def _config(
    base: Path,
    pacs: Orthanc,
    broker: str,
    extra: dict[str, object] | None = None,
    store: Path | None = None,
) -> tuple[NodeConfig, Path]:
    """The node's config in Celery mode (with ``extra`` sections), and the same config as
    a TOML file for workers (the risk pipeline on the threshold segmenter, its model in
    ``store`` when given; no case store)."""
    data = {**node_config(base, pacs).model_dump(mode="json"), **(extra or {})}
    data["worker"] = {"threads": 4}  # jobs in flight at once, each waiting on a worker
    data["celery"] = {
        "broker_url": broker, "visibility_timeout_s": VISIBILITY_TIMEOUT_S, "job_timeout_s": 120,
    }  # fmt: skip
    config = NodeConfig.model_validate(data)
    toml = base / "worker.toml"
    base.mkdir(parents=True, exist_ok=True)
    toml.write_text(
        f'spool_dir = "{base / "worker-spool"}"\nstate_dir = "{base / "worker-state"}"\n'
        '[[allowed_callers]]\nae_title = "STORESCU"\nhost = "127.0.0.1"\n'
        f'[celery]\nbroker_url = "{broker}"\nvisibility_timeout_s = {VISIBILITY_TIMEOUT_S}\n'
        '[pipelines.ht_after_mt]\nsegmenter = "hyperdense_regions"\n'
        + ("" if store is None else f'model_store_dir = "{store}"\n')
    )
    return config, toml


class Worker:
    """One ``dicomnode worker`` process (own process group), logging into a file."""

    def __init__(self, toml: Path, name: str, folder: Path) -> None:
        """Start the worker ``name`` on the config ``toml``."""
        self.log = folder / f"{name}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dicomnode.cli", "worker", "--config", str(toml),
                 "--hostname", f"{name}@dicomnode-test"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )  # fmt: skip

    def said(self, text: str) -> bool:
        """Whether the worker's log holds ``text``."""
        return text in self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the worker and everything it started, as a host that dies."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def _series(seed: int) -> list[Dataset]:
    """A small synthetic head CT of its own patient and study."""
    return synthetic_head_ct(seed=seed, n_slices=8, rows=64)


def test_a_killed_workers_job_completes_on_another_exactly_once(
    tmp_path: Path, orthanc: Orthanc, redis_url: str
) -> None:
    config, toml = _config(tmp_path / "node", orthanc, redis_url)
    sources = _series(71)
    first = Worker(toml, "first", tmp_path)
    second: Worker | None = None
    try:
        with Node(config, celery_processor(config), reporting()) as node:
            storescu(node, write_series(sources, tmp_path / "in"))
            wait_for(lambda: first.said("remote job started"), 90, "the first worker's start")
            first.kill()
            assert not first.said("remote job done")
            time.sleep(VISIBILITY_TIMEOUT_S + 0.5)  # the message becomes visible again
            second = Worker(toml, "second", tmp_path)
            wait_for(lambda: node.is_idle() and bool(node.outbox.items()), 120, "the job")
            [job] = node.jobs.all()
            assert job.state == JobState.DONE
            assert second.said("remote job done")
            items = node.outbox.items()
            assert len(items) == 3  # SEG, SC, SR: the result was consumed once
            study = str(sources[0].StudyInstanceUID)
            stored = [t for t in orthanc.instances() if t.get("StudyInstanceUID") == study]
            assert len(stored) == 3
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_jobs_spread_over_two_workers_and_failures_reach_pacs(
    tmp_path: Path, orthanc: Orthanc, redis_url: str
) -> None:
    config, toml = _config(tmp_path / "node", orthanc, redis_url)
    good = [_series(80 + i) for i in range(4)]
    unloadable = _series(90)
    for ds in unloadable:
        del ds.ImagePositionPatient
    workers = [Worker(toml, name, tmp_path) for name in ("left", "right")]
    try:
        for worker in workers:
            wait_for(lambda w=worker: w.said("celery worker ready"), 90, "the workers to be ready")
        with Node(config, celery_processor(config), reporting()) as node:
            for index, datasets in enumerate([*good, unloadable]):
                storescu(node, write_series(datasets, tmp_path / f"in{index}"))
            wait_for(lambda: len(node.jobs.all()) == 5 and node.is_idle(), 180, "all five jobs")
            states = sorted(job.state for job in node.jobs.all())
            assert states == [JobState.DONE] * 4 + [JobState.FAILED]
            [failed] = [job for job in node.jobs.all() if job.state == JobState.FAILED]
            assert "series cannot be loaded" in str(failed.reason)
            assert all(w.said("remote job done") for w in workers)
            study = str(unloadable[0].StudyInstanceUID)
            notices = [t for t in orthanc.instances() if t.get("StudyInstanceUID") == study]
            assert len(notices) == 2  # the "analysis not performed" SR and SC
    finally:
        for worker in workers:
            worker.kill()


def _sr_probability(path: Path) -> float:
    """The risk probability (0-1) in an SR's content tree."""
    found: list[float] = []

    def walk(items: Sequence[Dataset]) -> None:
        for item in items:
            names = item.get("ConceptNameCodeSequence")
            if (
                item.get("ValueType") == "NUM"
                and names
                and names[0].CodeValue == RISK_PROBABILITY.value
            ):
                found.append(float(item.MeasuredValueSequence[0].NumericValue) / 100.0)
            walk(item.get("ContentSequence", []))

    walk(pydicom.dcmread(path).ContentSequence)
    assert found, "the SR holds no risk probability"
    return found[0]


def test_a_workers_job_records_its_node_side_stages_and_its_case_on_the_node(
    tmp_path: Path, orthanc: Orthanc, redis_url: str
) -> None:
    cases = tmp_path / "node-cases"
    route = {"name": "ht", "match": {"modality": "CT"}, "pipeline": "ht_after_mt",
             "destinations": ["PACS"]}  # fmt: skip
    config, toml = _config(
        tmp_path / "node", orthanc, redis_url,
        {"routes": [route], "case_store": {"folder": str(cases), "salt": "celery-case-salt-16"},
         "pipelines": {"ht_after_mt": {"segmenter": "hyperdense_regions"}},
         "http": {"host": "127.0.0.1", "port": free_port()}},
    )  # fmt: skip
    baseline = generate_pair(5, "ht").baseline
    worker = Worker(toml, "cases", tmp_path)
    try:
        with Node(config, celery_processor(config), reporting()) as node:
            storescu(node, write_series(baseline, tmp_path / "in"))
            wait_for(lambda: node.is_idle() and bool(node.outbox.items()), 90, "the job")
            [job] = node.jobs.all()
            assert job.state == JobState.DONE
            stages = node.jobs.stages(job.id)
            for name in ("load", "segmentation", "writers", *NODE_SIDE):
                assert stages[name] > 0.0, stages
            assert node.store is not None
            with node.store.transaction() as db:
                started, finished = db.execute(
                    "SELECT started_at, finished_at FROM jobs WHERE id = ?", (job.id,)
                ).fetchone()
            assert sum(stages.values()) <= finished - started + 0.01  # two clocks' rounding
            assert config.http is not None
            metrics = (
                urllib.request.urlopen(f"http://127.0.0.1:{config.http.port}/metrics", timeout=5)
                .read()
                .decode()
            )
            [sr] = [p for p in (tmp_path / "node").rglob("SR-*.dcm")]
            probability = _sr_probability(sr)
            sent = len(node.outbox.items())
            spec = JobSpec(
                job.id, job.series_instance_uid, job.study_instance_uid, job.pipeline,
                job.rule, tuple(node.store.series_paths(job.series_instance_uid)),
                job.destinations, config.state_dir / "results" / str(job.id),
            )  # fmt: skip
        [case] = list_cases(cases)
        assert case.key == study_key(str(baseline[0].StudyInstanceUID), "celery-case-salt-16")
        assert case.scored and case.prediction is not None
        # the SR's percentage has 3 decimals (``ds_value``): 5e-6 as a probability
        assert case.prediction["probability"] == pytest.approx(probability, abs=5.1e-6)
        assert load_record(cases, case.key).arrays["volume_hu"].dtype.name == "int16"
        assert not any((tmp_path / "worker-state").rglob("case.json"))  # nothing kept there
        for name in NODE_SIDE:  # the node's side of a Celery job, exported like the others
            label = f'dicomnode_job_stage_seconds_count{{pipeline="ht_after_mt",stage="{name}"}}'
            assert f"{label} 1.0" in metrics

        # What a node killed after the job, before its follow-up (the case store write),
        # leaves: the job done, its results sent, the follow-up's marker, no case. The
        # next start asks the worker for the job again, keeps only its case record.
        shutil.rmtree(cases)
        write_follow_up_marker(spec)
        with Node(config, celery_processor(config), reporting()) as node:
            wait_for(lambda: node.is_idle(), 90, "the follow-up")
            assert [j.state for j in node.jobs.all()] == [JobState.DONE]
            assert len(node.outbox.items()) == sent  # nothing queued again
        [again] = list_cases(cases)
        assert again.key == case.key and again.prediction == case.prediction
        assert not (spec.output_dir / FOLLOW_UP_MARKER).exists()
        study = str(baseline[0].StudyInstanceUID)
        assert len([t for t in orthanc.instances() if t.get("StudyInstanceUID") == study]) == sent
    finally:
        worker.kill()


def test_a_damaged_file_in_a_message_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "a.dcm"
    source.write_bytes(b"DICM" * 100)
    [packed] = pack_files([source])
    assert unpack_files([packed], tmp_path / "ok")[0].read_bytes() == source.read_bytes()
    with pytest.raises(PayloadError, match="SHA-256"):
        unpack_files([{**packed, "sha256": "0" * 64}], tmp_path / "bad")
    with pytest.raises(PayloadError, match="plain"):
        unpack_files([{**packed, "name": "../escape.dcm"}], tmp_path / "bad")


def test_a_returned_case_record_round_trips_and_a_damaged_one_is_refused() -> None:
    buffer = io.BytesIO()
    volume = np.arange(4 * 6 * 5, dtype=np.int16).reshape(4, 6, 5)
    save_arrays(buffer, {"volume_hu": volume})
    blob = buffer.getvalue()
    packed = {
        "arrays": base64.b64encode(blob).decode("ascii"),
        "arrays_sha256": hashlib.sha256(blob).hexdigest(),
        "features": {"clinical": {"age": 70.0}},
        "inputs": {"version": "x"},
    }
    record = unpack_case(packed)
    assert np.array_equal(record.arrays["volume_hu"], volume)
    assert record.features == {"clinical": {"age": 70.0}}
    with pytest.raises(PayloadError, match="SHA-256"):
        unpack_case({**packed, "arrays_sha256": "0" * 64})


def _shadow_store(folder: Path) -> Path:
    """A model store of ``ht_after_mt``: SERVICE in service, SHADOW in shadow."""
    for version in (SERVICE, SHADOW):
        shutil.copytree(STORE_ROOT / MODEL / version, folder / MODEL / version)
    (folder / MODEL / "promoted.json").write_text(json.dumps({"version": SERVICE}) + "\n")
    set_shadow(MODEL, SHADOW, folder, by="test")
    return folder


def _shadow_config(
    base: Path, orthanc: Orthanc, broker: str, store: Path, pacs_port: int
) -> tuple[NodeConfig, Path]:
    """A Celery node routing CT to ``ht_after_mt`` and sending to the SCP on
    ``pacs_port``; only its workers read ``store`` (the node's own store has no shadow)."""
    route = {"name": "ht", "match": {"modality": "CT"}, "pipeline": MODEL,
             "destinations": ["PACS"]}  # fmt: skip
    pacs = {"PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}}
    extra = {"routes": [route], "destinations": pacs,
             "pipelines": {MODEL: {"segmenter": "hyperdense_regions"}}}  # fmt: skip
    return _config(base, orthanc, broker, extra, store=store)


def test_the_shadow_runs_on_a_worker_after_the_results_and_is_recorded_on_the_node(
    tmp_path: Path, orthanc: Orthanc, redis_url: str
) -> None:
    store = _shadow_store(tmp_path / "store")
    pacs_port = free_port()
    config, toml = _shadow_config(tmp_path / "node", orthanc, redis_url, store, pacs_port)
    paths = write_series(generate_pair(31, "ht", baseline_hu=70.0).baseline, tmp_path / "in")
    shadowed: list[bool] = []  # at each acknowledged result: did the shadow line exist?

    def observe(_: Dataset) -> None:
        shadowed.append(bool(read_records(config.state_dir, MODEL)))

    worker = Worker(toml, "shadow", tmp_path)
    try:
        with (
            storage_scp(pacs_port, observe=observe) as pacs,
            Node(config, celery_processor(config), reporting()) as node,
        ):
            storescu(node, paths)
            wait_for(lambda: bool(read_records(config.state_dir, MODEL)), 120, "the shadow line")
            wait_for(node.is_idle, 30, "the node to be idle")
            [job] = node.jobs.all()
            assert job.state == JobState.DONE
            assert shadowed == [False] * len(pacs.received) and len(pacs.received) >= 3
            assert node.store is not None
            spec = JobSpec(
                job.id, job.series_instance_uid, job.study_instance_uid, job.pipeline,
                job.rule, tuple(node.store.series_paths(job.series_instance_uid)),
                job.destinations, config.state_dir / "results" / str(job.id),
            )  # fmt: skip
            sent = len(pacs.received)
        [record] = read_records(config.state_dir, MODEL)
        assert (record["shadow"], record["in_service"]) == (SHADOW, SERVICE)
        assert worker.said("shadow run done")
        assert not (tmp_path / "node" / "worker-state" / "shadow").exists()

        # The same shadow run in-process, on the same series: the same line but its time.
        pipelines = PipelinesSettings.model_validate(
            {MODEL: {"model_store_dir": str(store), "segmenter": "hyperdense_regions"}}
        )
        local = config.model_copy(
            update={"state_dir": tmp_path / "in-process", "pipelines": pipelines}
        )
        in_process = run_shadow(local, MODEL, paths)
        assert in_process is not None and read_records(local.state_dir, MODEL) == [in_process]
        assert {k: v for k, v in record.items() if k != "at"} == {
            k: v for k, v in in_process.items() if k != "at"
        }

        # A node killed after the job, before its follow-up: its next start sends the
        # shadow task (the series again, from the spool), once; nothing is sent again.
        shutil.rmtree(config.state_dir / "shadow")
        write_follow_up_marker(spec)
        with (
            storage_scp(pacs_port) as pacs,
            Node(config, celery_processor(config), reporting()) as node,
        ):
            wait_for(lambda: not (spec.output_dir / FOLLOW_UP_MARKER).exists(), 120, "follow-up")
            assert not pacs.received and len(node.outbox.items()) == sent
        [again] = read_records(config.state_dir, MODEL)
        assert {k: v for k, v in again.items() if k != "at"} == {
            k: v for k, v in record.items() if k != "at"
        }
    finally:
        worker.kill()


def test_a_shadow_that_fails_on_the_worker_is_logged_and_leaves_the_job_done(
    tmp_path: Path, orthanc: Orthanc, redis_url: str
) -> None:
    store = _shadow_store(tmp_path / "store")
    with (store / MODEL / SHADOW / "combined.skops").open("ab") as artefact:
        artefact.write(b"changed")  # no longer matches its manifest
    pacs_port = free_port()
    config, toml = _shadow_config(tmp_path / "node", orthanc, redis_url, store, pacs_port)
    worker = Worker(toml, "broken-shadow", tmp_path)
    try:
        with (
            structlog.testing.capture_logs() as logs,
            storage_scp(pacs_port) as pacs,
            Node(config, celery_processor(config), reporting()) as node,
        ):
            baseline = generate_pair(33, "ht", baseline_hu=70.0).baseline
            storescu(node, write_series(baseline, tmp_path / "in"))
            wait_for(lambda: any(e["event"] == "follow-up done" for e in logs), 120, "follow-up")
            [job] = node.jobs.all()
            assert job.state == JobState.DONE and len(pacs.received) >= 3
        [failed] = [e for e in logs if e["event"] == "shadow run failed"]
        assert failed["job_id"] == job.id and failed["shadow"] == SHADOW
        assert "combined.skops" in failed["reason"] and failed["reason"].startswith("on the worker")
        assert read_records(config.state_dir, MODEL) == []
        assert worker.said("shadow run failed")
    finally:
        worker.kill()
