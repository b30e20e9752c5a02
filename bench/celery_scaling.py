"""Throughput of the node with its jobs on 1 and on 2 Celery workers, beside the embedded
queue (jobs in the node's own thread), in one run.

Each configuration receives the same ``--series`` synthetic head CTs, each with an inserted
haematoma (sent by pynetdicom
one after the other, stable age 1 s) and runs ``--pipeline`` (default
``hyperdense_regions``); the
figure is the wall time from the first instance sent to the last result acknowledged by
the destination, and jobs per minute. A real Redis (Debian's ``redis-server``) is the
broker; workers are ``dicomnode worker`` processes on this machine (on a real site they
run on other hosts). On a 2-core machine two workers cannot exceed 2x, and the node's own
receiving and sending share those cores.

Run: ``.venv/bin/python bench/celery_scaling.py [--series 8] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from dicomnode.config import Destination, NodeConfig
from dicomnode.demo import DEMO_PACS_AET, DEMO_SCANNER_AET, DemoPacs, free_port
from dicomnode.distributed import celery_processor
from dicomnode.node import Node
from dicomnode.processing import processor, reporting
from dicomnode.sender import send_files
from pipelines.lesions import insert_lesion
from pipelines.synthetic import synthetic_head_ct, write_series

REPO = Path(__file__).resolve().parents[1]
ROWS, SLICES = 128, 24


def _case(index: int, folder: Path) -> list[Path]:
    """A generated head CT with a 12 mm, 70 HU haematoma (so risk models run in full)."""
    datasets = synthetic_head_ct(seed=200 + index, n_slices=SLICES, rows=ROWS)
    insert_lesion(datasets, center_mm=None, radius_mm=12.0, hu=70.0, seed=index)
    return write_series(datasets, folder)


def _config(
    base: Path, pacs_port: int, broker: str | None, threads: int, pipeline: str
) -> NodeConfig:
    """A node routing every head CT to ``pipeline``, on Celery when ``broker``."""
    data: dict[str, object] = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port()},
        "allowed_callers": [{"ae_title": DEMO_SCANNER_AET, "host": "127.0.0.1"}],
        "destinations": {"PACS": {"ae_title": DEMO_PACS_AET, "host": "127.0.0.1",
                                  "port": pacs_port}},
        "routes": [{"name": "head", "match": {"modality": ["CT"]},
                    "pipeline": pipeline, "destinations": ["PACS"]}],
        "stable_age_s": 1.0, "poll_interval_s": 0.1,
        "spool_dir": str(base / "spool"), "state_dir": str(base / "state"),
        "worker": {"threads": threads},
    }  # fmt: skip
    if broker is not None:
        data["celery"] = {"broker_url": broker, "job_timeout_s": 600}
    return NodeConfig.model_validate(data)


def _start_workers(count: int, broker: str, folder: Path) -> list[subprocess.Popen[bytes]]:
    """``count`` ``dicomnode worker`` processes, each ready before this returns."""
    toml = folder / "worker.toml"
    toml.write_text(
        f'spool_dir = "{folder / "ws"}"\nstate_dir = "{folder / "wst"}"\n'
        '[[allowed_callers]]\nae_title = "X"\n'
        f'[celery]\nbroker_url = "{broker}"\n'
    )
    workers = []
    for index in range(count):
        log = folder / f"worker{index}.log"
        with log.open("wb") as out:
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "dicomnode.cli", "worker", "--config", str(toml),
                 "--hostname", f"w{index}@bench"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
            ))  # fmt: skip
        deadline = time.monotonic() + 120
        while "celery worker ready" not in log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {index} did not start; see {log}")
            time.sleep(0.2)
    return workers


def _run(label: str, series: list[list[Path]], folder: Path, broker: str | None,
         workers: int, pipeline: str) -> dict[str, object]:  # fmt: skip
    """Send every series to a fresh node and time until every result is delivered."""
    folder.mkdir(parents=True)
    pacs_port = free_port()
    started = _start_workers(workers, broker, folder) if broker else []
    config = _config(folder / "node", pacs_port, broker, max(workers, 1) * 2, pipeline)
    process = celery_processor(config) if broker else processor(config)
    try:
        with (
            DemoPacs(folder / "pacs", pacs_port).running(),
            Node(config, process, reporting()) as node,
        ):
            scanner = Destination(ae_title="DICOMNODE", host="127.0.0.1", port=config.node.port)
            begin = time.perf_counter()
            for paths in series:
                send_files(scanner, paths, DEMO_SCANNER_AET)
            sent = time.perf_counter()
            while not (len(node.jobs.all()) == len(series) and node.is_idle()):
                time.sleep(0.1)
            end = time.perf_counter()
            failed = [job.reason for job in node.jobs.all() if job.reason]
    finally:
        for worker in started:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=30)
    if failed:
        raise RuntimeError(f"{label}: a job failed: {failed[0]}")
    wall = end - begin
    return {"configuration": label, "series": len(series), "wall_s": round(wall, 1),
            "sending_s": round(sent - begin, 1),
            "jobs_per_min": round(60 * len(series) / wall, 2)}  # fmt: skip


def main() -> int:
    """Run the three configurations and print (and optionally write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--pipeline", default="hyperdense_regions")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="celery-bench-") as tmp:
        root = Path(tmp)
        series = [_case(i, root / "in" / str(i)) for i in range(args.series)]
        port = free_port()
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        broker = f"redis://127.0.0.1:{port}/0"
        try:
            while True:
                try:
                    redis.Redis(port=port).ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.1)
            rows = [
                _run("embedded (2 threads)", series, root / "embedded", None, 0, args.pipeline),
                _run("celery, 1 worker", series, root / "one", broker, 1, args.pipeline),
                _run("celery, 2 workers", series, root / "two", broker, 2, args.pipeline),
            ]
        finally:
            server.terminate()
            server.wait(timeout=10)
    base = float(rows[1]["wall_s"])  # type: ignore[arg-type]
    for row in rows:
        row["speed_vs_1_worker"] = round(base / float(row["wall_s"]), 2)  # type: ignore[arg-type]
        sys.stdout.write(json.dumps(row) + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
