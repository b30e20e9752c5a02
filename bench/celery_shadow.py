"""What a shadow model costs the receiving host and the results, in-process and on Celery,
in one run.

Three fresh nodes each receive the same ``--series`` generated head CTs with a
hyperdensity (``pipelines.followup.pairs``, ``--rows`` px, ``--slices``; sent one at a
time by DCMTK storescu, each waited for, so no job queues behind another), routed to
``ht_after_mt`` (its ``hyperdense_regions`` segmenter) and sent to DCMTK storescp:

- ``in-process, shadow``: the node runs the job and, in its follow-up, the shadow version;
- ``celery, no shadow``: one ``dicomnode worker`` (real ``redis-server`` broker) runs the
  job, its model store has no shadow;
- ``celery, shadow``: the same worker with a shadow version in its store; the node's
  follow-up sends the ``dicomnode.shadow`` task.

Per row: the receiving process's CPU seconds per job (``getrusage(RUSAGE_SELF)``: the
node's threads, and the pipelines when they run in it), the result latency (the job's
start to its results queued, the node's ``jobs`` table; the follow-up comes after), the
follow-up seconds (the node's ``follow-up done`` log) and the shadow lines recorded. Each
node first runs one warm-up series (imports, pipelines built), not counted. Every
process uses one BLAS / OpenMP thread (the script restarts itself with them).

Run: ``PYTHONPATH=. .venv/bin/python bench/celery_shadow.py [--series 3] [--rows 192] [--slices 32]
[--json out]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import structlog

from bench.celery_scaling import ONE_THREAD, _redis, _storescp, _storescu, _wait, node_settings
from dicomnode.config import NodeConfig
from dicomnode.distributed import celery_processor
from dicomnode.node import Node
from dicomnode.ports import free_port
from dicomnode.processing import processor, reporting
from dicomnode.shadow import read_records
from model_store.lifecycle import set_shadow
from model_store.registry import STORE_ROOT
from pipelines.followup.pairs import generate_pair
from pipelines.synthetic import write_series

REPO = Path(__file__).resolve().parents[1]
MODEL, SERVICE, SHADOW = "ht_after_mt", "1.1.0", "1.0.0"
START_TIMEOUT_S = 180.0


def _store(folder: Path, shadow: bool) -> Path:
    """A copy of the bundled ``ht_after_mt`` store: SERVICE in service, SHADOW in shadow
    when ``shadow``."""
    for version in (SERVICE, SHADOW):
        shutil.copytree(STORE_ROOT / MODEL / version, folder / MODEL / version)
    (folder / MODEL / "promoted.json").write_text(json.dumps({"version": SERVICE}) + "\n")
    if shadow:
        set_shadow(MODEL, SHADOW, folder, by="bench")
    return folder


def _config(base: Path, pacs_port: int, store: Path, broker: str | None) -> NodeConfig:
    """A node routing CT to ``ht_after_mt`` (model in ``store``), on Celery when
    ``broker``."""
    data = node_settings(base, pacs_port, broker, MODEL)
    data["stable_age_s"] = 0.5
    data["pipelines"] = {MODEL: {"model_store_dir": str(store), "segmenter": "hyperdense_regions"}}
    return NodeConfig.model_validate(data)


def _worker(folder: Path, broker: str, store: Path) -> subprocess.Popen[bytes]:
    """One ``dicomnode worker`` reading ``store``, ready on return."""
    toml, log = folder / "worker.toml", folder / "worker.log"
    toml.write_text(
        f'spool_dir = "{folder / "ws"}"\nstate_dir = "{folder / "wst"}"\n'
        f'[[allowed_callers]]\nae_title = "X"\n[celery]\nbroker_url = "{broker}"\n'
        f'[pipelines.{MODEL}]\nmodel_store_dir = "{store}"\nsegmenter = "hyperdense_regions"\n'
    )
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "dicomnode.cli", "worker", "--config", str(toml),
             "--hostname", "w@bench"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
    _wait(lambda: "celery worker ready" in log.read_text(errors="replace"), START_TIMEOUT_S,
          "the worker")  # fmt: skip
    return worker


def _cpu_s() -> float:
    """CPU seconds (user + system) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _done(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The node's ``follow-up done`` entries among captured ``logs``."""
    return [entry for entry in logs if entry["event"] == "follow-up done"]


def _run(label: str, cases: list[list[Path]], folder: Path, broker: str | None,
         shadow: bool) -> dict[str, object]:  # fmt: skip
    """One fresh node (and worker when ``broker``): the warm-up case, then each case in
    turn, each waited for to its follow-up's end."""
    folder.mkdir(parents=True)
    store = _store(folder / "store", shadow)
    pacs_port = free_port()
    pacs = _storescp(folder / "pacs", pacs_port)
    worker = _worker(folder, broker, store) if broker else None
    config = _config(folder / "node", pacs_port, store, broker)
    runner = celery_processor(config) if broker else processor(config)
    follow_ups: list[float] = []
    try:
        with structlog.testing.capture_logs() as logs, Node(config, runner, reporting()) as node:
            cpu = 0.0
            for index, paths in enumerate(cases):
                if index == 1:  # the warm-up is not counted
                    cpu, follow_ups = _cpu_s(), []
                _storescu(config.node.port, paths)
                _wait(lambda i=index: len(node.jobs.all()) == i + 1, 120, "the job queued")
                _wait(lambda i=index: len(_done(logs)) > i and node.is_idle(), 600,
                      "the job and its follow-up")  # fmt: skip
                follow_ups.append(float(_done(logs)[-1]["seconds"]))
            cpu = _cpu_s() - cpu
            failed = [job.reason for job in node.jobs.all() if job.reason]
        with sqlite3.connect(config.state_dir / "dicomnode.sqlite3") as db:
            spans = db.execute("SELECT finished_at - started_at FROM jobs ORDER BY id").fetchall()
        lines = len(read_records(config.state_dir, MODEL))
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
        pacs.terminate()
        pacs.wait(timeout=10)
    if failed:
        raise RuntimeError(f"{label}: a job failed: {failed[0]}")
    counted = len(cases) - 1
    latency = [float(span) for (span,) in spans[1:]]
    return {
        "configuration": label, "series": counted,
        "node_cpu_s_per_job": round(cpu / counted, 2),
        "result_latency_s_mean": round(sum(latency) / counted, 2),
        "follow_up_s_mean": round(sum(follow_ups) / counted, 2),
        "shadow_lines": lines,
    }  # fmt: skip


def main() -> int:
    """Run the three configurations and print (and optionally write) the rows."""
    if any(os.environ.get(name) != value for name, value in ONE_THREAD.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ONE_THREAD})
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--series", type=int, default=3)
    parser.add_argument("--rows", type=int, default=192)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="celery-shadow-bench-") as tmp:
        root = Path(tmp)
        cases = [
            write_series(generate_pair(300 + i, "ht", args.rows, args.slices,
                                       baseline_hu=70.0).baseline, root / "in" / str(i))
            for i in range(args.series + 1)
        ]  # fmt: skip
        server, broker = _redis(root)
        try:
            rows = [
                _run("in-process, shadow", cases, root / "p", None, shadow=True),
                _run("celery, no shadow", cases, root / "c0", broker, shadow=False),
                _run("celery, shadow", cases, root / "c1", broker, shadow=True),
            ]
        finally:
            server.terminate()
            server.wait(timeout=10)
    load = os.getloadavg()
    for row in rows:
        sys.stdout.write(json.dumps(row) + "\n")
    sys.stdout.write(json.dumps({"load_average_after": [round(v, 1) for v in load]}) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "load_average_after": load}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
