"""Held-out evaluation of the threshold baseline's segmentation, before and after issue 8.

Lesions of 45-95 HU and 0.3-80 mL are painted into the real GE head CT (when ../shared is
present) and into generated heads of 5 mm and 1 mm slices, at random brain sites and at
the skull base (touching bone); calcifications at their typical sites go into generated
heads. Each case is segmented by both methods in one run:

- before: the skull rule as it was (every voxel of at least 80 HU connected to bone is
  skull, on the tilt-resampled grid), the 3 mm erosion, 55-300 HU, no calcification class;
- after: ``HyperdenseThresholdPipeline.segment_classes`` (bounded skull rim, brain core
  regrown to the bone, calcification apart).

Per lesion: Dice of the haemorrhage-class regions that overlap it (lesion-wise Dice) and
whether it was missed; per normal head: haemorrhage-class false-positive volume; per
calcification: the fraction labelled calcification and whether any of it was called
haemorrhage. Seeds 900 and up were never used while the method was written.

    python -m bench.threshold_eval [--out FILE.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from scipy import ndimage

from pipelines.brain import brain_mask
from pipelines.geometry import grid_to_frames, represented_thickness
from pipelines.hyperdense import HyperdenseParameters, HyperdenseThresholdPipeline
from pipelines.lesions import insert_lesion, radius_for_volume, skull_base_centre
from pipelines.measure import connected_regions
from pipelines.series import LoadedSeries
from pipelines.synthetic import CALCIFICATION_SITES_MM, site_mm, synthetic_head_ct
from pipelines.volume import load_datasets

GE_HEADCT = Path(__file__).resolve().parents[2] / "shared" / "data" / "headct_ge_tilt"
HU_LEVELS = (45.0, 55.0, 65.0, 75.0, 85.0, 95.0)
VOLUMES_ML = (0.3, 1.0, 5.0, 20.0, 80.0)
SEED_BASE = 900
ROWS = 192
MISSED_FROM_ML = 1.0

Segmenter = Callable[[LoadedSeries], tuple[NDArray[np.bool_], NDArray[np.bool_]]]


@dataclass(frozen=True)
class LesionCase:
    """One painted lesion and how each method did."""

    head: str
    site: str
    hu: float
    volume_ml: float
    dice_before: float
    dice_after: float
    seconds_before: float
    seconds_after: float


def emit(line: object) -> None:
    """Write one line of progress or result to stdout at once."""
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def before(series: LoadedSeries) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """The method as it was at 578c167: haemorrhage-class frame mask, no calcification."""
    p = HyperdenseParameters()
    volume = series.volume
    brain = brain_mask(volume.hu, volume.spacing)
    box = ndimage.find_objects(brain.astype(np.uint8))[0]
    denoised = ndimage.median_filter(volume.hu[box], size=(1, p.median_size_px, p.median_size_px))
    hyperdense = np.zeros(brain.shape, dtype=bool)
    hyperdense[box] = brain[box] & (denoised >= p.low_hu) & (denoised <= p.high_hu)
    labels, _ = connected_regions(hyperdense, volume.voxel_volume_ml, p.min_volume_ml, 26)
    frames = grid_to_frames(series, labels > 0)
    return frames, np.zeros(frames.shape, dtype=bool)


def after(series: LoadedSeries) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """This branch: haemorrhage-class and calcification frame masks."""
    classes = HyperdenseThresholdPipeline(HyperdenseParameters()).segment_classes(series)
    return (
        grid_to_frames(series, classes.hyperdense > 0),
        grid_to_frames(series, classes.calcification > 0),
    )


def lesion_dice(found: NDArray[np.bool_], truth: NDArray[np.bool_]) -> float:
    """Dice of the found 3-D regions (on the frame stack) that overlap ``truth``."""
    labels, _ = ndimage.label(found, structure=np.ones((3, 3, 3), dtype=bool))
    hit = np.unique(labels[truth & (labels > 0)])
    mine = np.isin(labels, hit[hit > 0])
    total = mine.sum() + truth.sum()
    return float(2.0 * np.count_nonzero(mine & truth) / total) if total else 1.0


def frame_truth(
    series: LoadedSeries, datasets: Sequence[Dataset], masks: NDArray[np.bool_]
) -> NDArray[np.bool_]:
    """Painter masks (dataset order) in the series' frame order."""
    index = {str(ds.SOPInstanceUID): i for i, ds in enumerate(datasets)}
    return np.asarray(masks[[index[f.sop_instance_uid] for f in series.frames]])


