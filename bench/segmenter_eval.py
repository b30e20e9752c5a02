"""Held-out evaluation of the learned segmenter (U-Net 3.1.0, 3.0.0, 2.1.0 and 2.0.0) beside
the threshold baseline and the old U-Net (1.0.0), in one run.

Lesions of 45-95 HU and 0.3-80 mL are painted (``pipelines.lesions.insert_lesion``) into
the real GE head CT (when ../shared is present: evaluation only, never training) and into
generated heads of 5 mm and 1 mm slices, at random brain sites, at the skull base (touching
bone) and beside a lateral ventricle; calcifications at their typical sites go into
generated heads; contrast stains (130-160 HU) must stay haemorrhage-class. Seeds 900 and
up, and generated heads drawn with seeds the training never used (training templates use
seeds 0-299). Per lesion: lesion-wise Dice (the found regions that overlap it) and whether
it was missed; pooled Dice (voxels summed over lesions); per normal head: haemorrhage-class
false-positive volume; per calcification: the fraction labelled calcification and whether
any of it was called haemorrhage.

3.0.0 runs as bundled (no bone rule) and, to decide whether the rules still help, with the
calcification halo only (``unet_3_halo``) and with 2.1.0's whole bone rule
(``unet_3_bone``: rise flattened, ramps and halos dropped, as bundled since). 3.1.0
(``unet_3_1``) is 3.0.0's weights with two more region rules (partial-volumed
calcifications of thick frames apart, the threshold baseline's band test) and its
threshold chosen on a validation set with the rules on (``bench.segmenter_eval_threshold``).

    python -m bench.segmenter_eval [--out FILE.json] [--markdown FILE.md] [--quick]
        [--methods threshold,unet_3,...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from scipy import ndimage

from pipelines.hyperdense import CALCIFICATION_SEGMENT, HyperdenseParameters
from pipelines.hyperdense import HyperdenseThresholdPipeline as Threshold
from pipelines.lesions import insert_lesion, radius_for_volume, skull_base_centre
from pipelines.series import LoadedSeries
from pipelines.synthetic import CALCIFICATION_SITES_MM, site_mm, synthetic_head_ct
from pipelines.unet import UNetPipeline
from pipelines.unet.cases import ge_like_rise, render_rise
from pipelines.volume import load_datasets

GE_HEADCT = Path(__file__).resolve().parents[2] / "shared" / "data" / "headct_ge_tilt"
HU_LEVELS = (45.0, 55.0, 65.0, 75.0, 85.0, 95.0)
VOLUMES_ML = (0.3, 1.0, 5.0, 20.0, 80.0)
SITES = ("random", "skull base", "ventricle")
SEED_BASE = 900
ROWS = 192
MISSED_FROM_ML = 1.0
VENTRICLE_MM = (9.0, -2.0, 16.0)  # head-centred lateral ventricle of the generated head
METHODS = (
    "threshold",
    "unet_1",
    "unet_2",
    "unet_2_1",
    "unet_3",
    "unet_3_halo",
    "unet_3_bone",
    "unet_3_1",
)
TARGETS = {"pooled_dice": 0.85, "missed_from_1ml": 0, "normal_fp_ml": 0.1}

Masks = tuple[NDArray[np.bool_], NDArray[np.bool_]]  # haemorrhage class, calcification
Method = Callable[[LoadedSeries], Masks]


@dataclass
class LesionRow:
    """One painted lesion and how each method did."""

    head: str
    site: str
    hu: float
    volume_ml: float
    dice: dict[str, float] = field(default_factory=dict)
    overlap: dict[str, int] = field(default_factory=dict)  # |found & truth| voxels
    total: dict[str, int] = field(default_factory=dict)  # |found| + |truth| voxels
    seconds: dict[str, float] = field(default_factory=dict)


def emit(line: object) -> None:
    """Write one line of progress or result to stdout at once."""
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def _unet(version: str, *, bone: bool | None = None, halo: bool | None = None) -> UNetPipeline:
    """The bundled U-Net of ``version``, its ``bone`` and ``halo`` rules overridden where
    given (to measure what a rule adds to the same weights)."""
    pipeline = UNetPipeline(version, device="cpu")
    rules = pipeline.unet.inference
    rules = replace(
        rules,
        bone=rules.bone if bone is None else bone,
        halo=rules.halo if halo is None else halo,
    )
    pipeline.unet = replace(pipeline.unet, inference=rules)
    return pipeline


def methods(chosen: Sequence[str] = METHODS) -> dict[str, Method]:
    """The ``chosen`` segmenters, each returning frame masks (haemorrhage class,
    calcification)."""
    threshold = Threshold(HyperdenseParameters())

    def by_threshold(series: LoadedSeries) -> Masks:
        return _result_masks(threshold.run(series))

    def by_unet(make: Callable[[], UNetPipeline]) -> Method:
        pipeline = make()
        return lambda series: _result_masks(pipeline.run(series))

    builders: dict[str, Callable[[], Method]] = {
        "threshold": lambda: by_threshold,
        "unet_1": lambda: by_unet(lambda: _unet("1.0.0")),
        "unet_2": lambda: by_unet(lambda: _unet("2.0.0")),
        "unet_2_1": lambda: by_unet(lambda: _unet("2.1.0")),
        "unet_3": lambda: by_unet(lambda: _unet("3.0.0", bone=False, halo=False)),
        "unet_3_halo": lambda: by_unet(lambda: _unet("3.0.0", bone=False, halo=True)),
        "unet_3_bone": lambda: by_unet(lambda: _unet("3.0.0", bone=True, halo=True)),
        "unet_3_1": lambda: by_unet(lambda: _unet("3.1.0")),
    }
    unknown = sorted(set(chosen) - set(builders))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {sorted(builders)}")
    return {name: builders[name]() for name in chosen}


def _result_masks(result: object) -> Masks:
    """Haemorrhage-class and calcification frame masks of a ``PipelineResult``."""
    segments = result.segments  # type: ignore[attr-defined]
    hyper = segments[0].frame_mask
    calc = np.zeros(hyper.shape, dtype=bool)
    for segment in segments[1:]:
        if segment.segment == CALCIFICATION_SEGMENT:
            calc |= segment.frame_mask
    return np.asarray(hyper), calc


def overlapping(found: NDArray[np.bool_], truth: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """The 3-D regions of ``found`` (frame stack) that overlap ``truth``."""
    labels, _ = ndimage.label(found, structure=np.ones((3, 3, 3), dtype=bool))
    hit = np.unique(labels[truth & (labels > 0)])
    return np.asarray(np.isin(labels, hit[hit > 0]))


def frame_truth(
    series: LoadedSeries, datasets: Sequence[Dataset], masks: NDArray[np.bool_]
) -> NDArray[np.bool_]:
    """Painter masks (dataset order) in the series' frame order."""
    index = {str(ds.SOPInstanceUID): i for i, ds in enumerate(datasets)}
    return np.asarray(masks[[index[f.sop_instance_uid] for f in series.frames]])


