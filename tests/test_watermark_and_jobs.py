"""The free-space watermark refuses new data with the documented statuses and degrades
/health; ``dicomnode jobs list|retry`` runs a failed job again."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicomnode.config import HttpSettings, NodeConfig, default_config, load_config
from dicomnode.deliveries import parse_age
from dicomnode.node import JobSpec, Node
from dicomnode.records import JobState
from dicomnode.status import Status
from dicomnode.watermark import low_space_reason, space_rejection
from pipelines.synthetic import synthetic_head_ct, write_series
from tests.support import REPO_ROOT, free_port

UNREACHABLE_FREE_BYTES = 1 << 62


def _config(tmp_path: Path) -> NodeConfig:
    return default_config(tmp_path, free_port()).model_copy(
        update={"http": HttpSettings(port=free_port()), "stable_age_s": 0.3,
                "poll_interval_s": 0.1}
    )  # fmt: skip


def _health(config: NodeConfig) -> dict[str, object]:
    assert config.http is not None
    url = f"http://127.0.0.1:{config.http.port}/health"
    with urllib.request.urlopen(url, timeout=5) as reply:
        body: dict[str, object] = json.loads(reply.read())
    return body


def _nothing(spec: JobSpec) -> list[Path]:
    return []


def test_low_free_space_refuses_associations_and_stores(tmp_path: Path) -> None:
    config = _config(tmp_path)
    path = write_series(synthetic_head_ct(seed=3, n_slices=1, rows=64), tmp_path / "in")[0]
    with Node(config, _nothing):
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", config.node.port, ae_title="DICOMNODE")
        assert assoc.is_established
        assert _health(config)["status"] == "ok"
        config.limits.min_free_bytes = UNREACHABLE_FREE_BYTES  # the disk "fills up"
        config.limits.warn_free_bytes = UNREACHABLE_FREE_BYTES
        response = assoc.send_c_store(pydicom.dcmread(path))
        assert response.Status == Status.OUT_OF_RESOURCES
        assert "min_free_bytes" in str(response.get("ErrorComment", ""))
        assoc.release()
        refused = ae.associate("127.0.0.1", config.node.port, ae_title="DICOMNODE")
        assert refused.is_rejected and not refused.is_established
        health = _health(config)
        assert health["status"] == "degraded"
        assert any("low disk" in str(r) for r in health["reasons"])  # type: ignore[attr-defined]
        config.limits.min_free_bytes = 0  # space freed: accepted again
        again = ae.associate("127.0.0.1", config.node.port, ae_title="DICOMNODE")
        assert again.is_established
        assert again.send_c_store(pydicom.dcmread(path)).Status == Status.SUCCESS
        again.release()


def test_watermark_reasons_are_pure() -> None:
    assert low_space_reason(10, 5) is None
    assert low_space_reason(4, 5) == "free space below limits.min_free_bytes (5): 4 bytes free"
    rejection = space_rejection(4, 5)
    assert rejection is not None and int(rejection.result) == 2  # transient
    assert rejection.reason.startswith("local limit exceeded: free space below")
    assert [parse_age(a) for a in ("90", "90s", "30m", "2h", "1.5d")] == [
        90,
        90,
        1800,
        7200,
        129600,
    ]


class FailsOnce:
    """A pipeline that fails its first run (as a transient fault would) then works."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, spec: JobSpec) -> list[Path]:
        self.runs += 1
        if self.runs == 1:
            raise RuntimeError("transient fault")
        return []


def _cli(config_file: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", *args, "--config", str(config_file)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_failed_job_is_listed_and_retried(tmp_path: Path) -> None:
    node_port, http_port = free_port(), free_port()
    config_file = tmp_path / "dicomnode.toml"
    config_file.write_text(
        f'spool_dir = "spool"\nstate_dir = "state"\nstable_age_s = 0.3\npoll_interval_s = 0.1\n'
        f'[node]\nhost = "127.0.0.1"\nport = {node_port}\n'
        f'[[allowed_callers]]\nae_title = "STORESCU"\n'
        f'[[routes]]\nname = "head-ct"\npipeline = "hyperdense_regions"\n'
        f"[http]\nport = {http_port}\n"
    )
    config = load_config(config_file)
    files = write_series(synthetic_head_ct(seed=4, n_slices=2, rows=64), tmp_path / "in")
    with Node(config, FailsOnce()) as node:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node_port, ae_title="DICOMNODE")
        for path in files:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == Status.SUCCESS
        assoc.release()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
            j.state is JobState.FAILED for j in node.jobs.all()
        ):
            time.sleep(0.1)
        assert _health(config)["status"] == "degraded"
        listed = _cli(config_file, "jobs", "list", "--state", "failed")
        assert "transient fault" in listed and len(listed.strip().splitlines()) == 2
        assert "queued again 1 failed job(s)" in _cli(config_file, "jobs", "retry", "--all")
        assert "queued again 0 failed job(s)" in _cli(config_file, "jobs", "retry", "--all")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not node.is_idle():
            time.sleep(0.1)
        states = [j.state for j in node.jobs.all()]
        assert states == [JobState.FAILED, JobState.DONE]
        assert _health(config)["status"] == "ok"  # the failed job was retried
        assert "retried as job 2" in _cli(config_file, "jobs", "list")
