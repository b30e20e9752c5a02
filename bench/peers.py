"""What the bench harnesses drive from the outside: the node as a process, DCMTK storescu,
a real Orthanc, and the node's SQLite state read only.

Nothing here imports ``dicomnode`` but its free-port helper (``dicomnode.ports``): the
harnesses treat the node as a black box (its CLI, its DICOM port, its state file), so they
keep working while its internals change.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pynetdicom import AE

from dicomnode.ports import free_port

REPO = Path(__file__).resolve().parents[1]
NODE_AE = "DICOMNODE"
SENDER_AE = "STORESCU"
VERIFICATION = "1.2.840.10008.1.1"
STORESCU = "/usr/bin/storescu"
ORTHANC = "/usr/sbin/Orthanc"

# States after which nothing more happens to a row. Any other state (including one added
# later) counts as work in progress, so an unknown state makes waiting time out rather
# than finish early.
JOB_TERMINAL = frozenset({"done", "failed", "superseded", "cancelled"})
OUTBOX_TERMINAL = frozenset({"sent", "failed", "superseded", "cancelled"})
SERIES_BUSY = frozenset({"receiving"})

_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((.+)\)")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b")


def missing_tools(names: Sequence[str]) -> list[str]:
    """The executables among ``names`` (absolute paths) that are not installed."""
    return [name for name in names if not Path(name).exists()]


def peak_rss_mb(pid: int) -> float | None:
    """A live process's peak resident memory (VmHWM) in MiB, ``None`` once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return None


def node_config_toml(
    base: Path,
    port: int,
    destination: tuple[str, int] | None,
    stable_age_s: float,
    route: bool = True,
) -> Path:
    """Write a node config under ``base``: DCMTK and pynetdicom senders on loopback may
    store; CT series go to ``hyperdense_regions`` and its results to ``destination``
    (AE title, port on loopback) when given."""
    lines = [
        f"stable_age_s = {stable_age_s}",
        "poll_interval_s = 0.1",
        'spool_dir = "spool"',
        'state_dir = "state"',
        "",
        "[node]",
        f'ae_title = "{NODE_AE}"',
        'host = "127.0.0.1"',
        f"port = {port}",
    ]
    for title in (SENDER_AE, "ECHOSCU", "PYNETDICOM", "FUZZSCU"):
        lines += ["", "[[allowed_callers]]", f'ae_title = "{title}"', 'host = "127.0.0.1"']
    lines += ["", "[outbox]", "initial_delay_s = 0.5", "max_delay_s = 2.0", "max_attempts = 1000"]
    destinations: list[str] = []
    if destination is not None:
        title, dport = destination
        lines += ["", "[destinations.PACS]", f'ae_title = "{title}"', 'host = "127.0.0.1"']
        lines += [f"port = {dport}"]
        destinations = ["PACS"]
    if route:
        lines += ["", "[[routes]]", 'name = "head-ct"', 'pipeline = "hyperdense_regions"']
        lines += [f"destinations = {json.dumps(destinations)}", "[routes.match]"]
        lines += ['modality = "CT"']
    path = base / "node.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def echo_ok(port: int, calling: str = "ECHOSCU", timeout_s: float = 5.0) -> bool:
    """Whether the node on loopback ``port`` answers C-ECHO with Success."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.get("Status", -1)) == 0
    finally:
        assoc.release()


@dataclass
class NodeProcess:
    """``python -m dicomnode.cli serve`` on a config; its stderr (the JSON log) goes to
    ``log_path``, its stdout next to it (``.stdout``)."""

    config: Path
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    repo: Path = REPO  # the checkout whose node runs (another one for a before/after run)
    starts: int = 0
    start_seconds: list[float] = field(default_factory=list)

    def start(self, timeout_s: float = 60.0) -> float:
        """Start the node and wait until it answers C-ECHO; return the seconds it took."""
        began = time.monotonic()
        stdout_path = self.log_path.with_suffix(".stdout")
        with self.log_path.open("ab") as log, stdout_path.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dicomnode.cli", "--log-level", "INFO",
                 "serve", "--config", str(self.config)],
                cwd=self.repo, stdout=out, stderr=log,
                env=dict(os.environ, PYTHONPATH=str(self.repo), TCP_NODELAY="1"),
            )  # fmt: skip
        self.starts += 1
        while time.monotonic() - began < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"node exited with {self.process.returncode}; see {self.log_path}"
                )
            if echo_ok(self.port, timeout_s=2.0):
                took = time.monotonic() - began
                self.start_seconds.append(took)
                return took
            time.sleep(0.1)
        raise TimeoutError(f"node did not answer C-ECHO within {timeout_s} s")

    @property
    def pid(self) -> int:
        """The running node's process id."""
        if self.process is None:
            raise RuntimeError("node is not running")
        return self.process.pid

    def alive(self) -> bool:
        """Whether the node process is still running."""
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        """SIGKILL the node and reap it."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the node and wait; SIGKILL if it does not stop. Returns its exit code."""
        if self.process is None:
            return None
        self.process.terminate()
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.process = None
        return code