def frame_voxel_ml(series: LoadedSeries) -> NDArray[np.float64]:
    """Planimetric volume (mL) of one pixel of each frame, broadcastable on frame masks."""
    from pipelines.geometry import represented_thickness

    thickness = represented_thickness(series.stack.offsets[:, 0])
    dy, dx = series.stack.pixel_spacing
    return np.asarray(thickness * dy * dx / 1000.0)[:, None, None]


def heads(quick: bool) -> list[tuple[str, Callable[[], list[Dataset]]]]:
    """The heads to paint into: GE (when present), generated 5 mm and 1 mm."""
    out: list[tuple[str, Callable[[], list[Dataset]]]] = []
    if GE_HEADCT.is_dir() and any(GE_HEADCT.glob("*.dcm")):
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
    """(site, HU, volume) per lesion: two sites per HU level, the sites and volumes in
    turn, so every HU, volume and site occurs."""
    plan = []
    for i, hu in enumerate(HU_LEVELS):
        for j in range(2):
            site = SITES[(i + j) % len(SITES)]
            plan.append((site, hu, VOLUMES_ML[(2 * i + 3 * j) % len(VOLUMES_ML)]))
    return plan[::4] if quick else plan


def _centre(
    site: str, datasets: list[Dataset], radius: float, seed: int, generated: bool
) -> tuple[float, float, float] | None:
    """The lesion centre of ``site`` (None: drawn inside the brain by the painter)."""
    if site == "skull base":
        return skull_base_centre(datasets, radius, np.random.default_rng(seed))
    if site == "ventricle" and generated:
        x, y, z = VENTRICLE_MM
        return site_mm((x + 4.0 + 0.7 * radius, y, z))
    return None


