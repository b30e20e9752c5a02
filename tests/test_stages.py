"""Where a job's time goes: the stage timer's accounting, and a real node recording each
job's split in its state and exposing it as Prometheus metrics."""

from __future__ import annotations

import itertools
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode.config import HttpSettings, NodeConfig
from dicomnode.node import Node
from dicomnode.processing import processor, reporting
from dicomnode.records import JobState
from pipelines.stages import STAGES, StageTimer, charged_to, recording, stage
from pipelines.synthetic import insert_lesion, synthetic_head_ct, write_series
from tests.orthanc import Orthanc
from tests.pacs_reports import node_config, storescu, wait_for, wait_jobs_finished
from tests.support import free_port


def test_nested_stages_are_charged_once_to_the_innermost() -> None:
    ticks = itertools.count()
    timer = StageTimer(clock=lambda: float(next(ticks)))  # every reading: one second later
    with recording(timer), stage("other"):  # 0
        with stage("segmentation"):  # 1
            pass  # 2
        with stage("model"), stage("features"):  # 3, 4
            pass  # 5: features closed, 6: model closed
        # 7: other closed
    seconds = timer.seconds()
    assert set(seconds) == set(STAGES)
    assert seconds == {
        **dict.fromkeys(STAGES, 0.0),
        "segmentation": 1.0, "features": 1.0, "model": 2.0, "other": 3.0,
    }  # fmt: skip
    assert sum(seconds.values()) == 7.0  # the wall time from first to last reading


def test_stages_outside_a_recording_cost_nothing_and_unknown_ones_fail() -> None:
    @charged_to("features")
    def describe(x: int) -> int:
        return x + 1

    assert describe(1) == 2  # no timer records: a plain call
    timer = StageTimer()
    with recording(timer), stage("load"):
        assert describe(2) == 3
    assert timer.seconds()["features"] > 0.0
    with recording(timer):  # another thread does not report to this thread's timer
        worker = threading.Thread(target=_model_elsewhere)
        worker.start()
        worker.join()
    assert timer.seconds()["model"] == 0.0
    with pytest.raises(ValueError, match="unknown stage 'sending'"), timer.stage("sending"):  # type: ignore[arg-type]
        pass


def test_seconds_timed_elsewhere_add_up_and_bad_ones_are_refused() -> None:
    timer = StageTimer()
    timer.add({"load": 1.5, "segmentation": 2.0})
    timer.add({"load": 0.5})
    assert timer.seconds() == {**dict.fromkeys(STAGES, 0.0), "load": 2.0, "segmentation": 2.0}
    with pytest.raises(ValueError, match="unknown stage"):
        timer.add({"sending": 1.0})
    with pytest.raises(ValueError, match="not a duration"):
        timer.add({"load": 1.0, "model": float("nan")})
    assert timer.seconds()["load"] == 2.0  # a refused split adds nothing


def _model_elsewhere() -> None:
    """A stage on a thread where no timer records."""
    with stage("model"):
        time.sleep(0.01)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc-stages"))
    pacs.start()
    yield pacs
    pacs.stop()


def _config(base: Path, pacs: Orthanc) -> NodeConfig:
    http = HttpSettings(host="127.0.0.1", port=free_port())
    return node_config(base, pacs).model_copy(update={"http": http})


def test_a_job_records_its_stage_split(orthanc: Orthanc, tmp_path: Path) -> None:
    """Every stage is recorded for the job, the load, segmentation and writers took
    time, the stages add up to at most the job's own time, and /metrics shows them with
    the sending stage (job finished to last result delivered)."""
    datasets = synthetic_head_ct(seed=61, n_slices=16, rows=64)
    insert_lesion(datasets, center_mm=None, radius_mm=12.0, hu=70.0, seed=61)
    files = write_series(datasets, tmp_path / "series")
    config = _config(tmp_path / "node", orthanc)
    with Node(config, processor(config), reporting()) as node:
        storescu(node, files)
        wait_jobs_finished(node, 1)
        (job,) = node.jobs.all()
        assert job.state is JobState.DONE
        assert node.store is not None
        with node.store.transaction() as db:
            started, finished = db.execute(
                "SELECT started_at, finished_at FROM jobs WHERE id = ?", (job.id,)
            ).fetchone()
        seconds = node.jobs.stages(job.id)
        assert set(seconds) == set(STAGES)
        assert all(value >= 0.0 for value in seconds.values())
        assert seconds["load"] > 0 and seconds["segmentation"] > 0 and seconds["writers"] > 0
        assert sum(seconds.values()) <= finished - started
        assert config.http is not None
        url = f"http://127.0.0.1:{config.http.port}/metrics"

        def sent() -> bool:
            return 'stage="sending"' in urllib.request.urlopen(url, timeout=5).read().decode()

        wait_for(sent, 30.0, "the sending stage in /metrics")
        metrics = urllib.request.urlopen(url, timeout=5).read().decode()
    for name in (*STAGES, "sending"):
        label = f'dicomnode_job_stage_seconds_count{{pipeline="hyperdense_regions",stage="{name}"}}'
        assert f"{label} 1.0" in metrics
