"""A job's follow-up (the case store write and the shadow model's run) happens after its
results are queued for sending, never before; a node killed in between does it at its
next start, without sending the results again.

A real node process (``python -m dicomnode.cli serve``) routes a generated head CT with
a hyperdensity (``pipelines.followup.pairs``) to ``ht_after_mt`` with a ``[case_store]``
and a shadow version of its model; DCMTK storescu sends the series, and a pynetdicom SCP
(``tests.scp``) receives the results and notes, as it acknowledges each one, whether the
case record and the shadow record exist yet. A follow-up that a restarted node could not
end either (killed again) is dropped, and the node goes on with its jobs.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.case_store import list_cases
from dicomnode.node import FOLLOW_UP_MARKER
from dicomnode.shadow import read_records
from model_store.lifecycle import set_shadow
from model_store.registry import STORE_ROOT
from pipelines.followup.pairs import generate_pair
from tests.scp import storage_scp
from tests.support import (
    NodeStarter,
    as_new_series,
    free_port,
    node_toml,
    state_rows,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.slow

MODEL = "ht_after_mt"
SERVICE, SHADOW = "1.1.0", "1.0.0"
OWN_TOML = """
[pipelines.ht_after_mt]
model_store_dir = "{store}"
segmenter = "hyperdense_regions"  # 96 px generated heads are below the U-Net's sizes

[case_store]
folder = "cases"
salt = "follow-up-test-salt-0123"
"""


@dataclass
class Observations:
    """What the PACS saw at each acknowledgement: (time, case stored, shadow recorded)."""

    cases: Path
    state: Path
    seen: list[tuple[float, bool, bool]] = field(default_factory=list)

    def observe(self, _: Dataset) -> None:
        """Note whether the follow-up's records exist as a result is acknowledged."""
        stored = bool(list_cases(self.cases)) if self.cases.is_dir() else False
        self.seen.append((time.time(), stored, bool(read_records(self.state, MODEL))))


def write_config(base: Path, port: int, pacs_port: int) -> Path:
    """A node routing CT to ``ht_after_mt`` (a model store with a shadow) with a case
    store, sending to the PACS on ``pacs_port``."""
    store = base / "store"
    for version in (SERVICE, SHADOW):
        shutil.copytree(STORE_ROOT / MODEL / version, store / MODEL / version)
    (store / MODEL / "promoted.json").write_text(json.dumps({"version": SERVICE}) + "\n")
    set_shadow(MODEL, SHADOW, store, by="test")
    path = base / "node.toml"
    own = OWN_TOML.format(store=store)
    path.write_text(node_toml(port, MODEL, pacs_port=pacs_port, extra=own), encoding="utf-8")
    return path


@dataclass(frozen=True)
class Site:
    """A test's node (on free loopback ports) and where it keeps its log, state and cases."""

    port: int
    pacs_port: int
    config: Path
    log: Path
    state: Path
    cases: Path


@pytest.fixture
def site(tmp_path: Path) -> Site:
    """The node of :func:`write_config` in the test's folder."""
    port, pacs_port = free_port(), free_port()
    config = write_config(tmp_path, port, pacs_port)
    return Site(
        port, pacs_port, config, tmp_path / "node.log", tmp_path / "state", tmp_path / "cases"
    )


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    """A generated baseline head CT with a 70 HU hyperdensity (96 px, 16 slices)."""
    folder = tmp_path / "dicom"
    folder.mkdir()
    paths = []
    for index, ds in enumerate(generate_pair(31, "ht", baseline_hu=70.0).baseline):
        path = folder / f"{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def all_sent(state: Path) -> bool:
    """Whether a job is done and every outbox row is sent."""
    jobs = state_rows(state, "SELECT state FROM jobs")
    outbox = state_rows(state, "SELECT state FROM outbox")
    return (
        bool(jobs)
        and jobs[0]["state"] == "done"
        and bool(outbox)
        and all(row["state"] == "sent" for row in outbox)
    )


