"""A node stopped by SIGTERM leaves no process behind: the radiomics worker pool (its
forkserver and workers, ``[pipelines.radiomics] workers``) goes with it.

A real node process (``python -m dicomnode.cli serve``) routes the generated
``ich_expansion_hybrid`` case (its model's radiomics run on the original, gradient, wavelet,
square... images: several tasks, so the pool is used) sent twice by DCMTK storescu (the
first job after a start imports the radiomics package, so only the second is given the
pool's size). SIGTERM comes once the pool's processes are seen in the node's process tree
(``/proc``): when the node is idle again, or while the second job uses the pool; or
SIGKILL, when idle (no shutdown runs: the workers end with their parent, the forkserver).
Every process of the tree must be gone within a few seconds of the node's exit. A node stopped
in-process (``Node.stop``) stops the pool's workers too, though its process lives on.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomnode.config import load_config
from dicomnode.node import Node
from dicomnode.processing import processor
from pipelines.ich_expansion_hybrid.demo import demo_case
from pipelines.radiomics.engine import shutdown_pool
from tests.support import REPO_ROOT, free_port, require_tool

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc"),
]

JOB_TIMEOUT_S = 240.0
GONE_WITHIN_S = 10.0


def children(pid: int) -> set[int]:
    """The live descendants of ``pid`` (from ``/proc/<pid>/task/*/children``)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                text = (task / "children").read_text()
            except OSError:  # the task or the process ended meanwhile
                continue
            for child in map(int, text.split()):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def parent(pid: int) -> int:
    """The parent process id of ``pid``."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def storescu(port: int, paths: list[Path]) -> None:
    """Send ``paths`` to the node with DCMTK storescu."""
    sent = subprocess.run(
        [require_tool("storescu", "dcmtk"), "-aec", "DICOMNODE", "127.0.0.1", str(port),
         *map(str, paths)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr


def jobs_done(state: Path) -> int:
    """How many jobs the node recorded done."""
    database = state / "dicomnode.sqlite3"
    if not database.exists():
        return 0
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()[0])


def second_copy(paths: list[Path], folder: Path) -> list[Path]:
    """``paths`` as another study and series (new UIDs) in ``folder``."""
    folder.mkdir()
    study, series, copies = generate_uid(), generate_uid(), []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / path.name, enforce_file_format=True)
        copies.append(folder / path.name)
    return copies


def config_toml(port: int) -> str:
    """A node routing every series to ``ich_expansion_hybrid`` with a pool of 2 workers."""
    return f"""spool_dir = "spool"
state_dir = "state"
stable_age_s = 0.5
poll_interval_s = 0.05

[node]
ae_title = "DICOMNODE"
host = "127.0.0.1"
port = {port}

[[allowed_callers]]
ae_title = "STORESCU"
host = "127.0.0.1"

[[routes]]
name = "ct"
pipeline = "ich_expansion_hybrid"

[pipelines.radiomics]
workers = 2
"""


@pytest.mark.parametrize("when", ["idle", "mid-job", "sigkill"])
def test_a_stopped_or_killed_node_leaves_no_pool_process(tmp_path: Path, when: str) -> None:
    case = demo_case(tmp_path / "case", seed=1)
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(config_toml(port), encoding="utf-8")
    log = tmp_path / "node.log"
    node = subprocess.Popen(
        [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log.open("wb"),
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    tree: set[int] = set()
    try:
        assert node.stdout is not None and b"listening" in node.stdout.readline()
        for done, paths in enumerate((case, second_copy(case, tmp_path / "again")), start=1):
            storescu(port, paths)
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while jobs_done(tmp_path / "state") < done:
                assert node.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                if done == 2 and when == "mid-job" and len(children(node.pid)) >= 3:
                    break  # the second job is extracting in the pool
                time.sleep(0.02)
        tree = children(node.pid)
        assert len(tree) >= 3, f"no pool (forkserver and 2 workers) in the tree: {tree}"
        if when == "mid-job":
            assert jobs_done(tmp_path / "state") == 1, "the second job ended before SIGTERM"
        if when == "sigkill":  # no shutdown runs: the workers end with their parent
            node.kill()
            assert node.wait(60) == -signal.SIGKILL
        else:
            node.send_signal(signal.SIGTERM)
            assert node.wait(60) == 0, log.read_text()[-3000:]
        deadline = time.monotonic() + GONE_WITHIN_S
        while any(alive(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = sorted(pid for pid in tree if alive(pid))
        assert not left, f"left behind: {left}"
    finally:
        for pid in tree:  # whatever the test found alive is not left on the machine
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if node.poll() is None:
            node.kill()
        node.wait(30)


def test_a_node_stopped_in_process_stops_the_pool_workers(tmp_path: Path) -> None:
    case = demo_case(tmp_path / "case", seed=1)
    port = free_port()
    (tmp_path / "node.toml").write_text(config_toml(port), encoding="utf-8")
    config = load_config(tmp_path / "node.toml")
    shutdown_pool()  # the pool is process-wide: start without one an earlier test made
    before = children(os.getpid())
    with Node(config, processor(config)) as node:
        for paths in (case, second_copy(case, tmp_path / "again")):
            storescu(port, paths)
            assert node.wait_idle(JOB_TIMEOUT_S)
        # the pool's workers are the forkserver's children: this process' grandchildren
        workers = {p for p in children(os.getpid()) - before if parent(p) != os.getpid()}
        assert len(workers) >= 2, workers
        assert all(alive(pid) for pid in workers)
        states = [job.state.value for job in node.jobs.all()]
    deadline = time.monotonic() + GONE_WITHIN_S
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if alive(pid)]
    assert states == ["done", "done"]
