"""End-to-end result latency per pipeline, with and without completeness by content.

For each pipeline (``--pipelines``, default: every one) and each completeness mode the
node is started as a process (``python -m dicomnode.cli serve``) in front of a timing PACS
(a pynetdicom SCP that time-stamps every instance it acknowledges). The pipeline's demo
case (``dicomnode.demo.prepare_case``: its own generated case where it has one, e.g. the
MRI study of ``ais_prognosis_mri``, routed by a study-level rule; else the real GE head CT
from ``../shared`` with an inserted lesion, or a synthetic head CT) is sent by DCMTK
storescu with fresh UIDs for every run, and the time from the last instance acknowledged
to the last result acknowledged by the PACS is split, from the node's state, into:

- ``completeness_s``: last instance recorded -> (last) series judged complete;
- ``queue_s``: job queued -> job started by a worker;
- ``load_s``, ``segmentation_s``, ``features_s``, ``model_s``, ``writers_s``, ``other_s``:
  the job's stage split as the node recorded it (table ``job_stages``, from
  ``pipelines.stages``; ``other``: pipeline time that no stage of the pipeline claims);
- ``pipeline_s``: job started -> job finished (the stages above and the job's own work);
- ``sending_s``: job finished -> last result acknowledged by the PACS.

Modes (``--modes``):

- ``timer``: ``[completeness] trust = []``: the stable age only (``--stable-age``, 30 s
  as in the example config);
- ``images_in_acquisition``: the case is made one acquisition that declares its
  ImagesInAcquisition (as a helical scan's does; the GE case is step-and-shoot, with an
  AcquisitionNumber per rotation, and declares nothing), default trust;
- ``association_release``: the case says nothing; the sender's release completes the
  series (``release_needs_contiguous_positions = false``: the GE case's spacing is
  uneven, 4.0 / 1.08 / 7.0 mm, so contiguity would refuse it).

The first series after each start is a warm-up (lazy imports, model loading) and is
reported apart. The node process's peak resident memory (VmHWM) is reported per start.

``--follow-up`` gives the node a ``[case_store]`` and, for a pipeline whose model store
holds two versions or more, a shadow version beside the one in service (a copy of the
bundled store): the work a job's results no longer wait for. The next series is sent
once the previous one's follow-up has ended (no ``follow-up.json`` left in the results
folders), so each series starts on an idle node. ``--before DIR`` runs every cell also
with another checkout's node (e.g. main from ``git archive``), right after this tree's,
for a before/after ratio from one run.

Run from the repository root: ``python -m bench.latency`` (needs dcmtk). The summary is
printed as a table and written to ``bench/results/latency-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event

from bench.peers import (
    JOB_TERMINAL,
    NODE_AE,
    OUTBOX_TERMINAL,
    SENDER_AE,
    STORESCU,
    NodeProcess,
    free_port,
    missing_tools,
    peak_rss_mb,
    progress,
    state_rows,
    store_files,
    write_results,
)
from dicomnode.demo import demo_module, prepare_case, shared_dir
from model_store.lifecycle import set_shadow
from model_store.registry import STORE_ROOT, list_versions, select_version
from pipelines.settings import PipelinesSettings, StoredModelSettings
from pipelines.stages import SCALE_OUT_STAGES
from pipelines.stages import STAGES as ALL_JOB_STAGES

REPO = Path(__file__).resolve().parents[1]
PACS_AE = "BENCHPACS"
MODES = ("timer", "images_in_acquisition", "association_release")
MODE_SETTINGS = {
    "timer": ["trust = []"],
    "images_in_acquisition": ['trust = ["enhanced_frames", "images_in_acquisition"]'],
    "association_release": [
        'trust = ["association_release"]',
        "release_needs_contiguous_positions = false",
    ],
}
RESULT_TIMEOUT_S = 900.0
JOB_STAGES = tuple(name for name in ALL_JOB_STAGES if name not in SCALE_OUT_STAGES)  # in-process
STAGES = (
    "completeness_s",
    "queue_s",
    *(f"{name}_s" for name in JOB_STAGES),
    "pipeline_s",
    "sending_s",
    "total_s",
)
PIPELINES = (
    "hyperdense_regions",
    "hyperdense_unet",
    "ht_after_mt",
    "iph_vs_contrast",
    "ich_expansion",
    "ich_expansion_hybrid",
    "ais_prognosis_mri",
    "blast_ct",
)


class TimingPacs:
    """A storage SCP that time-stamps (``time.time()``) each instance it acknowledges,
    per study."""

    def __init__(self, port: int) -> None:
        """Prepare a destination on loopback ``port``."""
        self.port = port
        self.arrivals: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        self.ae = AE(ae_title=PACS_AE)
        self.ae.supported_contexts = AllStoragePresentationContexts

    def on_store(self, event: Event) -> int:
        """Acknowledge and time-stamp."""
        study = str(event.dataset.StudyInstanceUID)
        with self.lock:
            self.arrivals.setdefault(study, []).append(time.time())
        return 0x0000

    def last(self, study: str) -> float | None:
        """When the last instance of ``study`` was acknowledged."""
        with self.lock:
            times = self.arrivals.get(study)
            return max(times) if times else None

    def start(self) -> None:
        """Listen in the background."""
        server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.on_store)]
        )
        if server is None:
            raise RuntimeError("the benchmark PACS did not start")
        self.server = server


def follow_up_settings(base: Path, pipeline: str) -> tuple[list[str], str | None]:
    """Config lines for a case store and, when ``pipeline``'s bundled model store holds two
    versions or more, a copy of that store with the latest other version in shadow; and
    that shadow version (None: no shadow)."""
    lines = ["[case_store]", 'folder = "cases"', 'salt = "latency-bench-salt-0123"', ""]
    own = getattr(PipelinesSettings(), pipeline, None)
    if not isinstance(own, StoredModelSettings) or len(list_versions(pipeline)) < 2:
        return lines, None
    store = base / "store"
    shutil.copytree(STORE_ROOT / pipeline, store / pipeline)
    service = select_version(pipeline, store)
    shadow = [v for v in list_versions(pipeline, store) if v != service][-1]
    set_shadow(pipeline, shadow, store, by="bench.latency")
    return [*lines, f"[pipelines.{pipeline}]", f'model_store_dir = "{store}"', ""], shadow


def config_toml(
    base: Path,
    port: int,
    pacs_port: int,
    pipeline: str,
    mode: str,
    stable_age_s: float,
    extra: list[str] | None = None,
) -> Path:
    """A node config routing every CT series to ``pipeline`` with ``mode``'s trust;
    ``extra``: more sections (before the route's)."""
    lines = [
        f"stable_age_s = {stable_age_s}",
        "poll_interval_s = 0.05",
        'spool_dir = "spool"',
        'state_dir = "state"',
        "",
        "[node]",
        f'ae_title = "{NODE_AE}"',
        'host = "127.0.0.1"',
        f"port = {port}",
        "",
        "[[allowed_callers]]",
        f'ae_title = "{SENDER_AE}"',
        "[[allowed_callers]]",
        'ae_title = "ECHOSCU"',
        "",
        "[completeness]",
        *MODE_SETTINGS[mode],
        "",
        *(extra or []),
        "[destinations.PACS]",
        f'ae_title = "{PACS_AE}"',
        'host = "127.0.0.1"',
        f"port = {pacs_port}",
        "",
        "[[routes]]",
        'name = "bench"',
        f'pipeline = "{pipeline}"',
        'destinations = ["PACS"]',
        *study_rule(pipeline),
    ]
    path = base / "node.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def study_rule(pipeline: str) -> list[str]:
    """The route's study-level settings for a pipeline whose demo case is a study."""
    roles = getattr(demo_module(pipeline), "STUDY_ROLES", None)
    if roles is None:
        return []
    lines = ['level = "study"', "study_stable_age_s = 5.0"]
    for name, role in roles.items():
        lines.append(f"[routes.roles.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in role.items()]
    return lines


def fresh_copy(
    datasets: list[Dataset], folder: Path, declare_count: bool
) -> tuple[str, list[Path]]:
    """Write the case (one series, or a study's series) with new study, series and
    instance UIDs (a re-sent identical instance is a no-op for the node);
    ``declare_count`` sets each series' ImagesInAcquisition. Returns the study UID."""
    study = generate_uid()
    old_series = [str(ds.SeriesInstanceUID) for ds in datasets]
    new_series = {uid: generate_uid() for uid in old_series}
    folder.mkdir(parents=True)
    paths = []
    for index, source in enumerate(datasets):
        ds = copy.deepcopy(source)  # Dataset.copy() shares its elements with the source
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = new_series[old_series[index]]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if declare_count:  # one acquisition that declares its size, as a helical scan's
            ds.AcquisitionNumber = 1
            ds.ImagesInAcquisition = old_series.count(old_series[index])
        elif "ImagesInAcquisition" in ds:
            del ds.ImagesInAcquisition
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study, paths


def job_done(state: Path, study: str) -> bool:
    """Whether the study's job finished and all its results left the outbox."""
    jobs = state_rows(state, "SELECT id, state FROM jobs WHERE study_instance_uid = ?", [study])
    if not jobs or any(row["state"] not in JOB_TERMINAL for row in jobs):
        return False
    outbox = state_rows(
        state,
        "SELECT o.state FROM outbox o JOIN jobs j ON j.id = o.job_id "
        "WHERE j.study_instance_uid = ?",
        [study],
    )
    return all(row["state"] in OUTBOX_TERMINAL for row in outbox)


@dataclass(frozen=True)
class Timing:
    """One series' (or study's) latency split."""

    evidence: str
    stages: dict[str, float]
    job_state: str


def split(state: Path, study: str, acknowledged: float, last_result: float) -> Timing:
    """The stages of one study's job from the node's state and the PACS' time-stamps."""
    (row,) = state_rows(
        state,
        "SELECT max(s.last_arrival) AS last_arrival, max(c.decided_at) AS decided_at, "
        "group_concat(DISTINCT c.evidence) AS evidence FROM series s "
        "LEFT JOIN series_completions c USING (series_instance_uid) "
        "WHERE s.study_instance_uid = ?",
        [study],
    )
    (job,) = state_rows(
        state,
        "SELECT id, created_at, started_at, finished_at, state FROM jobs "
        "WHERE study_instance_uid = ? ORDER BY id LIMIT 1",
        [study],
    )
    recorded = {
        r["stage"]: r["seconds"]
        for r in state_rows(
            state, "SELECT stage, seconds FROM job_stages WHERE job_id = ?", [job["id"]]
        )
    }
    decided = row["decided_at"] or job["created_at"]  # a study job: queued when complete
    stages = {
        "completeness_s": decided - row["last_arrival"],
        "queue_s": job["started_at"] - job["created_at"],
        **{f"{name}_s": recorded.get(name, float("nan")) for name in JOB_STAGES},
        "pipeline_s": job["finished_at"] - job["started_at"],
        "sending_s": last_result - job["finished_at"],
        "total_s": last_result - acknowledged,
    }
    evidence = row["evidence"] or "study"
    return Timing(evidence, {k: round(v, 3) for k, v in stages.items()}, job["state"])


def one_series(
    node: NodeProcess, pacs: TimingPacs, state: Path, case: list[Dataset], folder: Path, mode: str
) -> Timing:
    """Send one fresh copy of the case and time it to its last result."""
    study, paths = fresh_copy(case, folder, declare_count=mode == "images_in_acquisition")
    sent = store_files(node.port, paths)
    if sent.returncode != 0:
        raise RuntimeError(f"storescu failed ({sent.returncode})")
    acknowledged = time.time()
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while not job_done(state, study):
        if time.monotonic() > deadline or not node.alive():
            raise TimeoutError(f"no result for a series within {RESULT_TIMEOUT_S} s")
        time.sleep(0.02)
    last = pacs.last(study)
    if last is None:
        raise RuntimeError("the job finished but the PACS received nothing")
    while any((state.parent / "results").glob("*/follow-up.json")):  # case store, shadow
        if time.monotonic() > deadline or not node.alive():
            raise TimeoutError(f"a follow-up did not end within {RESULT_TIMEOUT_S} s")
        time.sleep(0.02)
    return split(state, study, acknowledged, last)


def run_cell(
    work: Path,
    pacs: TimingPacs,
    case: list[Dataset],
    pipeline: str,
    mode: str,
    args: argparse.Namespace,
    tree: Path = REPO,
) -> dict[str, Any]:
    """One pipeline in one mode: a start of ``tree``'s node, a warm-up series, ``--runs``
    timed ones."""
    base = work / f"{pipeline}-{mode}-{'this' if tree == REPO else 'before'}"
    base.mkdir(parents=True)
    port = free_port()
    extra, shadow = follow_up_settings(base, pipeline) if args.follow_up else ([], None)
    config = config_toml(base, port, pacs.port, pipeline, mode, args.stable_age, extra)
    node = NodeProcess(config, port, base / "node.log", repo=tree)
    node.start()
    state = base / "state" / "dicomnode.sqlite3"
    try:
        warm = one_series(node, pacs, state, case, base / "warm-up", mode)
        progress(f"{pipeline} {mode}: warm-up {warm.stages} ({warm.evidence})")
        runs = [] if args.runs else [warm]  # --runs 0: the first series is the figure
        for index in range(args.runs):
            timing = one_series(node, pacs, state, case, base / f"run-{index}", mode)
            progress(f"{pipeline} {mode}: run {index} {timing.stages}")
            runs.append(timing)
        peak = peak_rss_mb(node.pid)
    finally:
        node.stop()
    return {
        "pipeline": pipeline,
        "mode": mode,
        "tree": "this" if tree == REPO else str(tree),
        "case_store": bool(args.follow_up),
        "shadow": shadow,
        "evidence": sorted({t.evidence for t in runs}),
        "job_states": sorted({t.job_state for t in runs}),
        "median": {s: round(statistics.median(t.stages[s] for t in runs), 3) for s in STAGES},
        "runs": [t.stages for t in runs],
        "first_series_after_start": warm.stages,
        "node_peak_rss_mb": None if peak is None else round(peak, 1),
    }


def table(cells: list[dict[str, Any]]) -> str:
    """A markdown table of the medians."""
    names = [s.removesuffix("_s") for s in STAGES]
    head = (
        "| pipeline | mode | tree | evidence | "
        + " | ".join(names)
        + " | first after start | peak MiB |"
    )
    lines = [head, "|" + "---|" * (len(STAGES) + 6)]
    for cell in cells:
        if "error" in cell:
            lines.append(
                f"| {cell['pipeline']} | {cell['mode']} | {cell['tree']} "
                f"| failed: {cell['error']} |"
            )
            continue
        medians = " | ".join(f"{cell['median'][s]:.2f}" for s in STAGES)
        lines.append(
            f"| {cell['pipeline']} | {cell['mode']} | {cell['tree']} "
            f"| {','.join(cell['evidence'])} | {medians} "
            f"| {cell['first_series_after_start']['total_s']:.2f} | {cell['node_peak_rss_mb']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every pipeline in every mode; print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--runs", type=int, default=3, help="timed series after the warm-up (0: the warm-up's)"
    )
    parser.add_argument("--stable-age", type=float, default=30.0)
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--follow-up", action="store_true",
        help="a case store and, where the model store has two versions, a shadow model",
    )  # fmt: skip
    parser.add_argument(
        "--before", type=Path,
        help="another checkout (e.g. main, from git archive) whose node runs each cell too",
    )  # fmt: skip
    args = parser.parse_args(argv)
    missing = missing_tools([STORESCU])
    if missing:
        progress(f"missing tools: {', '.join(missing)} (apt-get install dcmtk)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="dicomnode-latency-"))
    pacs = TimingPacs(free_port())
    pacs.start()
    cells, cases = [], {}
    try:
        for pipeline in args.pipelines.split(","):
            prepared = prepare_case(work / "case" / pipeline, shared_dir(), pipeline)
            cases[pipeline] = prepared.description
            case: list[Dataset] = [pydicom.dcmread(path) for path in prepared.files]
            for mode in args.modes.split(","):
                for tree in [REPO] if args.before is None else [REPO, args.before]:
                    try:
                        cells.append(run_cell(work, pacs, case, pipeline, mode, args, tree))
                    except (RuntimeError, TimeoutError) as exc:  # the others still run
                        progress(f"{pipeline} {mode} {tree}: {exc}")
                        cells.append({"pipeline": pipeline, "mode": mode, "tree": str(tree),
                                      "error": str(exc)})  # fmt: skip
    finally:
        pacs.server.shutdown()
    summary = {
        "cases": cases,
        "stable_age_s": args.stable_age,
        "follow_up": bool(args.follow_up),
        "before": None if args.before is None else str(args.before),
        "runs": args.runs,
        "cells": cells,
        "table": table(cells),
    }
    path = write_results(summary, args.results_dir, "latency")
    sys.stdout.write(table(cells) + f"\n\n{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