@contextmanager
def read_state(state_file: Path) -> Iterator[sqlite3.Connection]:
    """The node's SQLite state, opened read only (safe while the node runs)."""
    conn = sqlite3.connect(f"file:{state_file}?mode=ro", uri=True, timeout=10.0)
    conn.row_factory = sqlite3.Row
    with closing(conn):
        yield conn


def state_rows(state_file: Path, sql: str, args: Sequence[object] = ()) -> list[sqlite3.Row]:
    """Rows of one read-only query; an empty list before the node created its tables."""
    if not state_file.exists():
        return []
    try:
        with read_state(state_file) as db:
            return list(db.execute(sql, tuple(args)).fetchall())
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise


def busy_work(state_file: Path) -> dict[str, int]:
    """What the node still has to do: series receiving, jobs and outbox items not final."""
    busy: dict[str, int] = {}
    for table, column_states, terminal in (
        ("series", "state", None),
        ("jobs", "state", JOB_TERMINAL),
        ("outbox", "state", OUTBOX_TERMINAL),
    ):
        for row in state_rows(
            state_file, f"SELECT {column_states}, count(*) FROM {table} GROUP BY 1"
        ):
            state, count = str(row[0]), int(row[1])
            pending = state in SERIES_BUSY if terminal is None else state not in terminal
            if pending:
                busy[f"{table}.{state}"] = count
    return busy


def wait_idle(state_file: Path, timeout_s: float, settle_s: float = 0.0) -> dict[str, int]:
    """Poll until the node has nothing left to do; return what was still busy (``{}``)."""
    deadline = time.monotonic() + timeout_s
    busy = busy_work(state_file)
    while time.monotonic() < deadline:
        busy = busy_work(state_file)
        if not busy:
            time.sleep(settle_s)
            busy = busy_work(state_file)
            if not busy:
                return {}
        time.sleep(0.2)
    return busy


@dataclass
class StoreRun:
    """One DCMTK storescu run: which files it saw acknowledged with which response."""

    responses: dict[Path, str]
    returncode: int
    seconds: float

    def acknowledged(self) -> list[Path]:
        """Files the node answered Success for."""
        return [path for path, text in self.responses.items() if text == "Success"]


def parse_storescu(lines: Sequence[str], base: Path) -> dict[Path, str]:
    """Per-file store responses from ``storescu -v`` output (``Success``, ``Failure...``)."""
    responses: dict[Path, str] = {}
    current: Path | None = None
    for line in lines:
        sent = _SENDING.search(line)
        if sent:
            current = (base / sent.group(1).strip()).resolve()
            continue
        answered = _RESPONSE.search(line)
        if answered and current is not None:
            responses[current] = answered.group(1).split(":")[0].strip()
            current = None
    return responses


def storescu_command(port: int, files: Sequence[Path]) -> list[str]:
    """DCMTK storescu sending ``files`` to the node in one association, verbosely."""
    return [STORESCU, "-v", "-aet", SENDER_AE, "-aec", NODE_AE, "-ta", "10", "-ts", "20",
            "127.0.0.1", str(port), *map(str, files)]  # fmt: skip