def evaluate_lesions(quick: bool, run: dict[str, Method]) -> list[LesionRow]:
    """Paint each planned lesion into each head and segment with every method."""
    rows = []
    for h, (head, make) in enumerate(heads(quick)):
        for j, (site, hu, volume) in enumerate(lesion_plan(quick)):
            seed = SEED_BASE + 100 * h + j
            datasets = make()
            radius = radius_for_volume(volume)
            generated = head.startswith("generated")
            # the real head has no ventricle atlas here: its "ventricle" lesion is drawn at random
            site_name = "random" if site == "ventricle" and not generated else site
            try:
                centre = _centre(site, datasets, radius, seed, generated)
                lesion = insert_lesion(
                    datasets, center_mm=centre, radius_mm=radius, hu=hu, seed=seed
                )
            except ValueError as exc:
                emit(f"{head}: {site} {volume} mL skipped ({exc})")
                continue
            series = load_datasets(datasets)
            truth = frame_truth(series, datasets, lesion.masks)
            row = LesionRow(head, site_name, hu, round(lesion.volume_ml, 2))
            for name, method in run.items():
                started = time.perf_counter()
                found = overlapping(method(series)[0], truth)
                row.seconds[name] = round(time.perf_counter() - started, 1)
                row.overlap[name] = int(np.count_nonzero(found & truth))
                row.total[name] = int(found.sum() + truth.sum())
                row.dice[name] = round(2.0 * row.overlap[name] / max(row.total[name], 1), 3)
            emit(f"{head} | {site_name} | {hu:g} HU | {row.volume_ml} mL | {row.dice}")
            rows.append(row)
    return rows


STRONG_RISE_HU = (25.0, 15.0)  # partial volume, cupping: within the training draw's range


def risen_head(seed: int, thickness: float, n_slices: int, strong: bool = False) -> list[Dataset]:
    """A generated normal head rendered with a rise toward the skull of the GE head's size
    (``pipelines.unet.cases.ge_like_rise``) or, ``strong``, with ``STRONG_RISE_HU``."""
    datasets = synthetic_head_ct(seed, rows=ROWS, n_slices=n_slices, slice_thickness_mm=thickness)
    rise = ge_like_rise(thickness)
    if strong:
        rise = replace(rise, partial_hu=STRONG_RISE_HU[0], cupping_hu=STRONG_RISE_HU[1])
    render_rise(datasets, rise, thickness)
    return datasets