def timed(
    segmenter: Segmenter, series: LoadedSeries
) -> tuple[NDArray[np.bool_], NDArray[np.bool_], float]:
    """Run a segmenter and time it."""
    start = time.perf_counter()
    hyper, calc = segmenter(series)
    return hyper, calc, time.perf_counter() - start


def heads(quick: bool) -> list[tuple[str, Callable[[], list[Dataset]]]]:
    """The heads to paint into: GE (when present), generated 5 mm and 1 mm."""
    out: list[tuple[str, Callable[[], list[Dataset]]]] = []
    if GE_HEADCT.is_dir():
        files = sorted(GE_HEADCT.glob("*.dcm"))
        out.append(("GE real, tilt 18.5", lambda: [pydicom.dcmread(p) for p in files]))
    out.append(("generated 5 mm", lambda: synthetic_head_ct(SEED_BASE, rows=ROWS)))
    if not quick:
        out.append(
            (
                "generated 1 mm",
                lambda: synthetic_head_ct(
                    SEED_BASE + 1, rows=ROWS, n_slices=150, slice_thickness_mm=1.0
                ),
            )
        )
    return out


def lesion_plan(quick: bool) -> list[tuple[str, float, float]]:
    """(site, HU, volume) per lesion: every HU and volume, random and skull-base sites."""
    plan = []
    for i, hu in enumerate(HU_LEVELS):
        plan.append(("random", hu, VOLUMES_ML[i % len(VOLUMES_ML)]))
        plan.append(("skull base", hu, VOLUMES_ML[(i + 2) % len(VOLUMES_ML)]))
    return plan[::3] if quick else plan


def evaluate_lesions(quick: bool) -> list[LesionCase]:
    """Paint each planned lesion into each head and segment with both methods."""
    cases = []
    for h, (head, make) in enumerate(heads(quick)):
        for j, (site, hu, volume) in enumerate(lesion_plan(quick)):
            seed = SEED_BASE + 100 * h + j
            datasets = make()
            radius = radius_for_volume(volume)
            try:
                centre = (
                    skull_base_centre(datasets, radius, np.random.default_rng(seed))
                    if site == "skull base"
                    else None
                )
                lesion = insert_lesion(
                    datasets, center_mm=centre, radius_mm=radius, hu=hu, seed=seed
                )
            except ValueError as exc:
                emit(f"{head}: {site} {volume} mL skipped ({exc})")
                continue
            series = load_datasets(datasets)
            truth = frame_truth(series, datasets, lesion.masks)
            old, _, t_old = timed(before, series)
            new, _, t_new = timed(after, series)
            case = LesionCase(
                head, site, hu, round(lesion.volume_ml, 2),
                round(lesion_dice(old, truth), 3), round(lesion_dice(new, truth), 3),
                round(t_old, 1), round(t_new, 1),
            )  # fmt: skip
            emit(case)
            cases.append(case)
    return cases


def evaluate_normals(quick: bool) -> list[dict[str, object]]:
    """Haemorrhage-class false-positive volume on heads without a lesion."""
    rows = []
    for head, make in heads(quick):
        series = load_datasets(make())
        voxel = frame_voxel_volumes(series)
        result: dict[str, object] = {"head": head}
        for name, segmenter in (("before", before), ("after", after)):
            hyper, calc, seconds = timed(segmenter, series)
            result[f"fp_ml_{name}"] = round(float((hyper * voxel).sum()), 3)
            result[f"calcification_ml_{name}"] = round(float((calc * voxel).sum()), 3)
            result[f"seconds_{name}"] = round(seconds, 1)
        emit(result)
        rows.append(result)
    return rows


