"""Where the raw Grad-CAM of the risk pipelines lies: distance from each map's peak to
the lesion it explains, before any display clipping, on held-out generated cases.

Per pipeline (``--pipeline``), a cohort is generated with a seed its bundled model was
not trained on and each case's lesion is found as the pipeline finds it:

- ``ht_after_mt`` (``pipelines.cohort``, trained on seed 2025): ``HtAfterMtPipeline``
  with the promoted model and the default segmenter; the scored lesion, for the class
  the risk leans to;
- ``ich_expansion`` (``pipelines.ich_expansion.cohort``, trained on seed 2024): the
  haematoma on the frames the model scores (``scored_frame_mask``), evidence for
  expansion;
- ``ais_prognosis_mri`` (``pipelines.ais_prognosis_mri.cohort``, trained on seed 2026):
  the infarct ROI of the prepared study, evidence for a poor outcome.

The raw maps of ``pipelines.cnn.lesion_grad_cams`` (one per heat-map frame) are measured
side by side in the same run for each method of ``METHODS``: plain Grad-CAM at the
network's last stage (what the pipeline drew before) and Grad-CAM relative to no lesion
at one or more stages. Per map: distance (mm) from the peak to the lesion on that frame
(0 inside), whether the peak lies inside, within 5 mm, and the share of the map's heat
within 5 mm of the lesion; the key frame (the lesion's largest cross-section) is also
reported alone. For ``ht_after_mt`` the CNN's own held-out AUC (its head, mean over a
case's samples, DeLong 95% CI) on the same cases is reported beside.

Run: ``OMP_NUM_THREADS=1 python -m bench.gradcam_placement [--pipeline ht_after_mt]
[--cases 40] [--seed 9200]``; results in ``gradcam_placement_results[_<pipeline>].*``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from pipelines.ais_prognosis_mri.cohort import draw_cohort
from pipelines.ais_prognosis_mri.features import CNN_INPUT as MRI_INPUT
from pipelines.ais_prognosis_mri.imaging import ROLE_ADC, ROLE_DWI, prepare_study
from pipelines.ais_prognosis_mri.model import MriModel
from pipelines.ais_prognosis_mri.synthetic_mri import series_datasets
from pipelines.base import PipelineError
from pipelines.cnn import (
    NEGATIVE,
    POSITIVE,
    CnnClassifier,
    InputConfig,
    largest_frame,
    lesion_grad_cams,
    peak_distance_mm,
    predict_proba,
    prepare_case,
    restrict_to_region,
)
from pipelines.cnn.inputs import frame_pixel_spacing
from pipelines.cohort import generate_cohort
from pipelines.evaluation import auc_ci_delong
from pipelines.ht_after_mt import HtAfterMtPipeline
from pipelines.hyperdense import HYPERDENSE_SEGMENT, HyperdenseThresholdPipeline
from pipelines.ich_expansion.cohort import generate_expansion_cohort
from pipelines.ich_expansion.features import CNN_INPUT as ICH_INPUT
from pipelines.ich_expansion.features import find_haematoma, scored_frame_mask
from pipelines.ich_expansion.model import ExpansionModel
from pipelines.slice_classifier.classifier import load_slice_classifier
from pipelines.volume import load_datasets, load_series

NEAR_MM = 5.0
METHODS: dict[str, dict[str, tuple[str | None, bool]]] = {
    "ht_after_mt": {
        "plain@_blocks.4": ("features._blocks.4", False),
        "relative@_blocks.2": ("features._blocks.2", True),
    },
    "ich_expansion": {
        "plain@head_act": (None, False),
        "relative@_blocks.2": ("features._blocks.2", True),
        "relative@_blocks.4": ("features._blocks.4", True),
    },
    "ais_prognosis_mri": {
        "plain@layer4": (None, False),
        "relative@layer1": ("features.layer1", True),
        "relative@layer2": ("features.layer2", True),
    },
}
"""Per pipeline, method -> (Grad-CAM layer, None: the network's last stage; relative)."""
ROWS = {"ht_after_mt": 128, "ich_expansion": 96, "ais_prognosis_mri": 64}
"""Image size of each pipeline's training cohort."""
RESULTS = Path(__file__).with_name("gradcam_placement_results")


@dataclass(frozen=True)
class CamCase:
    """One held-out case as its pipeline's heat maps see it."""

    case_id: str
    model: CnnClassifier
    frame_hu: NDArray[np.floating]
    mask: NDArray[np.bool_]  # the lesion on the frames
    spacing: tuple[float, float]
    config: InputConfig
    class_index: int


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


def ht_cases(
    cases: int, seed: int, rows: int, work: Path, extra: dict[str, object]
) -> Iterator[CamCase]:
    """``ht_after_mt``: the scored lesion of each case; the CNN's own AUC into ``extra``."""
    cohort = generate_cohort(work, cases, seed, rows=rows)
    pipeline = HtAfterMtPipeline()
    model = pipeline.model
    with cohort.clinical_csv.open(encoding="utf-8", newline="") as f:
        labels = {row["case_id"]: int(row["label_ht"]) for row in csv.DictReader(f)}
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
        class_index = POSITIVE if result.risk.high_risk else NEGATIVE
        spacing = frame_pixel_spacing(series, largest_frame(mask))
        yield CamCase(
            case.case_id, model.cnn, series.frame_hu, mask, spacing, model.cnn_input, class_index
        )
        y.append(labels[case.case_id])
        samples = prepare_case(series, mask, model.cnn_input).samples
        own.append(float(predict_proba(model.cnn, samples).mean()))
    cnn = auc_ci_delong(np.asarray(y), np.asarray(own)) if len(set(y)) == 2 else None
    extra |= {
        "model_version": model.version,
        "segmenter": pipeline.segmenter.name,
        "cases_without_lesion": no_risk,
        "cnn_own_auc": (
            None if cnn is None else {"auc": cnn.auc, "low": cnn.low, "high": cnn.high, "n": len(y)}
        ),
        "positives": int(sum(y)),
    }


def ich_cases(
    cases: int, seed: int, rows: int, work: Path, extra: dict[str, object]
) -> Iterator[CamCase]:
    """``ich_expansion``: the haematoma on the frames the model scores."""
    cohort = generate_expansion_cohort(work, cases, seed, rows=rows)
    model = ExpansionModel.load()
    classifier = load_slice_classifier()
    segmenter = HyperdenseThresholdPipeline()
    missed: list[str] = []
    for case in cohort.cases:
        series = load_series(sorted(case.folder.glob("*.dcm")))
        try:
            haematoma = find_haematoma(series, segmenter, classifier, HYPERDENSE_SEGMENT)
        except PipelineError:
            missed.append(case.case_id)
            continue
        spacing = frame_pixel_spacing(series, haematoma.key_frame)
        mask = scored_frame_mask(haematoma)
        yield CamCase(
            case.case_id, model.network, series.frame_hu, mask, spacing, ICH_INPUT, POSITIVE
        )
    extra |= {
        "model_version": model.version,
        "segmenter": segmenter.name,
        "cases_without_lesion": missed,
    }


def mri_cases(
    cases: int, seed: int, rows: int, work: Path, extra: dict[str, object]
) -> Iterator[CamCase]:
    """``ais_prognosis_mri``: the infarct ROI of each prepared study (DWI and ADC)."""
    model = MriModel.load()
    missed: list[str] = []
    for case in draw_cohort(seed, cases, rows):
        series = {
            role: load_datasets(series_datasets(case.spec, role)) for role in (ROLE_DWI, ROLE_ADC)
        }
        study = prepare_study(series)
        if study.count == 0:
            missed.append(case.case_id)
            continue
        spacing = (study.spacing[1], study.spacing[2])
        yield CamCase(
            case.case_id, model.cnn, study.zscored[ROLE_DWI], study.roi, spacing, MRI_INPUT,
            POSITIVE,
        )  # fmt: skip
    extra |= {"model_version": model.version, "cases_without_lesion": missed}


CASES = {"ht_after_mt": ht_cases, "ich_expansion": ich_cases, "ais_prognosis_mri": mri_cases}


def measure(
    pipeline: str, cases: int, seed: int, rows: int, work: Path
) -> tuple[list[MapPlacement], dict[str, object]]:
    """Generate the cohort, find each case's lesion, measure every raw map."""
    extra: dict[str, object] = {"pipeline": pipeline, "cases": cases, "seed": seed, "rows": rows}
    placements: list[MapPlacement] = []
    for case in CASES[pipeline](cases, seed, rows, work, extra):
        key = largest_frame(case.mask)
        for method, (layer, relative) in METHODS[pipeline].items():
            for cam in lesion_grad_cams(
                case.model, case.frame_hu, case.mask, case.spacing, case.config,
                case.class_index, layer=layer, relative=relative,
            ):  # fmt: skip
                frame = cam.frame_index
                heat, region = cam.heat_frame, case.mask[frame]
                empty = not heat.any()
                placements.append(
                    MapPlacement(
                        method, case.case_id, frame - key,
                        float("inf") if empty else peak_distance_mm(heat, region, case.spacing),
                        0.0 if empty
                        else restrict_to_region(heat, region, case.spacing, NEAR_MM).share,
                    )
                )  # fmt: skip
    return placements, extra


def summarise(pipeline: str, placements: Sequence[MapPlacement]) -> list[Summary]:
    """Per method: all maps, and key-frame maps only."""
    out = []
    for method in METHODS[pipeline]:
        for maps in ("all", "key frame"):
            rows = [
                p
                for p in placements
                if p.method == method and (maps == "all" or p.frame_offset == 0)
            ]
            peak = np.array([p.peak_mm for p in rows])
            finite = peak[np.isfinite(peak)]
            out.append(
                Summary(
                    method, maps, len(rows), int(np.isinf(peak).sum()), float(np.median(peak)),
                    float(finite.max()) if finite.size else math.inf,
                    float(np.mean(peak == 0.0)), float(np.mean(peak <= NEAR_MM)),
                    float(np.mean([p.near_share for p in rows])),
                )
            )  # fmt: skip
    return out


def table(summaries: Sequence[Summary], extra: dict[str, object]) -> str:
    """Markdown table of the summaries, the cases, and (``ht_after_mt``) the CNN's AUC."""
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
    missed = extra["cases_without_lesion"]
    assert isinstance(missed, list)
    lines += [
        "",
        f"{extra['pipeline']} model {extra['model_version']}, seed {extra['seed']}, "
        f"{extra['rows']} px, {extra['cases']} cases, without lesion: {len(missed)}.",
    ]
    if "cnn_own_auc" in extra:
        auc = extra["cnn_own_auc"]
        own = (
            f"{auc['auc']:.3f} ({auc['low']:.3f}-{auc['high']:.3f})"
            if isinstance(auc, dict)
            else "not defined (one class only)"
        )
        scored = int(str(extra["cases"])) - len(missed)
        lines.append(
            f"CNN's own AUC on these cases ({scored} with a risk, {extra['positives']} "
            f"positive): {own}; segmenter {extra['segmenter']}."
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: measure, print the table, write the results (.md and .json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", choices=sorted(METHODS), default="ht_after_mt")
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--seed", type=int, default=9200)
    parser.add_argument("--rows", type=int, help="image size (default: the training cohort's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="results stem (default: beside this file)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = args.rows or ROWS[args.pipeline]
    suffix = "" if args.pipeline == "ht_after_mt" else f"_{args.pipeline}"
    out = args.out or RESULTS.with_name(RESULTS.name + suffix)
    with tempfile.TemporaryDirectory(prefix="gradcam-placement-") as tmp:
        placements, extra = measure(args.pipeline, args.cases, args.seed, rows, Path(tmp))
    summaries = summarise(args.pipeline, placements)
    text = table(summaries, extra)
    sys.stdout.write(text + "\n")
    out.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    payload = {
        **extra,
        "summaries": [asdict(s) for s in summaries],
        "maps": [  # a map without heat has no peak: null
            {**asdict(p), "peak_mm": p.peak_mm if math.isfinite(p.peak_mm) else None}
            for p in placements
        ],
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
