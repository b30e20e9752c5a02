"""Throughput of the node's jobs on 1 and on 2 Celery workers, beside the embedded queue
(jobs in the node's own threads), in one run, with every job queued before any starts.

Each configuration gets a fresh node that first receives all ``--series`` generated head
CTs (each with an inserted haematoma, sent by DCMTK storescu) while its jobs are held:
every job is queued and claimed, but the node's job callback waits on a gate. Celery
workers (``dicomnode worker`` processes, a real Redis from Debian's ``redis-server`` as
the broker) are started and warm before the gate opens: each configuration first runs
one warm-up series per worker (or thread), so lazy imports and building the pipeline are
not in the figure. The clock starts when the gate
opens (the first job starts) and stops at the last result acknowledged by the
destination, DCMTK storescp (the file time of the last object it wrote, written before
it answers). So the figure is the processing throughput, not the sender's. Each row also
has the jobs' mean stage split (``pipelines.stages``, with Celery's ``dispatch``,
``broker``, ``transfer`` and ``result``); ``broker`` includes the wait for a free worker.

Every process of the run (the node with its pipeline threads, each worker) uses one
BLAS / OpenMP / torch thread (``OMP_NUM_THREADS=1`` and friends; the script restarts
itself with them), so two workers can use two cores. Rows: the embedded queue with 1 and
2 threads (one interpreter: the GIL bounds 2 threads), Celery with 1 and 2 workers. On a
2-core machine two workers cannot exceed 2x, and the node's own sending shares the cores.

Run: ``PYTHONPATH=. .venv/bin/python bench/celery_scaling.py [--series 8] [--json out]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from dicomnode.config import NodeConfig
from dicomnode.demo import DEMO_PACS_AET, DEMO_SCANNER_AET
from dicomnode.distributed import celery_processor
from dicomnode.node import JobSpec, Node, Process
from dicomnode.ports import free_port
from dicomnode.processing import processor, reporting
from pipelines.lesions import insert_lesion
from pipelines.stages import STAGES
from pipelines.synthetic import synthetic_head_ct, write_series

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                     "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")}  # fmt: skip
START_TIMEOUT_S = 180.0


def _case(index: int, folder: Path, rows: int, slices: int) -> list[Path]:
    """A generated head CT with a 12 mm, 70 HU haematoma (so every stage runs in full)."""
    datasets = synthetic_head_ct(seed=200 + index, n_slices=slices, rows=rows)
    insert_lesion(datasets, center_mm=None, radius_mm=12.0, hu=70.0, seed=index)
    return write_series(datasets, folder)


def _config(
    base: Path, pacs_port: int, broker: str | None, threads: int, pipeline: str
) -> NodeConfig:
    """A node routing every head CT to ``pipeline`` with ``threads`` worker threads, on
    Celery when ``broker``."""
    data = node_settings(base, pacs_port, broker, pipeline)
    data["worker"] = {"threads": threads}
    return NodeConfig.model_validate(data)


def node_settings(
    base: Path, pacs_port: int, broker: str | None, pipeline: str
) -> dict[str, object]:
    """The settings of a node in ``base`` routing every head CT to ``pipeline`` and
    sending to the PACS on ``pacs_port``, on Celery when ``broker``."""
    data: dict[str, object] = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port()},
        "allowed_callers": [{"ae_title": DEMO_SCANNER_AET, "host": "127.0.0.1"}],
        "destinations": {"PACS": {"ae_title": DEMO_PACS_AET, "host": "127.0.0.1",
                                  "port": pacs_port}},
        "routes": [{"name": "head", "match": {"modality": ["CT"]},
                    "pipeline": pipeline, "destinations": ["PACS"]}],
        "stable_age_s": 1.0, "poll_interval_s": 0.05,
        "outbox": {"initial_delay_s": 0.2, "max_delay_s": 1.0},
        "spool_dir": str(base / "spool"), "state_dir": str(base / "state"),
    }  # fmt: skip
    if broker is not None:
        data["celery"] = {"broker_url": broker, "job_timeout_s": 1800}
    return data


def _start_workers(count: int, broker: str, folder: Path) -> list[subprocess.Popen[bytes]]:
    """``count`` ``dicomnode worker`` processes, started together, all ready on return."""
    toml = folder / "worker.toml"
    toml.write_text(
        f'spool_dir = "{folder / "ws"}"\nstate_dir = "{folder / "wst"}"\n'
        '[[allowed_callers]]\nae_title = "X"\n'
        f'[celery]\nbroker_url = "{broker}"\n'
    )
    workers, logs = [], []
    for index in range(count):
        logs.append(folder / f"worker{index}.log")
        with logs[-1].open("wb") as out:
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "dicomnode.cli", "worker", "--config", str(toml),
                 "--hostname", f"w{index}@bench"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            ))  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT_S
    for log in logs:
        while "celery worker ready" not in log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"a worker did not start; see {log}")
            time.sleep(0.2)
    return workers


def _gated(process: Process, gate: threading.Event) -> Process:
    """``process``, waiting for ``gate`` before each job."""

    def run(job: JobSpec) -> list[Path]:
        gate.wait()
        return process(job)

    return run


def _storescp(folder: Path, port: int) -> subprocess.Popen[bytes]:
    """DCMTK storescp on ``port`` writing every object it receives into ``folder``."""
    folder.mkdir(parents=True)
    executable = shutil.which("storescp") or "/usr/bin/storescp"
    return subprocess.Popen(
        [executable, "-aet", DEMO_PACS_AET, "-od", str(folder), "+B", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _storescu(port: int, paths: list[Path]) -> None:
    """Send one series with DCMTK storescu, one association."""
    executable = shutil.which("storescu") or "/usr/bin/storescu"
    subprocess.run(
        [executable, "-aet", DEMO_SCANNER_AET, "-aec", "DICOMNODE", "127.0.0.1", str(port),
         *map(str, paths)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` every 20 ms; ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _run(
    label: str, warm_up: list[list[Path]], series: list[list[Path]], folder: Path,
    broker: str | None, workers: int, threads: int, pipeline: str,
) -> dict[str, object]:  # fmt: skip
    """Warm a fresh node up with ``warm_up``; then queue every series and time their jobs
    from the first start to the last result."""
    folder.mkdir(parents=True)
    pacs_port = free_port()
    pacs = _storescp(folder / "pacs", pacs_port)
    started = _start_workers(workers, broker, folder) if broker else []
    config = _config(folder / "node", pacs_port, broker, threads, pipeline)
    gate = threading.Event()
    process = _gated(celery_processor(config) if broker else processor(config), gate)
    try:
        with Node(config, process, reporting()) as node:
            for paths in warm_up:  # one job per worker (or thread): imports, pipelines built
                _storescu(config.node.port, paths)
            _wait(lambda: len(node.jobs.all()) == len(warm_up), 120, "the warm-up jobs queued")
            gate.set()
            _wait(lambda: node.is_idle(), 600, "the warm-up results")
            gate.clear()
            for paths in series:
                _storescu(config.node.port, paths)
            queued = len(warm_up) + len(series)
            _wait(lambda: len(node.jobs.all()) == queued, 120, "every job queued")
            begin = time.time()
            gate.set()
            _wait(lambda: node.is_idle(), 3600, "every result delivered")
            failed = [job.reason for job in node.jobs.all() if job.reason]
            timed = [node.jobs.stages(job.id) for job in node.jobs.all()]
            timed = [split for split in timed[len(warm_up) :] if split]
            results = [path.stat().st_mtime for path in (folder / "pacs").iterdir()]
            results = [t for t in results if t >= begin]
    finally:
        for worker in started:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
        pacs.terminate()
        pacs.wait(timeout=10)
    if failed:
        raise RuntimeError(f"{label}: a job failed: {failed[0]}")
    wall = max(results) - begin
    return {
        "configuration": label, "series": len(series), "results_after_start": len(results),
        "wall_s": round(wall, 2), "jobs_per_min": round(60 * len(series) / wall, 2),
        "mean_stage_s": {name: round(sum(t.get(name, 0.0) for t in timed) / len(timed), 2)
                         for name in STAGES if any(t.get(name) for t in timed)},
    }  # fmt: skip


def _redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A throw-away redis-server on a free loopback port, answering; and its URL."""
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def answers() -> bool:
        try:
            return bool(redis.Redis(port=port).ping())
        except redis.ConnectionError:
            return False

    _wait(answers, 30, "redis-server")
    return server, f"redis://127.0.0.1:{port}/0"


