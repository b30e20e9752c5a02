"""Where the raw Grad-CAM of ``ht_after_mt`` lies: distance from each map's peak to the
scored lesion, before any display clipping, on held-out generated cases.

A cohort is generated (``pipelines.cohort``, a seed the bundled model was not trained
on: it was trained on seed 2025) and each case runs through ``HtAfterMtPipeline`` with
the promoted model and the default segmenter. For the scored lesion, the raw maps of
``lesion_grad_cams`` (one per heat-map frame, for the class the risk leans to) are
measured side by side for two methods in the same run:

- ``plain@_blocks.4``: plain Grad-CAM at Lite0's stride-16 stage, the method of the
  pipeline with model 1.1.0 before this bench;
- ``relative@_blocks.2``: Grad-CAM relative to the no-lesion input at the stride-8 stage,
  the pipeline's method now.

Per map: distance (mm) from the peak to the lesion on that frame (0 inside), whether
the peak lies inside, within 5 mm, and the share of the map's heat within 5 mm of the
lesion; the key frame (the lesion's largest cross-section) is also reported alone. The
CNN's own held-out AUC (its head, mean over a case's samples, DeLong 95% CI) on the
same cases is reported beside.

Run: ``OMP_NUM_THREADS=1 python -m bench.gradcam_placement [--cases 40] [--seed 9200]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.cnn import (
    NEGATIVE,
    POSITIVE,
    peak_distance_mm,
    predict_proba,
    prepare_case,
    restrict_to_region,
)
from pipelines.cnn.inputs import frame_pixel_spacing
from pipelines.cohort import generate_cohort
from pipelines.evaluation import auc_ci_delong
from pipelines.ht_after_mt import HtAfterMtPipeline
from pipelines.ht_after_mt.pipeline import lesion_grad_cams
from pipelines.volume import load_series

NEAR_MM = 5.0
METHODS = {
    "plain@_blocks.4": ("features._blocks.4", False),
    "relative@_blocks.2": ("features._blocks.2", True),
}
RESULTS = Path(__file__).with_name("gradcam_placement_results")


@dataclass(frozen=True)
class MapPlacement:
    """One raw map: its case, frame, and where its heat lies."""

    method: str
    case_id: str
    frame_offset: int  # from the key frame
    peak_mm: float
    near_share: float  # share of the map's heat within NEAR_MM of the lesion


@dataclass(frozen=True)
class Summary:
    """Placement figures of one method over maps (all, or key frames only)."""

    method: str
    maps: str  # "all" or "key frame"
    n: int
    empty: int  # maps with no heat at all (no peak: counted as off the lesion)
    median_peak_mm: float
    max_peak_mm: float
    inside: float
    within_5mm: float
    mean_near_share: float


def measure(
    cases: int, seed: int, rows: int, work: Path
) -> tuple[list[MapPlacement], dict[str, object]]:
    """Generate the cohort, run the pipeline on each case, measure every raw map."""
    cohort = generate_cohort(work, cases, seed, rows=rows)
    pipeline = HtAfterMtPipeline()
    model = pipeline.model
    with cohort.clinical_csv.open(encoding="utf-8", newline="") as f:
        labels = {row["case_id"]: int(row["label_ht"]) for row in csv.DictReader(f)}
    placements: list[MapPlacement] = []
    y: list[int] = []
    own: list[float] = []
    no_risk: list[str] = []
    for case in cohort.cases:
        series = load_series(sorted(case.folder.glob("*.dcm")))
        result = pipeline.run(series)
        if result.risk is None:
            no_risk.append(case.case_id)
            continue
        mask = result.segments[0].frame_mask
        key = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
        class_index = POSITIVE if result.risk.high_risk else NEGATIVE
        for method, (layer, relative) in METHODS.items():
            for cam in lesion_grad_cams(
                series, mask, model, class_index, layer=layer, relative=relative
            ):
                frame = cam.frame_index
                spacing = frame_pixel_spacing(series, frame)
                heat, region = cam.heat_frame, mask[frame]
                empty = not heat.any()
                placements.append(
                    MapPlacement(
                        method, case.case_id, frame - key,
                        float("inf") if empty else peak_distance_mm(heat, region, spacing),
                        0.0 if empty else restrict_to_region(heat, region, spacing, NEAR_MM).share,
                    )
                )  # fmt: skip
        y.append(labels[case.case_id])
        samples = prepare_case(series, mask, model.cnn_input).samples
        own.append(float(predict_proba(model.cnn, samples).mean()))
    cnn = auc_ci_delong(np.asarray(y), np.asarray(own)) if len(set(y)) == 2 else None
    extra: dict[str, object] = {
        "model_version": model.version,
        "segmenter": pipeline.segmenter.name,
        "cases": cases,
        "seed": seed,
        "rows": rows,
        "cases_without_risk": no_risk,
        "cnn_own_auc": (
            None if cnn is None else {"auc": cnn.auc, "low": cnn.low, "high": cnn.high, "n": len(y)}
        ),
        "positives": int(sum(y)),
    }
    return placements, extra


def summarise(placements: Sequence[MapPlacement]) -> list[Summary]:
    """Per method: all maps, and key-frame maps only."""
    out = []
    for method in METHODS:
        for maps in ("all", "key frame"):
            rows = [
                p
                for p in placements
                if p.method == method and (maps == "all" or p.frame_offset == 0)
            ]
            peak = np.array([p.peak_mm for p in rows])
            out.append(
                Summary(
                    method, maps, len(rows), int(np.isinf(peak).sum()), float(np.median(peak)),
                    float(peak[np.isfinite(peak)].max()),
                    float(np.mean(peak == 0.0)), float(np.mean(peak <= NEAR_MM)),
                    float(np.mean([p.near_share for p in rows])),
                )
            )  # fmt: skip
    return out


def table(summaries: Sequence[Summary], extra: dict[str, object]) -> str:
    """Markdown table of the summaries, and the CNN's own AUC."""
    lines = [
        "| method | maps | n | empty | median peak mm | max peak mm | peak inside "
        "| peak within 5 mm | heat within 5 mm |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.method} | {s.maps} | {s.n} | {s.empty} | {s.median_peak_mm:.1f} "
            f"| {s.max_peak_mm:.1f} "
            f"| {s.inside:.0%} | {s.within_5mm:.0%} | {s.mean_near_share:.0%} |"
        )
    auc, no_risk = extra["cnn_own_auc"], extra["cases_without_risk"]
    assert isinstance(no_risk, list)
    scored = int(str(extra["cases"])) - len(no_risk)
    own = (
        f"{auc['auc']:.3f} ({auc['low']:.3f}-{auc['high']:.3f})"
        if isinstance(auc, dict)
        else "not defined (one class only)"
    )
    lines += [
        "",
        f"CNN's own AUC on these cases ({scored} with a risk, {extra['positives']} positive): "
        f"{own}; model {extra['model_version']}, segmenter {extra['segmenter']}, "
        f"seed {extra['seed']}, {extra['rows']} px; cases without risk: {len(no_risk)}.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: measure, print the table, write ``gradcam_placement_results.*``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--seed", type=int, default=9200)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="gradcam-placement-") as tmp:
        placements, extra = measure(args.cases, args.seed, args.rows, Path(tmp))
    summaries = summarise(placements)
    text = table(summaries, extra)
    sys.stdout.write(text + "\n")
    args.out.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    payload = {
        **extra,
        "summaries": [asdict(s) for s in summaries],
        "maps": [  # a map without heat has no peak: null
            {**asdict(p), "peak_mm": p.peak_mm if math.isfinite(p.peak_mm) else None}
            for p in placements
        ],
    }
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