def risen_heads(quick: bool) -> list[tuple[str, Callable[[], list[Dataset]]]]:
    """:func:`risen_head` of held-out seeds, 5 mm and (unless ``quick``) 1 mm slices: two
    heads each with the GE head's rise, one each with a strong rise."""
    out: list[tuple[str, Callable[[], list[Dataset]]]] = [
        ("generated 5 mm, GE-like rise", partial(risen_head, SEED_BASE + 2, 5.0, 32))
    ]
    if quick:
        return out
    return [
        *out,
        ("generated 1 mm, GE-like rise", partial(risen_head, SEED_BASE + 3, 1.0, 150)),
        ("generated 5 mm, GE-like rise, head 904", partial(risen_head, SEED_BASE + 4, 5.0, 32)),
        ("generated 1 mm, GE-like rise, head 905", partial(risen_head, SEED_BASE + 5, 1.0, 150)),
        (
            "generated 5 mm, strong rise, head 906",
            partial(risen_head, SEED_BASE + 6, 5.0, 32, strong=True),
        ),
        (
            "generated 1 mm, strong rise, head 907",
            partial(risen_head, SEED_BASE + 7, 1.0, 150, strong=True),
        ),
    ]


def evaluate_normals(quick: bool, run: dict[str, Method]) -> list[dict[str, object]]:
    """Haemorrhage-class false-positive volume on heads without a lesion (the lesions'
    heads and :func:`risen_heads`)."""
    out = []
    for head, make in [*heads(quick), *risen_heads(quick)]:
        series = load_datasets(make())
        voxel = frame_voxel_ml(series)
        result: dict[str, object] = {"head": head}
        for name, method in run.items():
            hyper, calc = method(series)
            result[f"fp_ml_{name}"] = round(float((hyper * voxel).sum()), 3)
            result[f"calcification_ml_{name}"] = round(float((calc * voxel).sum()), 3)
        emit(result)
        out.append(result)
    return out


def evaluate_calcifications(quick: bool, run: dict[str, Method]) -> list[dict[str, object]]:
    """Calcifications (200-400 HU, 3-4.6 mm radius) at each typical site of a generated
    head, 5 mm (and 1 mm unless ``quick``) slices."""
    out = []
    thicknesses = ((5.0, 32),) if quick else ((5.0, 32), (1.0, 150))
    for k, (site, where) in enumerate(sorted(CALCIFICATION_SITES_MM.items())):
        for thickness, n_slices in thicknesses:
            datasets = synthetic_head_ct(
                SEED_BASE + 50 + k, rows=ROWS, n_slices=n_slices, slice_thickness_mm=thickness
            )
            hu = 200.0 + 50.0 * k
            focus = insert_lesion(
                datasets,
                center_mm=site_mm(where),
                radius_mm=3.0 + 0.4 * k,
                hu=hu,
                seed=SEED_BASE + k,
                irregular=False,
            )
            series = load_datasets(datasets)
            truth = frame_truth(series, datasets, focus.masks)
            row: dict[str, object] = {"site": site, "slice_mm": thickness, "hu": hu}
            for name, method in run.items():
                hyper, calc = method(series)
                row[f"labelled_calcification_{name}"] = round(
                    float((calc & truth).sum() / truth.sum()), 3
                )
                row[f"called_haemorrhage_{name}"] = bool((hyper & truth).any())
            emit(row)
            out.append(row)
    return out


def evaluate_contrast(run: dict[str, Method]) -> list[dict[str, object]]:
    """Contrast stains (130-160 HU, 0.7-3 mL) must stay haemorrhage-class."""
    out = []
    for k, (hu, volume) in enumerate(((130.0, 0.7), (145.0, 1.5), (160.0, 3.0))):
        datasets = synthetic_head_ct(SEED_BASE + 70 + k, rows=ROWS)
        stain = insert_lesion(
            datasets,
            center_mm=None,
            radius_mm=radius_for_volume(volume),
            hu=hu,
            seed=SEED_BASE + 70 + k,
        )
        series = load_datasets(datasets)
        truth = frame_truth(series, datasets, stain.masks)
        row: dict[str, object] = {"hu": hu, "volume_ml": round(stain.volume_ml, 2)}
        for name, method in run.items():
            hyper, _ = method(series)
            found = overlapping(hyper, truth)
            row[f"dice_{name}"] = round(
                float(2.0 * (found & truth).sum() / (found.sum() + truth.sum())), 3
            )
        emit(row)
        out.append(row)
    return out


