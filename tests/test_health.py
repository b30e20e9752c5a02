"""Health and metrics endpoint of a running node."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dicomnode.config import Destination, HttpSettings, default_config
from dicomnode.node import JobSpec, Node
from dicomnode.sender import send_files
from pipelines.synthetic import synthetic_head_ct, write_series
from tests.support import free_port


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _no_results(job: JobSpec) -> list[Path]:
    return []


def test_health_and_metrics_follow_the_state(tmp_path: Path) -> None:
    port, http_port = free_port(), free_port()
    config = default_config(tmp_path, port).model_copy(
        update={"http": HttpSettings(port=http_port), "stable_age_s": 0.5, "poll_interval_s": 0.1}
    )
    files = write_series(synthetic_head_ct(seed=2, n_slices=4, rows=64), tmp_path / "in")
    with Node(config, _no_results) as node:
        status, body = _get(http_port, "/health")
        assert status == 200
        assert json.loads(body)["status"] == "ok"
        target = Destination(ae_title="DICOMNODE", host="127.0.0.1", port=port)
        assert all(r.status == 0 for r in send_files(target, files, "STORESCU").values())
        deadline = time.monotonic() + 30
        while not (node.jobs.all() and node.is_idle()) and time.monotonic() < deadline:
            time.sleep(0.1)
        status, metrics = _get(http_port, "/metrics")
        assert status == 200
        text = metrics.decode()
        assert 'dicomnode_instances{state="stored"} 4.0' in text
        assert 'dicomnode_jobs{state="done"} 1.0' in text
        assert 'dicomnode_series{state="routed"} 1.0' in text
        assert _get(http_port, "/nothing")[0] == 404
    with pytest.raises(urllib.error.URLError):
        _get(http_port, "/health")
