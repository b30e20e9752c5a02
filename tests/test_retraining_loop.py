"""The whole retraining loop through a real node (issue 10's first "must show").

A node process (``python -m dicomnode.cli serve``) routes head CT to ``ht_after_mt`` and
keeps its cases (``[case_store]``). DCMTK storescu sends generated baseline CTs and
their follow-up CTs (``pipelines.followup.pairs``); the retraining service derives the
HT labels from the follow-ups, trains and judges candidates:

1. ``retrain --now`` on the first 8 patients: the candidate fails the gate (too few
   held-out events);
2. 8 more patients, then the scheduled service (a cron firing a few seconds later): the
   candidate passes and goes into shadow;
3. shadow period: the next case's SR comes from the version in service, the shadow's
   risk is recorded, nothing of it is sent;
4. ``models promote``: the running node's next SR carries the new version;
5. ``models rollback``: the next SR carries the old one again;
6. both run reports exist and hold their plots.

The cohort: two baseline images (a hyperdensity of 70 HU and one of 120 HU), each given
to several patients; at follow-up, it persists (HT) in 6 of 8 patients of the first and 2
of 8 of the second. Identical images give identical features, so a held-out set cannot be
perfectly separated (the gate cannot fit a calibration slope to a separated set) and the
model can still learn the difference.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode.case_store import list_cases
from dicomnode.labels import labels
from dicomnode.node import FOLLOW_UP_MARKER
from dicomnode.shadow import read_records
from model_store.lifecycle import read_gate
from model_store.registry import STORE_ROOT, list_versions, promoted_version
from pipelines.followup.pairs import PairKind, generate_pair
from pipelines.ht_after_mt.clinical import TABLE_VARIABLES
from pipelines.retraining.report import FIGURES, REPORT_HTML
from tests.support import REPO_ROOT, free_port, storescu

pytestmark = pytest.mark.slow

MODEL = "ht_after_mt"
SERVICE = "1.1.0"  # the bundled version in service
SEEDS = {"blood-like": (31, 70.0), "stain-like": (32, 120.0)}
PHASE: list[tuple[str, PairKind]] = [
    *[("blood-like", k) for k in ("ht", "ht", "ht", "contrast")],
    *[("stain-like", k) for k in ("ht", "contrast", "contrast", "contrast")],
]  # one phase: 8 patients; two phases: 6 of 8 and 2 of 8 persist
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLINICAL = {name: "0" for name in TABLE_VARIABLES} | {
    "nihss": "12", "aspects": "8", "glucose_mmol_l": "7.1",
    "onset_to_recanalisation_min": "300", "pass_number": "1",
}  # fmt: skip
JOB_TIMEOUT_S = 240.0
RETRAIN_TIMEOUT_S = 300.0


def _identity(datasets: list[Dataset], patient: int, study: str) -> list[Dataset]:
    """Copies of ``datasets`` as patient ``patient``'s study ``study`` (new UIDs)."""
    study_uid = generate_uid(entropy_srcs=["loop", str(patient), study])
    series_uid = generate_uid(entropy_srcs=["loop", str(patient), study, "series"])
    out = []
    for index, original in enumerate(datasets):
        ds = copy.deepcopy(original)
        ds.PatientID, ds.PatientName = f"LOOP-{patient:03d}", f"LOOP^PATIENT{patient}"
        ds.PatientAge, ds.PatientSex = "070Y", "M"
        ds.AccessionNumber = f"LP{patient:03d}{study}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["loop", str(patient), study, str(index)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(ds)
    return out