def summary(
    rows: Sequence[LesionRow], normals: Sequence[dict[str, object]]
) -> dict[str, dict[str, object]]:
    """Per method and head: pooled and mean Dice, misses of lesions >= 1 mL, worst FP."""
    out: dict[str, dict[str, object]] = {}
    names = [m for m in METHODS if any(m in r.dice for r in rows)]
    for head in [*sorted({r.head for r in rows}), "all"]:
        chosen = [r for r in rows if head in ("all", r.head)]
        by_method: dict[str, object] = {}
        for name in names:
            overlap = sum(r.overlap.get(name, 0) for r in chosen)
            total = sum(r.total.get(name, 0) for r in chosen)
            skull = [r.dice[name] for r in chosen if r.site == "skull base" and name in r.dice]
            fps = [
                float(n[f"fp_ml_{name}"])  # type: ignore[arg-type]
                for n in normals
                if head in ("all", n["head"]) and f"fp_ml_{name}" in n
            ]
            by_method[name] = {
                "pooled_dice": round(2.0 * overlap / total, 3) if total else None,
                "mean_dice": round(float(np.mean([r.dice[name] for r in chosen])), 3),
                "skull_base_mean_dice": round(float(np.mean(skull)), 3) if skull else None,
                "missed_from_1ml": sum(
                    1 for r in chosen if r.volume_ml >= MISSED_FROM_ML and r.dice[name] == 0.0
                ),
                "normal_fp_ml_max": round(max(fps), 3) if fps else None,
            }
        out[head] = by_method
    return out


def markdown(report: dict[str, object], command: str) -> str:
    """The report as a Markdown page: per-lesion table, summary, normals, calcifications."""
    lesions: list[dict[str, Any]] = report["lesions"]  # type: ignore[assignment]
    names = [m for m in METHODS if lesions and m in lesions[0]["dice"]]
    timed = names[-1] if names else ""
    lines = [
        "# bench/segmenter_eval.py results (held-out seeds 900+)",
        "",
        f"Run: `{command}` on the 2-core dev VM shared with other jobs (times inflated).",
        "Methods: threshold = `hyperdense_regions` 1.1.0 parameters; unet_1 = U-Net 1.0.0",
        "(old brain mask, trained on synthetic + GE cases); unet_2 = U-Net 2.0.0 (generated",
        "heads only, intracranial gating, calcification apart); unet_2_1 = U-Net 2.1.0 (2.0.0's",
        "weights with the bone rule of `pipelines/unet/bone.py`: the skull's HU rise flattened",
        "before the network, the skull's ramps and calcification halos dropped after it);",
        "unet_3 = U-Net 3.0.0 (trained on generated heads rendered with a scanner's HU rise",
        "toward the skull, no rule); unet_3_halo = 3.0.0 with the calcification halo dropped;",
        "unet_3_bone = 3.0.0 with 2.1.0's whole bone rule (3.0.0 as bundled); unet_3_1 =",
        "U-Net 3.1.0 (3.0.0's weights, thick-frame calcification foci apart, the threshold",
        "baseline's band test on found regions, threshold chosen on a validation set with",
        "the rules on: bench/segmenter_eval_threshold.py). Targets (issue 8): pooled",
        "Dice >= 0.85, no lesion >= 1 mL missed, normal-head FP <= 0.1 mL.",
        "",
        "## Lesion-wise Dice",
        "",
        "| head | site | HU | mL | " + " | ".join(names) + f" | s {timed} |",
        "|---|---|---|---|" + "---|" * (len(names) + 1),
    ]
    for row in lesions:
        d = row["dice"]
        lines.append(
            f"| {row['head']} | {row['site']} | {row['hu']:g} | {row['volume_ml']} | "
            + " | ".join(str(d[m]) for m in names)
            + f" | {row['seconds'][timed]} |"
        )
    lines += [
        "",
        "## Summary",
        "",
        "| head | method | pooled Dice | mean Dice | skull base mean | missed >= 1 mL "
        "| normal FP mL |",
        "|---|---|---|---|---|---|---|",
    ]
    for head, by_method in report["summary"].items():  # type: ignore[attr-defined]
        for name, s in by_method.items():
            lines.append(
                f"| {head} | {name} | {s['pooled_dice']} | {s['mean_dice']} | "
                f"{s['skull_base_mean_dice']} | {s['missed_from_1ml']} | {s['normal_fp_ml_max']} |"
            )
    for title, key in (
        ("Normal heads", "normals"),
        ("Calcifications", "calcifications"),
        ("Contrast stains", "contrast"),
    ):
        lines += ["", f"## {title}", "", "```"]
        lines += [json.dumps(r) for r in report[key]]  # type: ignore[attr-defined]
        lines.append("```")
    return "\n".join(lines) + "\n"