def store_files(port: int, files: Sequence[Path], timeout_s: float = 120.0) -> StoreRun:
    """Send ``files`` with storescu and wait for it; parse what was acknowledged."""
    began = time.monotonic()
    done = subprocess.run(
        storescu_command(port, files), capture_output=True, text=True, timeout=timeout_s
    )
    lines = (done.stdout + done.stderr).splitlines()
    return StoreRun(parse_storescu(lines, Path.cwd()), done.returncode, time.monotonic() - began)


class Orthanc:
    """A real Orthanc (Debian package) on free loopback ports, storage under ``folder``.

    Orthanc 1.10 listens on every interface; remote access stays off and the harness only
    talks to it on loopback.
    """

    def __init__(self, folder: Path, ae_title: str = "ORTHANC") -> None:
        """Prepare the configuration; :meth:`start` runs it."""
        self.folder = folder
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.config_path = folder / "orthanc.json"
        settings = {
            "Name": "dicomnode-bench-pacs",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "DicomAet": ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {},
            "Plugins": [],
            "HttpServerEnabled": True,
            "StableAge": 1,
            "OverwriteInstances": False,
        }
        self.config_path.write_text(json.dumps(settings, indent=2))

    def start(self, timeout_s: float = 30.0) -> None:
        """Start Orthanc and wait until its REST API answers."""
        with (self.folder / "orthanc.log").open("ab") as log:
            self.process = subprocess.Popen(
                [ORTHANC, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited; see {self.folder / 'orthanc.log'}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        raise TimeoutError("Orthanc did not answer in time")

    def stop(self) -> None:
        """Stop Orthanc."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None

    def get(self, path: str) -> Any:
        """GET a REST resource and decode its JSON."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    def count_study_instances(self, study_uid: str) -> int:
        """How many instances Orthanc holds in one study."""
        query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/tools/find",
            data=json.dumps(query).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return len(json.loads(response.read()))

    def instances(self) -> list[dict[str, str]]:
        """Main tags of every stored instance (SOP, series, study UIDs and modality)."""
        found = self.get("/instances?expand")
        rows = []
        for item in found:
            tags = item.get("MainDicomTags", {})
            series = self.get(f"/series/{item['ParentSeries']}")
            study = self.get(f"/studies/{series['ParentStudy']}")
            rows.append(
                {
                    "SOPInstanceUID": tags.get("SOPInstanceUID", ""),
                    "SeriesInstanceUID": series["MainDicomTags"].get("SeriesInstanceUID", ""),
                    "StudyInstanceUID": study["MainDicomTags"].get("StudyInstanceUID", ""),
                    "Modality": series["MainDicomTags"].get("Modality", ""),
                }
            )
        return rows


def progress(line: str) -> None:
    """One progress line on stderr (the summary goes to stdout)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def write_results(summary: dict[str, Any], results_dir: Path, name: str) -> Path:
    """Write the summary as JSON to ``results_dir/<name>-<UTC time>.json``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = results_dir / f"{name}-{stamp}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def log_summary(log_path: Path) -> dict[str, Any]:
    """What the node's log shows: line counts by level, lines that are not JSON (library
    warnings printed raw, tracebacks), crashed threads and the exceptions they raised."""
    counts: Counter[str] = Counter()
    exceptions: Counter[str] = Counter()
    logged: Counter[str] = Counter()
    for line in log_path.read_text(errors="replace").splitlines():
        counts["lines"] += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            counts["not_json"] += 1
            counts["thread_crashes"] += int(line.startswith("Exception in thread"))
            counts["raw_warnings"] += int("Warning: " in line)
            if EXCEPTION_LINE.match(line):
                exceptions[line[:100]] += 1
            continue
        counts[f"level.{record.get('level', '')}"] += 1
        if record.get("exception"):
            logged[str(record.get("event"))[:100]] += 1
    return {
        "counts": dict(counts),
        "thread_exceptions": dict(exceptions.most_common(10)),
        "logged_exceptions_by_event": dict(logged.most_common(10)),
    }
