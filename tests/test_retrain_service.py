"""The retraining service as its own process: ``dicomnode retrain --now`` killed with
SIGKILL while it writes its candidate leaves the version in service untouched and no
half-written version listed; the scheduled run (apscheduler, a 6-field cron) then
retrains on a small generated cohort, the gate refuses the candidate (too few held-out
events) with its reasons stored beside it, and the report holds its plots."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dicomnode.cli import main
from dicomnode.config import load_config
from dicomnode.retrain import serve
from dicomnode.shadow import read_records, run_shadow
from model_store.lifecycle import promote_version, read_audit, read_gate, version_statuses
from model_store.registry import (
    STORE_ROOT,
    ModelStoreError,
    list_versions,
    load_manifest,
    promoted_version,
    verified_files,
)
from pipelines.cohort import generate_cohort
from pipelines.registry import get_pipeline
from pipelines.retraining.report import FIGURES, REPORT_HTML
from tests.support import REPO_ROOT

MODEL = "ht_after_mt"
N_CASES, ROWS, SLICES, SEED = 16, 64, 12, 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KILL_TIMEOUT_S = 120.0


def write_config(base: Path, cohort: Path, store: Path, schedule: str) -> Path:
    """A node config with a [retraining] section for the small cohort."""
    path = base / "dicomnode.toml"
    path.write_text(
        f"""
spool_dir = "spool"
state_dir = "state"
[[allowed_callers]]
ae_title = "STORESCU"
[pipelines.ht_after_mt]
model_store_dir = "{store}"
[retraining]
schedule = "{schedule}"
cohort_dir = "{cohort}"
model_store_dir = "{store}"
epochs = 1
cnn_input_size = 32
test_size = 0.3
min_events = 10
on_pass = "shadow"
""",
        encoding="utf-8",
    )
    return path


def run_cli(*argv: str) -> int:
    """The CLI's exit status (its output goes to the captured stdout)."""
    return main(list(argv))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated HT cohort (64 px, 12 slices)."""
    folder = tmp_path_factory.mktemp("cohort")
    generate_cohort(folder, N_CASES, SEED, rows=ROWS, n_slices=SLICES)
    return folder


def test_kill_mid_run_then_scheduled_retrain_fails_the_gate(cohort: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(STORE_ROOT / MODEL / "1.0.0", store / MODEL / "1.0.0")
    (store / MODEL / "promoted.json").write_text('{"version": "1.0.0"}\n')
    config_path = write_config(tmp_path, cohort, store, "*/1 * * * * *")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "dicomnode.cli", "retrain", "--config", str(config_path), "--now"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + KILL_TIMEOUT_S
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if any(p.name.startswith(".1.1.0-") for p in (store / MODEL).iterdir()):
                break  # the candidate is being written: kill it now
            time.sleep(0.001)
        assert process.poll() is None, "the run ended before it wrote its candidate"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert promoted_version(MODEL, store) == "1.0.0"
    for version in list_versions(MODEL, store):  # whatever is listed is whole
        verified_files(MODEL, version, store)
    if "1.1.0" in list_versions(MODEL, store):  # renamed into place before the kill
        assert read_gate(MODEL, "1.1.0", store) is None
        with pytest.raises(ModelStoreError, match="never evaluated"):
            promote_version(MODEL, "1.1.0", store, by="test")

    config = load_config(config_path)
    stop, ran = threading.Event(), threading.Event()
    service = threading.Thread(target=serve, args=(config, stop, ran), daemon=True)
    service.start()
    try:
        assert ran.wait(KILL_TIMEOUT_S), "the scheduled run did not happen"
    finally:
        stop.set()
        service.join(10)
    assert not [p for p in (store / MODEL).iterdir() if p.name.startswith(".")]
    new = list_versions(MODEL, store)[-1]
    assert new in {"1.1.0", "1.2.0"}
    gate = read_gate(MODEL, new, store)
    assert gate is not None and not gate.passed
    assert any("too few held-out events" in reason for reason in gate.reasons)
    assert gate.metrics["service_version"] == "1.0.0" and "auc_in_service" in gate.metrics
    assert promoted_version(MODEL, store) == "1.0.0"
    status = {row.version: row for row in version_statuses(MODEL, store)}
    assert status[new].status == "failed gate" and status["1.0.0"].status == "in service"
    report = config.state_dir / "retraining" / MODEL / new
    html = (report / REPORT_HTML).read_text(encoding="ascii")
    assert "too small to decide" in html and "not for clinical use" in html
    assert "Hosmer-Lemeshow" in html and "DeLong z" in html
    for name in FIGURES:
        assert (report / name).read_bytes()[:8] == PNG_MAGIC
    assert "input_distribution" in load_manifest(MODEL, new, store)

    # shadow: the candidate runs beside 1.0.0 on a case, its risk recorded, nothing sent
    assert run_cli("models", "shadow", new, "--config", str(config_path)) == 0
    case = sorted((cohort / "cases").iterdir())[0]
    paths = sorted(case.glob("*.dcm"))
    record = run_shadow(config, MODEL, paths)
    assert record is not None and record["shadow"] == new and record["in_service"] == "1.0.0"
    assert read_records(config.state_dir, MODEL) == [record]
    # the running node's pipeline follows promotion and rollback without a restart
    assert get_pipeline(MODEL, config.pipelines).algorithm.version == "1.0.0"
    assert run_cli("models", "promote", new, "--config", str(config_path)) == 2  # failed gate
    assert run_cli("models", "promote", new, "--config", str(config_path), "--force",
                   "--reason", "test of the pickup", "--by", "tester") == 0  # fmt: skip
    assert get_pipeline(MODEL, config.pipelines).algorithm.version == new
    assert run_cli("models", "rollback", "--config", str(config_path), "--by", "tester") == 0
    assert get_pipeline(MODEL, config.pipelines).algorithm.version == "1.0.0"
    assert [e["action"] for e in read_audit(MODEL, store)][-3:] == [
        "shadow", "forced promote", "rollback",
    ]  # fmt: skip
