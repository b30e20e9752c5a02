"""A node stopped by SIGTERM leaves no process behind: the radiomics worker pool (its
forkserver and workers, ``[pipelines.radiomics] workers``) goes with it.

A real node process (``python -m dicomnode.cli serve``) routes the generated
``ich_expansion_hybrid`` case (its model's radiomics run on the original, gradient, wavelet,
square... images: several tasks, so the pool is used) sent twice by DCMTK storescu (the
second job uses the pool the first one made). SIGTERM comes once the pool's processes are
seen in the node's process tree (``/proc``): when the node is idle again, or while the
second job uses the pool; or SIGKILL, when idle (no shutdown runs: the workers end with
their parent, the forkserver). Every process of the tree must be gone within a few seconds
of the node's exit. A node stopped in-process (``Node.stop``) stops the pool's workers
too, though its process lives on.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from dicomnode.config import load_config
from dicomnode.node import Node
from dicomnode.processing import processor
from pipelines.ich_expansion_hybrid.demo import demo_case
from pipelines.radiomics.engine import shutdown_pool
from tests.support import (
    NodeStarter,
    as_new_series,
    free_port,
    node_toml,
    state_rows,
    storescu,
    wait_for,
)

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


def jobs_done(state: Path) -> int:
    """How many jobs the node recorded done."""
    return len(state_rows(state, "SELECT id FROM jobs WHERE state = 'done'"))


def config_toml(port: int) -> str:
    """A node routing every CT series to ``ich_expansion_hybrid`` with a pool of 2 workers."""
    return node_toml(port, "ich_expansion_hybrid", extra="\n[pipelines.radiomics]\nworkers = 2\n")


@pytest.mark.parametrize("when", ["idle", "mid-job", "sigkill"])
def test_a_stopped_or_killed_node_leaves_no_pool_process(
    tmp_path: Path, when: str, serve_node: NodeStarter
) -> None:
    case = demo_case(tmp_path / "case", seed=1)
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(config_toml(port), encoding="utf-8")
    log = tmp_path / "node.log"
    node = serve_node(config, log)
    tree: set[int] = set()
    state = tmp_path / "state"
    try:
        storescu(port, case)
        wait_for(lambda: jobs_done(state) >= 1, "the first job not done", node, log, JOB_TIMEOUT_S)
        storescu(port, as_new_series(case, tmp_path / "again"))
        wait_for(
            lambda: jobs_done(state) >= 2  # or, mid-job, the second job extracts in the pool
            or (when == "mid-job" and len(children(node.pid)) >= 3),
            "the second job not done", node, log, JOB_TIMEOUT_S, poll_s=0.02,
        )  # fmt: skip
        tree = children(node.pid)
        assert len(tree) >= 3, f"no pool (forkserver and 2 workers) in the tree: {tree}"
        if when == "mid-job":
            assert jobs_done(state) == 1, "the second job ended before SIGTERM"
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


def test_a_node_stopped_in_process_stops_the_pool_workers(tmp_path: Path) -> None:
    case = demo_case(tmp_path / "case", seed=1)
    port = free_port()
    (tmp_path / "node.toml").write_text(config_toml(port), encoding="utf-8")
    config = load_config(tmp_path / "node.toml")
    shutdown_pool()  # the pool is process-wide: start without one an earlier test made
    before = children(os.getpid())
    with Node(config, processor(config)) as node:
        for paths in (case, as_new_series(case, tmp_path / "again")):
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