def main() -> int:
    """Run the four configurations and print (and optionally write) the table."""
    if any(os.environ.get(name) != value for name, value in ONE_THREAD.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ONE_THREAD})
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--rows", type=int, default=192)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--pipeline", default="hyperdense_regions")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    n, pipeline = args.series, args.pipeline
    with tempfile.TemporaryDirectory(prefix="celery-bench-") as tmp:
        root = Path(tmp)
        cases = [_case(i, root / "in" / str(i), args.rows, args.slices) for i in range(n + 2)]
        warm, series = cases[:2], cases[2:]
        server, broker = _redis(root)
        try:
            rows = [
                _run("embedded, 1 thread", warm[:1], series, root / "e1", None, 0, 1, pipeline),
                _run("embedded, 2 threads", warm, series, root / "e2", None, 0, 2, pipeline),
                _run("celery, 1 worker", warm[:1], series, root / "c1", broker, 1, n, pipeline),
                _run("celery, 2 workers", warm, series, root / "c2", broker, 2, n, pipeline),
            ]
        finally:
            server.terminate()
            server.wait(timeout=10)
    base = float(rows[2]["wall_s"])  # type: ignore[arg-type]
    for row in rows:
        row["speed_vs_1_worker"] = round(base / float(row["wall_s"]), 2)  # type: ignore[arg-type]
        sys.stdout.write(json.dumps(row) + "\n")
    load = os.getloadavg()
    sys.stdout.write(json.dumps({"load_average_after": [round(v, 1) for v in load]}) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "load_average_after": load}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
