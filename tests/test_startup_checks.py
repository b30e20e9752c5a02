"""Pipelines are checked when ``serve`` and ``run`` start: a tampered model artefact makes
its pipeline unavailable, its series go to the default pipeline, and that is reported in
the log and in ``/health`` instead of every job failing."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from structlog.testing import capture_logs

from dicomnode.cli import main
from dicomnode.config import Destination, default_config, load_config
from dicomnode.offline import run_folder
from dicomnode.pipelines_check import check_pipelines_at_start, plan_pipelines
from dicomnode.sender import send_files
from model_store.registry import STORE_ROOT, ModelStoreError, promoted_version
from pipelines.base import PipelineUnavailable
from pipelines.ht_after_mt import HtAfterMtPipeline
from pipelines.registry import get_pipeline, settings_verifier, verified_pipeline
from pipelines.settings import BlastCtSettings, PipelinesSettings
from pipelines.synthetic import synthetic_head_ct, write_series
from tests.support import REPO_ROOT, free_port

VERSION = promoted_version("ht_after_mt") or "1.1.0"


def tampered_store(target: Path, filename: str = "cnn.safetensors") -> Path:
    """A copy of the bundled model store with one byte of ht_after_mt's ``filename`` flipped."""
    shutil.copytree(STORE_ROOT, target, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    path = target / "ht_after_mt" / VERSION / filename
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return target


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tampered copy (CNN weights changed)."""
    return tampered_store(tmp_path_factory.mktemp("store") / "model_store")


@pytest.fixture
def fresh_pipelines() -> Iterator[None]:
    """Pipelines built anew (the registry caches them per process, loaded models too)."""
    get_pipeline.cache_clear()
    yield
    get_pipeline.cache_clear()


def write_config(
    folder: Path,
    port: int,
    http_port: int | None = None,
    pipeline: str = "ht_after_mt",
    pipelines: str = "",
) -> Path:
    """A node config routing head CT to ``pipeline`` (default pipeline:
    ``hyperdense_regions``); ``pipelines``: TOML of ``[pipelines.<name>]`` sections."""
    http = f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n' if http_port else ""
    path = folder / "node.toml"
    path.write_text(
        f"""stable_age_s = 0.5
poll_interval_s = 0.1
spool_dir = "spool"
state_dir = "state"
default_pipeline = "hyperdense_regions"

[node]
ae_title = "DICOMNODE"
host = "127.0.0.1"
port = {port}

[[allowed_callers]]
ae_title = "STORESCU"
host = "127.0.0.1"

[[routes]]
name = "head-ct"
pipeline = "{pipeline}"

[routes.match]
modality = ["CT"]
body_part_examined = ["HEAD"]

{http}
{pipelines}""",
        encoding="utf-8",
    )
    return path


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess (this tree's packages, one thread)."""
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"})
    return env


def no_weights(folder: Path) -> Path:
    """An empty folder given as BLAST-CT's weights folder: the weights are absent."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``text`` (other lines skipped)."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


# --- in process -----------------------------------------------------------------------------


def test_a_tampered_model_is_unavailable_before_any_job(store: Path) -> None:
    pipeline = HtAfterMtPipeline(root=store)  # only the manifest is read here
    with pytest.raises(
        PipelineUnavailable, match=rf"ht_after_mt {re.escape(VERSION)} refused: .*cnn\.safetensors"
    ):
        pipeline.check()
    with pytest.raises(PipelineUnavailable, match=r"cnn\.safetensors"):
        verified_pipeline("ht_after_mt", lambda _: HtAfterMtPipeline(root=store))
    with pytest.raises(ModelStoreError, match=r"cnn\.safetensors"):
        _ = HtAfterMtPipeline(root=store).model  # at run time: a refused model fails the job
    assert verified_pipeline("ht_after_mt") is get_pipeline("ht_after_mt")  # bundled: intact


def test_a_changed_manifest_makes_the_pipeline_unavailable_not_a_crash(tmp_path: Path) -> None:
    root = tampered_store(tmp_path / "model_store", "manifest.json")
    with pytest.raises(ModelStoreError):
        HtAfterMtPipeline(root=root)
    with pytest.raises(PipelineUnavailable, match=r"failed its start-up check: .*manifest"):
        verified_pipeline("ht_after_mt", lambda _: HtAfterMtPipeline(root=root))


def test_an_unavailable_pipeline_falls_back_and_is_logged(
    tmp_path: Path, store: Path, fresh_pipelines: None
) -> None:
    def build(name: str) -> Any:
        return HtAfterMtPipeline(root=store) if name == "ht_after_mt" else get_pipeline(name)

    config = default_config(tmp_path, free_port())  # routes head CT to ht_after_mt
    with capture_logs() as logs:
        plan = check_pipelines_at_start(config, lambda name: verified_pipeline(name, build))
    assert plan.resolve("ht_after_mt") == "hyperdense_regions"
    assert plan.resolve("hyperdense_regions") == "hyperdense_regions"
    statuses = {s["name"]: s for s in plan.to_json()}
    threshold = get_pipeline("hyperdense_regions").algorithm
    assert statuses["hyperdense_regions"] == {
        "name": "hyperdense_regions", "status": "available", "reason": None, "fallback": None,
        "algorithm": threshold.name, "version": threshold.version,
    }  # fmt: skip
    assert statuses["ht_after_mt"]["version"] is None  # never built: no version in service
    assert statuses["ht_after_mt"]["status"] == "unavailable"
    assert statuses["ht_after_mt"]["fallback"] == "hyperdense_regions"
    assert "cnn.safetensors" in str(statuses["ht_after_mt"]["reason"])
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["pipeline"] == "ht_after_mt" and warning["fallback"] == "hyperdense_regions"
    assert "cnn.safetensors" in warning["reason"]

    # A default that is unavailable itself cannot stand in: said as an error.
    absent = PipelinesSettings(blast_ct=BlastCtSettings(weights_dir=no_weights(tmp_path / "nw")))
    verify = settings_verifier(absent)
    plan = plan_pipelines(["blast_ct", "ht_after_mt"], "blast_ct", verify)
    assert plan.statuses["blast_ct"].available is False
    assert "weights not found" in str(plan.statuses["blast_ct"].reason)
    assert plan.statuses["ht_after_mt"].available and plan.resolve("blast_ct") == "blast_ct"
    plan = plan_pipelines(["blast_ct"], "hyperdense_regions", verify)
    assert plan.resolve("blast_ct") == "hyperdense_regions"
    with capture_logs() as logs:
        config = config.model_copy(update={"default_pipeline": "blast_ct", "pipelines": absent})
        check_pipelines_at_start(config)
    assert [(e["log_level"], e["pipeline"]) for e in logs] == [("warning", "blast_ct")]
    config = config.model_copy(
        update={"routes": [config.routes[0].model_copy(update={"pipeline": "blast_ct"})]}
    )
    with capture_logs() as logs:
        check_pipelines_at_start(config)
    assert [(e["log_level"], e["pipeline"]) for e in logs] == [("error", "blast_ct")]


# --- the commands -----------------------------------------------------------------------------


def test_run_falls_back_to_the_default_pipeline(
    tmp_path: Path,
    store: Path,
    capsys: pytest.CaptureFixture[str],
    fresh_pipelines: None,
) -> None:
    folder = tmp_path / "in"
    write_series(synthetic_head_ct(seed=4, n_slices=8, rows=64), folder)
    # The command itself, with BLAST-CT's weights absent (its folder is read at check time).
    no_weights(tmp_path / "no-weights")
    config = write_config(
        tmp_path, free_port(), pipeline="blast_ct",
        pipelines='[pipelines.blast_ct]\nweights_dir = "no-weights"\n',
    )  # fmt: skip
    status = main(["run", str(folder), "--out", str(tmp_path / "out"), "--config", str(config)])
    said = capsys.readouterr()
    assert status == 0, said
    assert "(blast_ct unavailable, ran the default hyperdense_regions)" in said.out
    [warning] = [e for e in json_lines(said.err) if e["event"].startswith("pipeline unavail")]
    assert warning["level"] == "warning" and warning["fallback"] == "hyperdense_regions"
    assert "weights not found" in warning["reason"]
    outputs = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(outputs) == 3  # SEG, SC, SR of the threshold baseline
    assert {pydicom.dcmread(p).ManufacturerModelName for p in outputs} == {"hyperdense_regions"}

    # The same through run_folder with the tampered HT model.
    def build(name: str) -> Any:
        return HtAfterMtPipeline(root=store) if name == "ht_after_mt" else get_pipeline(name)

    node_config = load_config(write_config(tmp_path, free_port()))
    plan = check_pipelines_at_start(node_config, lambda name: verified_pipeline(name, build))
    [outcome] = run_folder(folder, tmp_path / "out2", node_config, plan)
    assert outcome.decision == "processed"
    assert (
        outcome.reason
        == "rule head-ct (ht_after_mt unavailable, ran the default hyperdense_regions)"
    )
    assert {pydicom.dcmread(p).ManufacturerModelName for p in outcome.outputs} == {
        "hyperdense_regions"
    }


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_serve_reports_the_fallback_in_health_and_processes_with_it(
    tmp_path: Path, store: Path
) -> None:
    port, http_port = free_port(), free_port()
    config = write_config(
        tmp_path,
        port,
        http_port,
        pipelines=f'[pipelines.ht_after_mt]\nmodel_store_dir = "{store}"\n',
    )
    node = subprocess.Popen(
        [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
        cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        health: dict[str, Any] = {}
        status = 0
        while time.monotonic() < deadline and node.poll() is None:
            try:
                status, body = _get(http_port, "/health")
            except urllib.error.URLError:
                time.sleep(0.2)
                continue
            health = json.loads(body)
            break
        # A refused model keeps the node serving (200) but degraded, saying why.
        assert status == 200 and health["status"] == "degraded", health
        assert any("pipeline ht_after_mt refused" in r for r in health["reasons"]), health
        pipelines = {p["name"]: p for p in health["pipelines"]}
        assert pipelines["ht_after_mt"]["status"] == "unavailable"
        assert pipelines["ht_after_mt"]["fallback"] == "hyperdense_regions"
        assert "cnn.safetensors" in pipelines["ht_after_mt"]["reason"]
        assert pipelines["hyperdense_regions"]["status"] == "available"

        files = write_series(synthetic_head_ct(seed=5, n_slices=6, rows=64), tmp_path / "in")
        target = Destination(ae_title="DICOMNODE", host="127.0.0.1", port=port)
        assert all(r.status == 0 for r in send_files(target, files, "STORESCU").values())
        metrics = ""
        while time.monotonic() < deadline and 'dicomnode_jobs{state="done"} 1.0' not in metrics:
            time.sleep(0.2)
            metrics = _get(http_port, "/metrics")[1].decode()
        assert 'dicomnode_jobs{state="done"} 1.0' in metrics
        assert 'dicomnode_jobs{state="failed"}' not in metrics
    finally:
        node.send_signal(signal.SIGTERM)
        _, stderr = node.communicate(timeout=60)
    events = json_lines(stderr)
    assert [e["pipeline"] for e in events if e["event"].startswith("pipeline unavailable")] == [
        "ht_after_mt"
    ]  # once, at start
    finished = [e for e in events if e["event"] == "pipeline finished"]
    assert [e["pipeline"] for e in finished] == ["hyperdense_regions"]