def frame_voxel_volumes(series: LoadedSeries) -> NDArray[np.float64]:
    """Planimetric volume (mL) of one pixel of each frame, broadcastable on frame masks."""
    thickness = represented_thickness(series.stack.offsets[:, 0])
    dy, dx = series.stack.pixel_spacing
    return np.asarray(thickness * dy * dx / 1000.0)[:, None, None]


def evaluate_calcifications() -> list[dict[str, object]]:
    """Calcifications (200-400 HU, 3-4.6 mm radius) at each typical site of a generated head."""
    rows = []
    for k, (site, where) in enumerate(sorted(CALCIFICATION_SITES_MM.items())):
        for thickness, n_slices in ((5.0, 32), (1.0, 150)):
            datasets = synthetic_head_ct(SEED_BASE + 50 + k, rows=ROWS, n_slices=n_slices,
                                         slice_thickness_mm=thickness)  # fmt: skip
            hu = 200.0 + 50.0 * k
            focus = insert_lesion(datasets, center_mm=site_mm(where), radius_mm=3.0 + 0.4 * k,
                                  hu=hu, seed=SEED_BASE + k, irregular=False)  # fmt: skip
            series = load_datasets(datasets)
            truth = frame_truth(series, datasets, focus.masks)
            old, _, _ = timed(before, series)
            hyper, calc, _ = timed(after, series)
            row = {
                "site": site, "slice_mm": thickness, "hu": hu,
                "labelled_calcification": round(float((calc & truth).sum() / truth.sum()), 3),
                "called_haemorrhage_after": bool((hyper & truth).any()),
                "called_haemorrhage_before": bool((old & truth).any()),
            }  # fmt: skip
            emit(row)
            rows.append(row)
    return rows


def evaluate_contrast() -> list[dict[str, object]]:
    """Contrast staining (130-160 HU, 0.7-3 mL) must stay hyperdense, not calcification."""
    rows = []
    for k, (hu, volume) in enumerate(((130.0, 0.7), (145.0, 1.5), (160.0, 3.0), (160.0, 0.7))):
        datasets = synthetic_head_ct(SEED_BASE + 70 + k, rows=ROWS)
        stain = insert_lesion(datasets, center_mm=None, radius_mm=radius_for_volume(volume),
                              hu=hu, seed=SEED_BASE + 70 + k)  # fmt: skip
        series = load_datasets(datasets)
        truth = frame_truth(series, datasets, stain.masks)
        hyper, calc, _ = timed(after, series)
        row: dict[str, object] = {
            "hu": hu, "volume_ml": round(stain.volume_ml, 2),
            "dice_hyperdense": round(lesion_dice(hyper, truth), 3),
            "labelled_calcification": round(float((calc & truth).sum() / truth.sum()), 3),
        }  # fmt: skip
        emit(row)
        rows.append(row)
    return rows


def summary(cases: Sequence[LesionCase]) -> dict[str, object]:
    """Pooled Dice and misses per method, overall and per head."""
    out: dict[str, object] = {}
    for head in [*sorted({c.head for c in cases}), "all"]:
        chosen = [c for c in cases if head in ("all", c.head)]
        out[head] = {
            name: {
                "mean_dice": round(float(np.mean([getattr(c, f"dice_{name}") for c in chosen])), 3),
                "missed_from_1ml": sum(
                    1 for c in chosen
                    if c.volume_ml >= MISSED_FROM_ML and getattr(c, f"dice_{name}") == 0.0
                ),
                "skull_base_mean_dice": round(float(np.mean(
                    [getattr(c, f"dice_{name}") for c in chosen if c.site == "skull base"] or [0]
                )), 3),
            }
            for name in ("before", "after")
        }  # fmt: skip
    return out


def main() -> None:
    """Run the evaluation and write its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("threshold_eval.json"))
    parser.add_argument("--quick", action="store_true", help="fewer lesions, no 1 mm head")
    args = parser.parse_args()
    normals = evaluate_normals(args.quick)
    calcifications = evaluate_calcifications()
    contrast = evaluate_contrast()
    cases = evaluate_lesions(args.quick)
    report = {
        "summary": summary(cases),
        "normals": normals,
        "calcifications": calcifications,
        "contrast": contrast,
        "lesions": [asdict(c) for c in cases],
    }
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    emit(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
