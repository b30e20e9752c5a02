"""Latency and memory of the node on the GE head CT, beside DCMTK storescp as reference.

Measures, over ``--runs`` sendings of the GE head CT (with an inserted lesion):
- result latency: from the last instance acknowledged by the node to the last result
  (SEG, SC, SR) acknowledged by the destination; reported with and without the
  configured stable age, which the node waits by design;
- ingest time of the 28 instances by DCMTK storescu to the node and, in the same run, to
  DCMTK storescp (the reference), as a ratio;
- the node process's peak resident memory (VmHWM).

Run: ``.venv/bin/python bench/latency.py`` (needs dcmtk; uses ../shared where present).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event

from dicomnode.config import Destination
from dicomnode.demo import free_port, prepare_case, shared_dir
from dicomnode.echo import echo
from dicomnode.sender import send_files

REPO = Path(__file__).resolve().parents[1]
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"


class TimingPacs:
    """A storage SCP that records when it acknowledged each instance."""

    def __init__(self, port: int) -> None:
        """Prepare a destination on loopback ``port``."""
        self.port = port
        self.arrivals: list[float] = []
        self.lock = threading.Lock()
        self.ae = AE(ae_title="BENCHPACS")
        self.ae.supported_contexts = AllStoragePresentationContexts

    def on_store(self, event: Event) -> int:
        """Acknowledge and time-stamp."""
        with self.lock:
            self.arrivals.append(time.perf_counter())
        return 0x0000

    def start(self) -> None:
        """Listen in the background."""
        server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.on_store)]
        )
        if server is None:
            raise RuntimeError("the benchmark PACS did not start")
        self.server = server


def _config_toml(base: Path, port: int, pacs_port: int, stable_age_s: float) -> Path:
    path = base / "bench.toml"
    path.write_text(
        f"""stable_age_s = {stable_age_s}
poll_interval_s = 0.05
spool_dir = "spool"
state_dir = "state"

[node]
ae_title = "DICOMNODE"
host = "127.0.0.1"
port = {port}

[[allowed_callers]]
ae_title = "BENCHSCU"
[[allowed_callers]]
ae_title = "STORESCU"

[destinations.PACS]
ae_title = "BENCHPACS"
host = "127.0.0.1"
port = {pacs_port}

[[routes]]
name = "head-ct"
pipeline = "hyperdense_regions"
destinations = ["PACS"]
[routes.match]
modality = "CT"
"""
    )
    return path


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _storescu_seconds(port: int, aet: str, files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [STORESCU, "-aec", aet, "127.0.0.1", str(port), *map(str, files)],
        check=True, capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - start


def main() -> int:
    """Run the benchmark and print a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stable-age", type=float, default=2.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dicomnode-bench-"))
    case = prepare_case(work / "case", shared_dir())
    node_port, pacs_port, ref_port = free_port(), free_port(), free_port()
    pacs = TimingPacs(pacs_port)
    pacs.start()
    config = _config_toml(work, node_port, pacs_port, args.stable_age)
    env = dict(os.environ, TCP_NODELAY="1")
    node = subprocess.Popen(
        [str(REPO / ".venv/bin/dicomnode"), "--log-level", "WARNING",
         "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=(work / "node.log").open("w"), env=env,
    )  # fmt: skip
    (work / "storescp").mkdir()
    reference = subprocess.Popen(
        [STORESCP, "-od", str(work / "storescp"), "-aet", "STORESCP", str(ref_port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not echo("127.0.0.1", node_port, "DICOMNODE", "STORESCU"):
            if time.monotonic() > deadline:
                raise TimeoutError("node did not start")
            time.sleep(0.2)
        target = Destination(ae_title="DICOMNODE", host="127.0.0.1", port=node_port)
        latencies, ingest_node, ingest_ref = [], [], []
        for _ in range(args.runs):
            before = len(pacs.arrivals)
            send_files(target, case.files, "BENCHSCU")
            acked = time.perf_counter()
            deadline = time.monotonic() + 300
            while len(pacs.arrivals) < before + 3:
                if time.monotonic() > deadline:
                    raise TimeoutError("results did not arrive")
                time.sleep(0.01)
            latencies.append(max(pacs.arrivals[before:]) - acked)
            ingest_node.append(_storescu_seconds(node_port, "DICOMNODE", case.files))
            ingest_ref.append(_storescu_seconds(ref_port, "STORESCP", case.files))
            time.sleep(args.stable_age + 0.5)  # let the extra sending's job run before timing again
            while len(pacs.arrivals) < before + 6:
                time.sleep(0.05)
        median = statistics.median(latencies)
        summary = {
            "case": case.description,
            "instances": len(case.files),
            "runs": args.runs,
            "stable_age_s": args.stable_age,
            "latency_s_median": round(median, 3),
            "latency_s_all": [round(x, 3) for x in latencies],
            "latency_minus_stable_age_s_median": round(median - args.stable_age, 3),
            "ingest_s_node_median": round(statistics.median(ingest_node), 3),
            "ingest_s_dcmtk_storescp_median": round(statistics.median(ingest_ref), 3),
            "ingest_ratio_node_over_storescp": round(
                statistics.median(ingest_node) / statistics.median(ingest_ref), 2
            ),
            "node_peak_rss_mb": round(_peak_rss_mb(node.pid), 1),
        }
    finally:
        node.terminate()
        reference.terminate()
        pacs.server.shutdown()
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
