"""Seconds to build each output object (SEG, SC, SR, saliency SCs) of one pipeline run.

The pipeline runs once on the case (the GE head CT of ``../shared/data/headct_ge_tilt``,
or any folder of one series given by ``--case-dir``, e.g. the 300-slice case that
``bench.memory_300`` writes); then each writer builds its object ``--repeats`` times
(after one warm-up) and the median seconds are reported with the SEG's frame and
segment counts and the process's peak resident memory. Run the same script from two
trees one after the other for a before/after ratio.

Run from the repository root:
``python -m bench.writers [--pipeline hyperdense_unet] [--case-dir DIR] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset

REPO = Path(__file__).resolve().parents[1]
GE_CASE = REPO.parent / "shared" / "data" / "headct_ge_tilt"
WHEN = datetime.datetime(2026, 1, 1, 12, 0, 0)


def vm_hwm_mib() -> float:
    """This process's peak resident memory (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def median_seconds(build: Callable[[], Dataset], repeats: int) -> tuple[float, Dataset]:
    """Median seconds of ``build()`` over ``repeats`` calls after a warm-up; its object."""
    built = build()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        built = build()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), built


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline once, time each writer, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="hyperdense_unet")
    parser.add_argument("--case-dir", type=Path, default=GE_CASE)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not args.case_dir.is_dir():
        sys.stdout.write(f"skipped: no case at {args.case_dir}\n")
        return 0
    from pipelines.outputs import build_saliency_sc, build_sc, build_seg, build_sr
    from pipelines.outputs.common import OutputIdentity, output_identity
    from pipelines.registry import get_pipeline
    from pipelines.volume import load_series

    series = load_series(sorted(args.case_dir.glob("*.dcm")))
    pipeline = get_pipeline(args.pipeline)
    result = pipeline.run(series)
    source = str(series.reference.SeriesInstanceUID)

    def identity(kind: str, offset: int) -> OutputIdentity:
        """The identity of one object of the run."""
        return output_identity(
            source, args.pipeline, result.algorithm, kind, 900 + offset, kind, WHEN, 1
        )

    seg_s, seg = median_seconds(lambda: build_seg(series, result, identity("seg", 1)), args.repeats)
    sc_s, _ = median_seconds(lambda: build_sc(series, result, identity("sc-1", 2)), args.repeats)
    sr_s, _ = median_seconds(lambda: build_sr(series, result, seg, identity("sr", 3)), args.repeats)
    saliency_s = 0.0
    for number, heatmap in enumerate(result.heatmaps, start=1):
        seconds, _ = median_seconds(
            lambda h=heatmap, n=number: build_saliency_sc(
                series, result, h, identity(f"gradcam-{n}", 4)
            ),
            args.repeats,
        )
        saliency_s += seconds
    report = {
        "pipeline": args.pipeline,
        "case": str(args.case_dir),
        "frames": len(series.frames),
        "segments": len(seg.SegmentSequence),
        "seg_frames": int(seg.NumberOfFrames),
        "seconds": {
            "seg": round(seg_s, 3),
            "sc": round(sc_s, 3),
            "sr": round(sr_s, 3),
            "saliency": round(saliency_s, 3),
        },
        "peak_mib": round(vm_hwm_mib()),
    }
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
