"""kill -9 harness: SIGKILL the node during ingest, processing and sending, restart it on
the same spool and state, and check that nothing it acknowledged was lost and that the
destination (a real Orthanc) holds each result exactly once.

Each kill point sends its own generated head CT series (``pipelines.synthetic``) with
DCMTK storescu and kills the node at a point of one phase, in turn:

- ``ingest``: right after the association is accepted, right after the k-th instance was
  acknowledged (between instances), a few milliseconds later (while the next instance
  is journaled), or a few milliseconds after the last one (while the journal's mover
  puts the series into the spool and state, before the release is answered); after the
  restart the instances storescu did not see acknowledged are sent again, as a modality
  would;
- ``processing``: while the series' job is ``running`` in the node's state;
- ``sending``: once the job's results are in the outbox, while they go to Orthanc.

At the end the node is left to finish, stopped, and its state is read (read only):

- every instance storescu saw acknowledged is in the state and in the spool, with the
  same SOP Instance UID and pixel data as sent (``lost`` must be 0);
- every result the outbox recorded as sent is in Orthanc, Orthanc holds no result the
  node did not send (orphans), and each series' results are there once per kind (SEG, SC,
  SR ...); a series whose results are there more than once counts as a duplicate unless
  it really changed (an instance arrived after its first job was queued).

Run from the repository root (2 shared cores: about 7 minutes at the defaults)::

    .venv/bin/python -m bench.kill9 --kills 24 --seed 0

It prints a table and writes ``bench/results/kill9-<UTC time>.json``; exit status 0 when
no acknowledged instance was lost and Orthanc holds no duplicate, orphan or missing result.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from bench.peers import (
    ORTHANC,
    REPO,
    STORESCU,
    NodeProcess,
    Orthanc,
    free_port,
    log_summary,
    missing_tools,
    node_config_toml,
    parse_storescu,
    progress,
    state_rows,
    store_files,
    storescu_command,
    wait_idle,
    write_results,
)
from pipelines.synthetic import synthetic_head_ct, write_series

PHASES = ("ingest", "processing", "sending")
INGEST_VARIANTS = ("after_association", "between_instances", "mid_instance", "mid_move")
RESULTS_DIR = REPO / "bench" / "results"


@dataclass(frozen=True)
class Settings:
    """One run's parameters."""

    kills: int = 24
    seed: int = 0
    rows: int = 128
    slices: int = 16
    stable_age_s: float = 10.0
    phase_timeout_s: float = 60.0
    finish_timeout_s: float = 300.0
    work: Path | None = None
    results_dir: Path = RESULTS_DIR


@dataclass
class SentSeries:
    """One generated series and what the node acknowledged of it."""

    series_uid: str
    study_uid: str
    files: list[Path]
    acknowledged: set[Path] = field(default_factory=set)
    resends: int = 0


@dataclass
class KillPoint:
    """Where one SIGKILL landed and what the state showed right after it."""

    index: int
    phase: str
    variant: str
    delay_s: float
    acknowledged_before_kill: int
    observed: dict[str, int]
    restart_s: float


def _series_uid(files: Sequence[Path]) -> tuple[str, str]:
    """Series and study UIDs of a written series."""
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)


def _observe(state_file: Path, series_uid: str) -> dict[str, int]:
    """Counts of the series' instances, its jobs by state and their outbox items by state."""
    seen: dict[str, int] = {}
    for row in state_rows(
        state_file, "SELECT count(*) FROM instances WHERE series_instance_uid = ?", [series_uid]
    ):
        seen["instances"] = int(row[0])
    for row in state_rows(
        state_file,
        "SELECT state, count(*) FROM jobs WHERE series_instance_uid = ? GROUP BY state",
        [series_uid],
    ):
        seen[f"jobs.{row[0]}"] = int(row[1])
    for row in state_rows(
        state_file,
        "SELECT o.state, count(*) FROM outbox o JOIN jobs j ON j.id = o.job_id "
        "WHERE j.series_instance_uid = ? GROUP BY o.state",
        [series_uid],
    ):
        seen[f"outbox.{row[0]}"] = int(row[1])
    return seen