def _write(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for index, ds in enumerate(datasets):
        path = folder / f"{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _series(base: Path, patient: int, group: str, kind: PairKind) -> tuple[list[Path], list[Path]]:
    """The baseline and follow-up files of one patient."""
    seed, hu = SEEDS[group]
    pair = generate_pair(seed, kind, baseline_hu=hu)
    return (
        _write(_identity(pair.baseline, patient, "B"), base / f"p{patient:03d}" / "baseline"),
        _write(_identity(pair.followup, patient, "F"), base / f"p{patient:03d}" / "followup"),
    )


def _jobs_done(http_port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except (urllib.error.URLError, OSError):
        return -1
    assert 'dicomnode_jobs{state="failed"}' not in text or (
        'dicomnode_jobs{state="failed"} 0.0' in text
    ), text
    for line in text.splitlines():
        if line.startswith('dicomnode_jobs{state="done"}'):
            return int(float(line.split()[-1]))
    return 0


def _wait_jobs(http_port: int, node: subprocess.Popen[str], count: int, state: Path) -> None:
    """Wait for ``count`` jobs done and their follow-ups (case store, shadow run) ended."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        assert node.poll() is None, "the node exited"
        following = list((state / "results").glob(f"*/{FOLLOW_UP_MARKER}"))
        if _jobs_done(http_port) >= count and not following:
            return
        time.sleep(0.3)
    raise AssertionError(f"the node did not finish {count} jobs")


def _sr_versions(results: Path) -> dict[str, str]:
    """StudyInstanceUID -> SoftwareVersions of its risk SR (one job per study)."""
    found = {}
    for path in results.rglob("SR-*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found[str(ds.StudyInstanceUID)] = str(ds.SoftwareVersions)
    return found


def _study(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def _config(base: Path, port: int, http_port: int, store: Path, schedule: str) -> Path:
    table = base / "clinical.csv"
    if not table.exists():
        header = ["AccessionNumber", *CLINICAL]
        lines = [",".join(header)]
        for patient in range(60):
            for study in ("B", "F"):
                lines.append(",".join([f"LP{patient:03d}{study}", *CLINICAL.values()]))
        table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = base / "node.toml"
    path.write_text(
        f"""spool_dir = "spool"
state_dir = "state"
stable_age_s = 0.5
poll_interval_s = 0.1

[node]
ae_title = "DICOMNODE"
host = "127.0.0.1"
port = {port}

[http]
host = "127.0.0.1"
port = {http_port}

[[allowed_callers]]
ae_title = "STORESCU"
host = "127.0.0.1"

[[routes]]
name = "head-ct"
pipeline = "ht_after_mt"

[routes.match]
modality = ["CT"]

[pipelines.ht_after_mt]
model_store_dir = "{store}"
clinical_table = "{table}"
# 96 px generated heads are below the U-Net's training sizes (192/256 px)
segmenter = "hyperdense_regions"

[case_store]
folder = "cases"
salt = "loop-test-salt-0123456789"

[retraining]
schedule = "{schedule}"
use_case_store = true
model_store_dir = "{store}"
epochs = 1
test_size = 0.5
min_events = 3
margin = 0.5
slope_min = 0.05
slope_max = 100.0
on_pass = "shadow"
""",
        encoding="utf-8",
    )
    return path


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", *argv],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=RETRAIN_TIMEOUT_S,
        check=False,
    )  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, int, int]]:
    """A running node with a copy of the bundled model store (1.1.0 in service)."""
    store = tmp_path / "store"
    shutil.copytree(STORE_ROOT / MODEL / SERVICE, store / MODEL / SERVICE)
    (store / MODEL / "promoted.json").write_text(json.dumps({"version": SERVICE}) + "\n")
    port, http_port = free_port(), free_port()
    config = _config(tmp_path, port, http_port, store, "0 3 * * 0")
    log = (tmp_path / "node.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
        cwd=REPO_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while _jobs_done(http_port) < 0:
            assert process.poll() is None and time.monotonic() < deadline, "node did not start"
            time.sleep(0.3)
        yield process, config, port, http_port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_the_whole_retraining_loop_through_a_real_node(
    node: tuple[subprocess.Popen[str], Path, int, int], tmp_path: Path
) -> None:
    process, config, port, http_port = node
    base, store = config.parent, config.parent / "store"
    results, state = base / "state" / "results", base / "state"
    patients = iter(range(1, 60))
    sent = 0

    def send_phase() -> None:
        nonlocal sent
        for group, kind in PHASE:
            baseline, followup = _series(tmp_path / "dicom", next(patients), group, kind)
            storescu(port, baseline)
            storescu(port, followup)
            sent += 2
        _wait_jobs(http_port, process, sent, state)

    # 1. the first 8 patients, a retrain now: too few held-out events
    send_phase()
    assert len(list_cases(base / "cases")) == sent
    first = _cli("retrain", "--config", str(config), "--now")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "failed the gate -> candidate" in first.stdout, first.stdout
    failed = list_versions(MODEL, store)[-1]
    gate = read_gate(MODEL, failed, store)
    assert gate is not None and not gate.passed
    assert any("too few held-out events" in reason for reason in gate.reasons), gate.reasons
    derived = [label for label in labels(state) if label.outcome == "ht"]
    assert len(derived) == 8 and {label.source for label in derived} == {"derived"}
    assert sorted(label.value for label in derived) == [0] * 4 + [1] * 4
    assert promoted_version(MODEL, store) == SERVICE

    # 2. 8 more patients; the scheduled service's run passes the gate -> shadow
    send_phase()
    fire = datetime.now(UTC) + timedelta(seconds=8)
    scheduled = _config(
        base, port, http_port, store, f"{fire.second} {fire.minute} {fire.hour} * * *"
    )
    service = subprocess.Popen(
        [sys.executable, "-m", "dicomnode.cli", "retrain", "--config", str(scheduled)],
        cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + RETRAIN_TIMEOUT_S
        while time.monotonic() < deadline and list_versions(MODEL, store)[-1] == failed:
            time.sleep(1.0)
        candidate = list_versions(MODEL, store)[-1]
        while time.monotonic() < deadline and read_gate(MODEL, candidate, store) is None:
            time.sleep(1.0)
        while (
            time.monotonic() < deadline
            and not (base / "state" / "retraining" / MODEL / candidate).is_dir()
        ):
            time.sleep(1.0)
    finally:
        service.send_signal(signal.SIGTERM)
        _, service_log = service.communicate(timeout=60)
    gate = read_gate(MODEL, candidate, store)
    assert candidate != failed and gate is not None, service_log[-3000:]
    assert gate.passed, (gate.reasons, gate.metrics)
    assert gate.metrics["service_version"] == SERVICE and gate.metrics["events"] >= 3
    listed = _cli("models", "list", "--config", str(config)).stdout
    assert f"{candidate}" in listed and "shadow" in listed, listed

    # 3. shadow: the version in service reports, the candidate's risk is only recorded
    shadow_case, _ = _series(tmp_path / "dicom", next(patients), "blood-like", "ht")
    storescu(port, shadow_case)
    sent += 1
    _wait_jobs(http_port, process, sent, state)
    shadow_series = str(pydicom.dcmread(shadow_case[0]).SeriesInstanceUID)
    records = read_records(state, MODEL)
    assert [(r["series_uid"], r["shadow"], r["in_service"]) for r in records] == [
        (shadow_series, candidate, SERVICE)
    ]
    versions = _sr_versions(results)
    assert versions[_study(shadow_case)] == SERVICE and candidate not in versions.values()

    # 4. promotion, picked up by the running node
    promoted = _cli("models", "promote", candidate, "--config", str(config), "--by", "tester")
    assert promoted.returncode == 0, promoted.stderr
    promoted_case, _ = _series(tmp_path / "dicom", next(patients), "blood-like", "ht")
    storescu(port, promoted_case)
    sent += 1
    _wait_jobs(http_port, process, sent, state)
    assert _sr_versions(results)[_study(promoted_case)] == candidate

    # 5. rollback, picked up too
    back = _cli("models", "rollback", "--config", str(config), "--by", "tester")
    assert back.returncode == 0 and SERVICE in back.stdout, back.stderr
    rolled_case, _ = _series(tmp_path / "dicom", next(patients), "stain-like", "contrast")
    storescu(port, rolled_case)
    sent += 1
    _wait_jobs(http_port, process, sent, state)
    assert _sr_versions(results)[_study(rolled_case)] == SERVICE

    # 6. both reports exist and hold their plots
    for version in (failed, candidate):
        report = base / "state" / "retraining" / MODEL / version
        html = (report / REPORT_HTML).read_text(encoding="ascii")
        for name in FIGURES:
            assert (report / name).read_bytes()[:8] == PNG_MAGIC and name in html
    # nothing in the case store names a patient or study
    names = " ".join(str(p.relative_to(base / "cases")) for p in (base / "cases").rglob("*"))
    texts = " ".join(p.read_text() for p in (base / "cases").rglob("case.json"))
    assert "LOOP" not in names + texts and "LP0" not in names + texts
