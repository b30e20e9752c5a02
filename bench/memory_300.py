"""Peak resident memory per pipeline on a 300-slice head CT (budget: 3 GiB).

The case is a generated thin-slice head CT (``pipelines.synthetic``: 300 slices of
512 x 512 at 0.5 mm, 157 MB of pixel data) with an inserted haematoma, written once
(``--case-dir`` keeps it between runs). ``ais_prognosis_mri`` gets its own generated MRI
study (``pipelines.ais_prognosis_mri.demo``). Each pipeline runs in a fresh process (the
node's job path: ``dicomnode.processing.run_pipeline`` or the study job), which reports
its peak resident memory (VmHWM) after each step: interpreter and pipeline built,
series loaded, pipeline run and outputs written; and the job's stage split
(``pipelines.stages``). ``load`` is loading alone.

Run from the repository root: ``python -m bench.memory_300 [--pipelines a,b]``. The table
is printed and the summary written to ``bench/results/memory_300-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.peers import progress, write_results

REPO = Path(__file__).resolve().parents[1]
BUDGET_MIB = 3 * 1024
SLICES, ROWS, THICKNESS_MM = 300, 512, 0.5
PIPELINES = (
    "load",
    "hyperdense_regions",
    "hyperdense_unet",
    "ht_after_mt",
    "iph_vs_contrast",
    "ich_expansion",
    "ich_expansion_hybrid",
    "ais_prognosis_mri",
    "blast_ct",
)
CHILD_TIMEOUT_S = 1800.0


def vm_hwm_mib() -> float:
    """This process's peak resident memory (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def write_case(folder: Path) -> list[Path]:
    """The 300-slice head CT with a haematoma, written once into ``folder``."""
    done = folder / "complete"
    if done.exists():
        return sorted(folder.glob("*.dcm"))
    from pipelines.lesions import insert_lesion
    from pipelines.synthetic import synthetic_head_ct, write_series

    folder.mkdir(parents=True, exist_ok=True)
    datasets = synthetic_head_ct(
        seed=3, n_slices=SLICES, slice_thickness_mm=THICKNESS_MM, rows=ROWS
    )
    insert_lesion(datasets, center_mm=None, radius_mm=12.0, hu=70.0, seed=7)
    files = write_series(datasets, folder)
    done.write_text("")
    return files


def child(pipeline: str, case: Path, out: Path) -> dict[str, Any]:
    """Run ``pipeline`` on the case in this process and report its memory and stages."""
    from pipelines.stages import StageTimer, recording, stage

    marks: dict[str, float] = {}
    timer = StageTimer()
    started = time.perf_counter()
    if pipeline == "load":
        from pipelines.volume import load_series

        marks["built"] = vm_hwm_mib()
        with recording(timer), stage("load"):
            series = load_series(sorted(case.glob("*.dcm")))
        marks["loaded"] = vm_hwm_mib()
        detail = f"frames {series.frame_hu.shape}, grid {series.volume.hu.shape}"
    elif pipeline == "ais_prognosis_mri":
        detail = run_study(case, out, marks, timer)
    else:
        from dicomnode.processing import run_pipeline
        from pipelines.base import PipelineUnavailable
        from pipelines.registry import pipeline_factory
        from pipelines.settings import BlastCtSettings, PipelinesSettings

        # BLAST-CT with one member (the CPU default runs two, one after the other)
        build = pipeline_factory(PipelinesSettings(blast_ct=BlastCtSettings(members=(1,))))
        try:
            build(pipeline).check()  # imports and model loading
        except PipelineUnavailable as exc:  # e.g. no BLAST-CT weights here
            return {"pipeline": pipeline, "skipped": str(exc)}
        marks["built"] = vm_hwm_mib()
        with recording(timer):
            written = run_pipeline(
                sorted(case.glob("*.dcm")), pipeline, out, fallback=None, pipelines=build
            )
        detail = f"{len(written)} outputs" + (", member 1" if pipeline == "blast_ct" else "")
    marks["done"] = vm_hwm_mib()
    return {
        "pipeline": pipeline,
        "peak_mib": marks,
        "stages_s": {k: round(v, 3) for k, v in timer.seconds().items()},
        "wall_s": round(time.perf_counter() - started, 2),
        "detail": detail,
    }


def run_study(case: Path, out: Path, marks: dict[str, float], timer: Any) -> str:
    """The MRI study job of ``ais_prognosis_mri`` on its own generated study."""
    from dicomnode.config import RouteMatch, RouteRule
    from dicomnode.studies import run_study_job
    from pipelines.ais_prognosis_mri.demo import STUDY_ROLES, demo_case
    from pipelines.registry import get_pipeline
    from pipelines.stages import recording

    files = demo_case(case, seed=1)
    rule = RouteRule.model_validate(
        {
            **RouteRule(name="mri", match=RouteMatch(), pipeline="ais_prognosis_mri").model_dump(),
            "level": "study",
            "roles": STUDY_ROLES,
        }
    )
    get_pipeline("ais_prognosis_mri").check()
    marks["built"] = vm_hwm_mib()
    with recording(timer):
        written = run_study_job(files, rule, "ais_prognosis_mri", out, get_pipeline)
    return f"{len(files)} MRI instances, {len(written)} outputs"


def measure(pipeline: str, case: Path, work: Path) -> dict[str, Any]:
    """Run one pipeline in a fresh process; its report, or why it failed."""
    target = work / "mri" if pipeline == "ais_prognosis_mri" else case
    command = [sys.executable, "-m", "bench.memory_300", "--child", pipeline, "--case-dir"]
    command += [str(target), "--out", str(work / pipeline)]
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        return {"pipeline": pipeline, "error": done.stderr.strip().splitlines()[-1:]}
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: peak after each step, the budget ratio, the stage split."""
    lines = [
        "| pipeline | built MiB | peak MiB | peak / 3 GiB | stages s (load/seg/feat/model/"
        "writers/other) | wall s | detail |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row or "skipped" in row:
            why = f"failed: {row['error']}" if "error" in row else f"skipped: {row['skipped']}"
            lines.append(f"| {row['pipeline']} | - | - | - | - | - | {why} |")
            continue
        marks, stages = row["peak_mib"], row["stages_s"]
        split = " / ".join(f"{v:.2f}" for v in stages.values())
        lines.append(
            f"| {row['pipeline']} | {marks['built']:.0f} | {marks['done']:.0f} | "
            f"{marks['done'] / BUDGET_MIB:.2f} | {split} | {row['wall_s']:.1f} | {row['detail']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure every pipeline, or run one as the child process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--case-dir", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if args.child is not None:
        report = child(args.child, args.case_dir, args.out)
        sys.stdout.write(json.dumps(report) + "\n")
        return 0
    work = Path(tempfile.mkdtemp(prefix="dicomnode-memory-"))
    case = args.case_dir or work / "ct300"
    files = write_case(case)
    progress(f"case: {len(files)} slices in {case}")
    rows = []
    for pipeline in args.pipelines.split(","):
        row = measure(pipeline, case, work)
        progress(json.dumps(row))
        rows.append(row)
    text = table(rows)
    summary = {
        "case": f"synthetic head CT, {SLICES} x {ROWS}^2 at {THICKNESS_MM} mm, haematoma",
        "budget_mib": BUDGET_MIB,
        "rows": rows,
        "table": text,
    }
    path = write_results(summary, args.results_dir, "memory_300")
    sys.stdout.write(text + f"\n\n{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