def _wait_for(state_file: Path, sql: str, args: Sequence[object], timeout_s: float) -> bool:
    """Poll a read-only query until it returns a row, or time out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if state_rows(state_file, sql, args):
            return True
        time.sleep(0.005)
    return False


def _kill_during_ingest(
    node: NodeProcess, series: SentSeries, variant: str, rng: np.random.Generator
) -> tuple[float, int]:
    """Send the series with storescu and SIGKILL the node at the chosen point of it."""
    if variant == "after_association":
        target = 0
    elif variant == "mid_move":  # the last instance acknowledged, its journal being moved
        target = len(series.files)
    else:
        target = int(rng.integers(1, len(series.files)))
    delay = float(rng.uniform(0.0, 0.02)) if variant in ("mid_instance", "mid_move") else 0.0
    sender = subprocess.Popen(
        storescu_command(node.port, series.files),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1,
    )  # fmt: skip
    if sender.stderr is None:
        raise RuntimeError("storescu has no stderr pipe")
    lines: list[str] = []
    acks = 0
    killed = False
    for line in sender.stderr:
        lines.append(line.rstrip("\n"))
        acks += int("Received Store Response" in line)
        reached = acks == target if target else "Association Accepted" in line
        if reached:
            time.sleep(delay)
            node.kill9()
            killed = True
            break
    if not killed:
        node.kill9()  # storescu finished first: the kill lands after the last instance
    _, rest = sender.communicate(timeout=60)
    lines += rest.splitlines()
    acknowledged = {p for p, text in parse_storescu(lines, Path.cwd()).items() if text == "Success"}
    series.acknowledged |= acknowledged
    return delay, len(acknowledged)


def _send_all(node: NodeProcess, series: SentSeries) -> None:
    """Send the instances not yet acknowledged, until all are (three tries)."""
    for _ in range(3):
        missing = [p for p in series.files if p not in series.acknowledged]
        if not missing:
            return
        series.resends += 1 if series.acknowledged else 0
        series.acknowledged |= set(store_files(node.port, missing).acknowledged())


def _kill_point(
    index: int, phase: str, node: NodeProcess, pacs: Orthanc, series: SentSeries,
    state_file: Path, settings: Settings, rng: np.random.Generator,
) -> KillPoint:  # fmt: skip
    """Run one kill point of ``phase`` on ``series``, restart the node, finish sending."""
    variant, delay = phase, 0.0
    job_of_series = "SELECT 1 FROM jobs WHERE series_instance_uid = ? AND state = 'running'"
    outbox_of_series = (
        "SELECT 1 FROM outbox o JOIN jobs j ON j.id = o.job_id WHERE j.series_instance_uid = ?"
    )
    if phase == "ingest":
        variant = INGEST_VARIANTS[index // len(PHASES) % len(INGEST_VARIANTS)]
        delay, _ = _kill_during_ingest(node, series, variant, rng)
    else:
        _send_all(node, series)
        query, pause = (
            (job_of_series, rng.uniform(0.0, 0.4))
            if phase == "processing"
            else (outbox_of_series, rng.uniform(0.0, 0.12))
        )
        reached = _wait_for(
            state_file, query, [series.series_uid], settings.stable_age_s + settings.phase_timeout_s
        )
        variant = phase if reached else f"{phase} (not reached: killed after timeout)"
        delay = float(pause)
        time.sleep(delay)
        node.kill9()
    acknowledged = len(series.acknowledged)
    observed = _observe(state_file, series.series_uid)
    # results Orthanc already holds: more than the outbox marked sent means the kill
    # landed between delivery and its record (they are sent again after the restart)
    observed["orthanc_results"] = pacs.count_study_instances(series.study_uid)
    restart = node.start()
    if phase == "ingest":
        _send_all(node, series)
    return KillPoint(
        index, phase, variant, round(delay, 4), acknowledged, observed, round(restart, 2)
    )


def check_instances(series_list: Sequence[SentSeries], state_file: Path) -> dict[str, Any]:
    """Every acknowledged instance is recorded and spooled unchanged."""
    recorded = {
        str(row["sop_instance_uid"]): Path(row["path"])
        for row in state_rows(state_file, "SELECT sop_instance_uid, path FROM instances")
    }
    lost: list[str] = []
    changed: list[str] = []
    acknowledged = 0
    for series in series_list:
        for path in sorted(series.acknowledged):
            acknowledged += 1
            sent = pydicom.dcmread(path)
            sop = str(sent.SOPInstanceUID)
            spooled = recorded.get(sop)
            if spooled is None or not spooled.exists():
                lost.append(sop)
                continue
            kept = pydicom.dcmread(spooled, force=True)
            if str(kept.SOPInstanceUID) != sop or kept.PixelData != sent.PixelData:
                changed.append(sop)
    return {
        "acknowledged": acknowledged,
        "recorded": len(recorded),
        "lost": len(lost),
        "changed": len(changed),
        "lost_uids": lost[:20],
        "changed_uids": changed[:20],
    }


def check_results(
    series_list: Sequence[SentSeries], state_file: Path, pacs: Orthanc
) -> dict[str, Any]:
    """Orthanc holds each sent result once, nothing else, and per series one set of kinds."""
    in_pacs = pacs.instances()
    pacs_uids = Counter(row["SOPInstanceUID"] for row in in_pacs)
    sent_rows = state_rows(
        state_file,
        "SELECT o.path, o.state, j.id AS job, j.series_instance_uid AS series, j.created_at "
        "FROM outbox o JOIN jobs j ON j.id = o.job_id",
    )
    by_series: dict[str, list[str]] = defaultdict(list)
    outbox_states: Counter[str] = Counter()
    result_of: dict[str, tuple[str, str]] = {}
    sent_by_jobs: dict[str, set[int]] = defaultdict(set)
    for row in sent_rows:
        outbox_states[str(row["state"])] += 1
        path = Path(row["path"])
        if row["state"] != "sent" or not path.exists():
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sop = str(ds.SOPInstanceUID)
        sent_by_jobs[sop].add(int(row["job"]))
        if sop not in result_of:
            result_of[sop] = (str(row["series"]), str(ds.Modality))
            by_series[str(row["series"])].append(sop)
    # one UID delivered by two jobs: the destination keeps the first content, silently
    reused = sorted(sop for sop, senders in sent_by_jobs.items() if len(senders) > 1)
    missing = sorted(set(result_of) - set(pacs_uids))
    orphans = sorted(set(pacs_uids) - set(result_of))
    jobs = state_rows(
        state_file, "SELECT series_instance_uid AS series, state, created_at, reason FROM jobs"
    )
    first_job: dict[str, float] = {}
    job_states: Counter[str] = Counter()
    jobs_per_series: Counter[str] = Counter()
    failures: list[str] = []
    for row in jobs:
        job_states[str(row["state"])] += 1
        jobs_per_series[str(row["series"])] += 1
        if row["state"] == "failed":
            failures.append(str(row["reason"]))
        first_job[row["series"]] = min(
            first_job.get(row["series"], float("inf")), row["created_at"]
        )
    changed_after_job = {
        str(row["series"])
        for row in state_rows(
            state_file,
            "SELECT series_instance_uid AS series, max(received_at) AS last FROM instances "
            "GROUP BY series_instance_uid",
        )
        if row["last"] > first_job.get(str(row["series"]), float("inf"))
    }
    duplicates: list[dict[str, Any]] = []
    reprocessed_changed = 0
    without_results: list[str] = []
    for series in series_list:
        kinds = Counter(result_of[sop][1] for sop in by_series.get(series.series_uid, []))
        if not kinds:
            without_results.append(series.series_uid)
            continue
        extra = {kind: n for kind, n in kinds.items() if n > 1}
        if extra and series.series_uid in changed_after_job:
            reprocessed_changed += 1
        elif extra:
            duplicates.append({"series": series.series_uid, "kinds": dict(kinds)})
    return {
        "pacs_instances": len(in_pacs),
        "results_sent": len(result_of),
        "missing_in_pacs": len(missing),
        "orphans_in_pacs": len(orphans),
        "duplicate_series": len(duplicates),
        "duplicates": duplicates[:20],
        "reprocessed_because_changed": reprocessed_changed,
        "series_processed_more_than_once": sum(1 for n in jobs_per_series.values() if n > 1),
        "series_changed_after_first_job": len(changed_after_job),
        "results_resent_under_same_uids": len(reused),
        "series_with_results_resent_under_same_uids": len({result_of[s][0] for s in reused}),
        "series_without_results": len(without_results),
        "outbox_states": dict(outbox_states),
        "job_states": dict(job_states),
        "job_failures": failures[:20],
    }


def run(settings: Settings) -> dict[str, Any]:
    """Run every kill point, let the node finish, check, and return the summary."""
    missing = missing_tools([STORESCU, ORTHANC])
    if missing:
        raise RuntimeError(f"missing tools: {', '.join(missing)} (apt-get install dcmtk orthanc)")
    work = settings.work or Path(tempfile.mkdtemp(prefix="dicomnode-kill9-"))
    rng = np.random.default_rng(settings.seed)
    began = time.monotonic()
    series_list = []
    for index in range(settings.kills):
        datasets = synthetic_head_ct(
            seed=settings.seed * 10_000 + index, n_slices=settings.slices, rows=settings.rows
        )
        files = [p.resolve() for p in write_series(datasets, work / "input" / f"{index:03d}")]
        series_list.append(SentSeries(*_series_uid(files), files=files))
    pacs = Orthanc(work / "orthanc")
    pacs.start()
    port = free_port()
    config = node_config_toml(work, port, (pacs.ae_title, pacs.dicom_port), settings.stable_age_s)
    state_file = work / "state" / "dicomnode.sqlite3"
    node = NodeProcess(config, port, work / "node.log")
    points: list[KillPoint] = []
    try:
        node.start()
        for index, series in enumerate(series_list):
            phase = PHASES[index % len(PHASES)]
            point = _kill_point(index, phase, node, pacs, series, state_file, settings, rng)
            points.append(point)
            progress(f"kill point {index + 1}/{settings.kills}: {point.variant}, {point.observed}")
        progress("waiting for the node to finish")
        still_busy = wait_idle(state_file, settings.finish_timeout_s, settle_s=1.0)
        exit_code = node.stop()
        instances = check_instances(series_list, state_file)
        results = check_results(series_list, state_file, pacs)
    finally:
        node.stop()
        pacs.stop()
    summary: dict[str, Any] = {
        "harness": "kill9",
        "finished_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "work": str(work),
        "series": len(series_list),
        "instances_sent": sum(len(s.files) for s in series_list),
        "resends": sum(s.resends for s in series_list),
        "kill_points": [asdict(p) for p in points],
        "kills_by_phase": dict(Counter(p.variant for p in points)),
        "node_starts": node.starts,
        "restart_s_median": float(np.median(node.start_seconds)) if node.start_seconds else None,
        "still_busy_at_end": still_busy,
        "node_exit_code_on_sigterm": exit_code,
        "instances": instances,
        "results": results,
        "node_log": log_summary(node.log_path),
        "seconds": round(time.monotonic() - began, 1),
    }
    summary["passed"] = (
        instances["lost"] == 0
        and instances["changed"] == 0
        and results["missing_in_pacs"] == 0
        and results["orphans_in_pacs"] == 0
        and results["duplicate_series"] == 0
        and results["results_resent_under_same_uids"] == 0
        and results["series_without_results"] == 0
        and not still_busy
    )
    return summary


def table(summary: dict[str, Any]) -> str:
    """A plain-text table of the kill points and the checks."""
    lines = [
        f"{'#':>3}  {'phase':<10} {'variant':<20} {'delay s':>7} {'acked':>5}  state after kill"
    ]
    for point in summary["kill_points"]:
        observed = ", ".join(f"{k}={v}" for k, v in sorted(point["observed"].items()))
        lines.append(
            f"{point['index']:>3}  {point['phase']:<10} {point['variant']:<20} "
            f"{point['delay_s']:>7.3f} {point['acknowledged_before_kill']:>5}  {observed}"
        )
    instances, results = summary["instances"], summary["results"]
    lines += [
        "",
        f"acknowledged instances: {instances['acknowledged']}  lost: {instances['lost']}  "
        f"changed: {instances['changed']}",
        f"results sent: {results['results_sent']}  in Orthanc: {results['pacs_instances']}  "
        f"missing: {results['missing_in_pacs']}  orphans: {results['orphans_in_pacs']}  "
        f"duplicate series: {results['duplicate_series']}  "
        f"reprocessed (changed): {results['reprocessed_because_changed']}",
        f"series processed more than once: {results['series_processed_more_than_once']} "
        f"(changed after their first job: {results['series_changed_after_first_job']}); "
        f"results re-sent under the same UIDs by a later job: "
        f"{results['results_resent_under_same_uids']}",
        f"jobs: {results['job_states']}  outbox: {results['outbox_states']}",
        f"node starts: {summary['node_starts']}  still busy at end: {summary['still_busy_at_end']}"
        f"  seconds: {summary['seconds']}  passed: {summary['passed']}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, run, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=24, help="kill points (one series each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=128, help="image size of the series")
    parser.add_argument("--slices", type=int, default=16, help="instances per series")
    parser.add_argument("--stable-age", type=float, default=10.0, help="node's stable_age_s")
    parser.add_argument("--work", type=Path, help="work folder (default: a new temporary one)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    settings = Settings(
        kills=args.kills, seed=args.seed, rows=args.rows, slices=args.slices,
        stable_age_s=args.stable_age, work=args.work, results_dir=args.results_dir,
    )  # fmt: skip
    summary = run(settings)
    path = write_results(summary, settings.results_dir, "kill9")
    sys.stdout.write(table(summary) + f"\nwrote {path}\n")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
