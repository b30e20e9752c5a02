"""A job that meets a full disk (a real, tiny tmpfs) is held and retried, logged once,
and fails only after the configured window."""

from __future__ import annotations

import errno
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from dicomnode import node as node_module
from dicomnode.config import NodeConfig, RouteMatch, RouteRule, default_config
from dicomnode.node import JobSpec, Node
from dicomnode.records import JobState
from pipelines.synthetic import synthetic_head_ct, write_series
from tests.scp import storage_scp
from tests.support import free_port, require_tool


def copy_first(spec: JobSpec) -> list[Path]:
    """A stand-in pipeline that writes one result file (a copy of the first instance)."""
    result = spec.output_dir / "result.dcm"
    shutil.copy(spec.instance_paths[0], result)
    return [result]


@pytest.fixture()
def full_results_disk(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/state/results`` on a 64 KiB tmpfs filled to the last byte."""
    results = tmp_path / "state" / "results"
    results.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(results)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    filler = results / "filler"
    try:
        with filler.open("wb") as out:
            while True:
                out.write(b"\0" * 4096)
                out.flush()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    try:
        yield filler
    finally:
        subprocess.run(["umount", "-l", str(results)], check=False)


def _config(tmp_path: Path, retry_s: float) -> NodeConfig:
    """Node on free ports, every CT to the stand-in pipeline, results to PACS."""
    config = default_config(tmp_path, free_port())
    config.destinations["PACS"].port = free_port()
    config.routes = [
        RouteRule(name="ct", match=RouteMatch(modality=["CT"]), pipeline="copy",
                  destinations=["PACS"])
    ]  # fmt: skip
    config.stable_age_s = 0.5
    config.poll_interval_s = 0.05
    config.worker.disk_full_retry_s = retry_s
    return config


def _send_series(config: NodeConfig, folder: Path) -> None:
    """Send a small generated head CT with DCMTK storescu."""
    write_series(synthetic_head_ct(seed=3, n_slices=4, rows=64), folder)
    storescu = require_tool("storescu", "dcmtk")
    done = subprocess.run(
        [storescu, "-aec", "DICOMNODE", "+sd", "127.0.0.1", str(config.node.port), str(folder)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def _events(logs: list[structlog.typing.EventDict], name: str) -> list[structlog.typing.EventDict]:
    return [entry for entry in logs if entry["event"] == name]


def test_job_waits_for_disk_space_then_delivers(
    tmp_path: Path, full_results_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_module, "DISK_FULL_BACKOFF_S", (0.1, 0.2))
    config = _config(tmp_path, retry_s=3600)
    pacs_port = config.destinations["PACS"].port
    with capture_logs() as logs, storage_scp(pacs_port) as pacs, Node(config, copy_first) as node:
        _send_series(config, tmp_path / "in")
        deadline = time.monotonic() + 10
        while len(_events(logs, "job started")) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        (job,) = node.jobs.all()
        assert job.state is JobState.RUNNING  # held by its worker, neither lost nor failed
        assert len(_events(logs, "job started")) >= 4  # tried again and again ...
        assert len(_events(logs, "job postponed: disk full; it will be retried")) == 1
        assert not _events(logs, "background step failed")  # ... and logged once
        full_results_disk.unlink()  # space again
        assert node.wait_idle(timeout=10)
        (job,) = node.jobs.all()
        assert job.state is JobState.DONE
    assert len(pacs.received) == 1
    assert len(_events(logs, "job resumed after a full disk")) == 1


def test_job_fails_as_disk_full_after_the_window(tmp_path: Path, full_results_disk: Path) -> None:
    config = _config(tmp_path, retry_s=0.5)
    with Node(config, copy_first) as running:
        _send_series(config, tmp_path / "in")
        assert running.wait_idle(timeout=20)
        (job,) = running.jobs.all()
    assert job.state is JobState.FAILED
    assert job.reason is not None and "No space left on device" in job.reason