def test_results_reach_the_pacs_before_the_case_record_and_the_shadow_run(
    site: Site, series: list[Path], serve_node: NodeStarter
) -> None:
    state, cases, log = site.state, site.cases, site.log
    seen = Observations(cases, state)
    with storage_scp(site.pacs_port, observe=seen.observe) as pacs:
        node = serve_node(site.config, log)
        storescu(site.port, series)
        wait_for(lambda: bool(read_records(state, MODEL)), "no shadow record", node, log)
        wait_for(lambda: bool(list_cases(cases)), "no case record", node, log)
        received = len(pacs.received)
    assert received == len(state_rows(state, "SELECT id FROM outbox")) >= 3  # SEG, SC, SR at least
    assert [(stored, shadowed) for _, stored, shadowed in seen.seen] == [(False, False)] * received
    (record,) = read_records(state, MODEL)
    assert (record["shadow"], record["in_service"]) == (SHADOW, SERVICE)
    sr = next(ds for ds in pacs.received if ds.Modality == "SR")
    assert SERVICE in str(sr.SoftwareVersions)  # the version in service reports
    (case,) = list_cases(cases)
    assert case.pipeline == MODEL and case.prediction is not None
    assert not list((state / "results").glob(f"*/{FOLLOW_UP_MARKER}"))
    node.send_signal(signal.SIGTERM)
    assert node.wait(60) == 0


def test_a_node_killed_before_the_follow_up_ends_does_it_at_its_next_start(
    site: Site, series: list[Path], serve_node: NodeStarter
) -> None:
    state, cases, log = site.state, site.cases, site.log
    with storage_scp(site.pacs_port) as pacs:
        node = serve_node(site.config, log)
        storescu(site.port, series)
        wait_for(lambda: all_sent(state), "results not sent", node, log)
        assert not read_records(state, MODEL), "the shadow ran before the kill: too late"
        node.kill()  # SIGKILL: the follow-up (case record, shadow run) is cut short
        node.wait(30)
        (marker,) = (state / "results").glob(f"*/{FOLLOW_UP_MARKER}")
        sent_before = len(pacs.received)
        killed_at = time.time()

        again = serve_node(site.config, log)
        wait_for(lambda: not marker.exists(), "the follow-up did not run again", again, log)
        (case,) = list_cases(cases)
        (record,) = read_records(state, MODEL)
        time.sleep(1.0)  # an outbox that sent anything again would have done so by now
        received = len(pacs.received)
    assert case.stored_at.timestamp() > killed_at  # made again by the restarted node
    assert case.pipeline == MODEL and case.prediction is not None
    assert (record["shadow"], record["in_service"]) == (SHADOW, SERVICE)
    assert received == sent_before == len(state_rows(state, "SELECT id FROM outbox"))
    assert [row["state"] for row in state_rows(state, "SELECT state FROM jobs")] == ["done"]
    assert "case record made again after a restart" in log.read_text()
    again.send_signal(signal.SIGTERM)
    assert again.wait(60) == 0
    assert {str(pydicom.dcmread(p).StudyInstanceUID) for p in series} == {
        str(ds.StudyInstanceUID) for ds in pacs.received
    }


def test_a_follow_up_that_a_restarted_node_cannot_end_either_is_dropped(
    tmp_path: Path, site: Site, series: list[Path], serve_node: NodeStarter
) -> None:
    state, log = site.state, site.log
    with storage_scp(site.pacs_port) as pacs:
        node = serve_node(site.config, log)
        storescu(site.port, series)
        wait_for(lambda: all_sent(state), "results not sent", node, log)
        node.kill()
        node.wait(30)
        (marker,) = (state / "results").glob(f"*/{FOLLOW_UP_MARKER}")
        for attempt in range(2):  # killed during the follow-up it took up again, then started
            again = serve_node(site.config, log)
            if attempt == 0:
                wait_for(
                    lambda: "interrupted follow-up started" in log.read_text(),
                    "the follow-up was not taken up again", again, log,
                )  # fmt: skip
                again.kill()
                again.wait(30)
                assert marker.exists()
        wait_for(lambda: not marker.exists(), "the marker stayed", again, log)
        following = as_new_series(series, tmp_path / "next", "FOLLOW-2")
        storescu(site.port, following)  # the node goes on with its jobs
        wait_for(lambda: bool(read_records(state, MODEL)), "no shadow record", again, log)
        received = len(pacs.received)
    (record,) = read_records(state, MODEL)  # the second job's; the first one's was dropped
    assert record["series_uid"] == str(pydicom.dcmread(following[0]).SeriesInstanceUID)
    assert "follow-up dropped" in log.read_text()
    assert received == len(state_rows(state, "SELECT id FROM outbox")) >= 6  # both jobs', once
    assert [row["state"] for row in state_rows(state, "SELECT state FROM jobs")] == ["done", "done"]
    again.send_signal(signal.SIGTERM)
    assert again.wait(60) == 0