def reuse(report: dict[str, Any], earlier: dict[str, Any], names: Sequence[str]) -> None:
    """Copy into ``report`` the figures of methods ``names`` from an ``earlier`` report of
    the same seeds (rows matched by head, site, HU and volume; normals by head;
    calcifications by site and slice; stains by HU and volume); a row the earlier report
    lacks keeps no figure for them."""

    def index(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple[Any, ...], Any]:
        return {tuple(r[k] for k in keys): r for r in rows}

    old = index(earlier["lesions"], ("head", "site", "hu", "volume_ml"))
    for row in report["lesions"]:
        match = old.get((row["head"], row["site"], row["hu"], row["volume_ml"]))
        for name in names:
            if match is not None and name in match["dice"]:
                for key in ("dice", "overlap", "total", "seconds"):
                    row[key][name] = match[key][name]
    for section, keys in (
        ("normals", ("head",)),
        ("calcifications", ("site", "slice_mm")),
        ("contrast", ("hu", "volume_ml")),
    ):
        old = index(earlier[section], keys)
        for row in report[section]:
            match = old.get(tuple(row[k] for k in keys), {})
            for key, value in match.items():
                if any(key.endswith(f"_{name}") for name in names):
                    row[key] = value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation and write its figures as JSON (and Markdown)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("segmenter_eval.json"))
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer lesions, no 1 mm head")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS)
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        action="append",
        default=[],
        help="an earlier report (JSON) whose figures of the methods not run here are kept "
        "(repeatable; with --methods '' the reports are merged, the first giving the rows)",
    )
    args = parser.parse_args(argv)
    run = methods([m for m in args.methods.split(",") if m])
    report: dict[str, Any]
    if run:
        normals = evaluate_normals(args.quick, run)
        calcifications = evaluate_calcifications(args.quick, run)
        contrast = evaluate_contrast(run)
        rows = evaluate_lesions(args.quick, run)
        report = {
            "targets": TARGETS,
            "normals": normals,
            "calcifications": calcifications,
            "contrast": contrast,
            "lesions": [asdict(r) for r in rows],
        }
    elif args.reuse:  # merge only: the first report's rows, the others' figures added
        first = json.loads(args.reuse[0].read_text(encoding="utf-8"))
        report = {k: first[k] for k in ("targets", "normals", "calcifications", "contrast")}
        report["lesions"] = first["lesions"]
    else:
        parser.error("--methods is empty: give the reports to merge with --reuse")
    for path in args.reuse:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        reuse(report, earlier, [m for m in METHODS if m not in run])
    lesions = [LesionRow(**r) for r in report["lesions"]]
    report = {"summary": summary(lesions, report["normals"]), **report}
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    if args.markdown is not None:
        command = "python -m bench.segmenter_eval" + (" --quick" if args.quick else "")
        if args.methods != ",".join(METHODS):
            command += f" --methods {args.methods}"
        command += "".join(f" --reuse {path}" for path in args.reuse)
        args.markdown.write_text(markdown(report, command), encoding="utf-8")
    emit(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
