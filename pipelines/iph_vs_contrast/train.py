"""Train the IPH-vs-contrast Rad-score on a cohort of ``pipelines.iph_vs_contrast.cohort``
and write it, with its held-out report, into the model store.

The study's recipe (``docs/seeds.md`` study 2, ``pipelines.selection.recipes.
iph_vs_contrast``), per hyperdense AREA:

1. areas: the segmenter's regions (:func:`pipelines.iph_vs_contrast.features.find_areas`),
   each labelled by the painted area it overlaps most (regions overlapping none, e.g. a
   false positive, are left out and counted);
2. a patient-level split, 7:3, stratified by the case's majority label (no patient's
   areas on both sides);
3. radiomics of every area; on a reliability subset (the first
   :data:`RELIABILITY_AREAS` training areas) also of two repeat segmentations
   (:func:`~pipelines.iph_vs_contrast.features.reader_masks`): intra-observer ICC
   (original vs the strict reader) and inter-observer ICC (original vs the generous
   reader), ICC(2,1); a feature passes when the lower of the two is above 0.80;
4. z-score, mRMR top 10, LASSO logistic regression with stratified 10-fold CV;
   Rad-score = intercept + sum(coef x z-scored feature); probability = sigmoid(Rad-score);
   cut-off at the Youden index of the training areas;
5. held out: the Rad-score, HUmax alone and volume alone (each a one-variable logistic
   regression fitted on the training areas), and the generative model's oracle
   probability: AUC with DeLong 95% CI, sensitivity, specificity, accuracy, PPV and NPV
   at the training Youden cut-off, DeLong tests of the Rad-score against each
   single-feature baseline, Hosmer-Lemeshow calibration of the Rad-score probability;
   the same comparison repeated over :data:`EXTRA_SPLITS` further patient splits
   (features and ICCs reused) to show how stable the ranking is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline

from model_store.artefacts import TrainingRecord, label_table_bytes, save_model, training_data_hash
from model_store.registry import STORE_ROOT
from pipelines.base import PipelineError
from pipelines.contract import Segmenter
from pipelines.evaluation import (
    DelongTest,
    EvaluationRow,
    HosmerLemeshow,
    delong_test,
    evaluation_table,
    hosmer_lemeshow,
    to_markdown,
    youden_cutoff,
)
from pipelines.hyperdense import HyperdenseThresholdPipeline
from pipelines.iph_vs_contrast.features import area_radiomics, find_areas, reader_masks
from pipelines.iph_vs_contrast.model import (
    MODEL_NAME,
    PRIMARY,
    params_sha256,
    rad_scores,
)
from pipelines.selection import icc
from pipelines.selection.recipes import iph_vs_contrast
from pipelines.series import LoadedSeries
from pipelines.volume import load_series

DEFAULT_PARAMS = "iph_vs_contrast_original"
RELIABILITY_AREAS = 40  # the study re-segmented a subset; so do we
ICC_THRESHOLD = 0.80
TEST_FRACTION_FOLDS = (3, 10)  # 3 of 10 patient folds held out: the study's 7:3 split
EXTRA_SPLITS = 4
MIN_OVERLAP = 0.3  # a region is a painted area's when at least this share of it lies in it
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class AreaRow:
    """One labelled area of the cohort."""

    case_id: str
    label: int  # 1 haemorrhage, 0 contrast
    oracle: float  # the generative model's probability of haemorrhage
    volume_ml: float
    hu_max: float
    radiomics: Mapping[str, float]
    readers: tuple[Mapping[str, float], Mapping[str, float]] | None  # generous, strict


@dataclass(frozen=True)
class TrainingReport:
    """What training measured, and where the version was written."""

    version: str
    folder: Path
    n_cases: int
    n_areas: int
    n_train: int
    n_test: int
    unmatched_regions: int
    folds_out: tuple[int, int]  # (held out, of) stratified patient folds
    table: str  # the held-out Markdown table
    aucs: Mapping[str, float]  # held-out AUC per model
    split_aucs: Sequence[Mapping[str, float]]  # held-out AUCs over the extra splits
    seconds: Mapping[str, float]


def _truth_order(series: LoadedSeries, uids: Sequence[str]) -> list[int]:
    """File-order index of each of the series' frames (the truth masks' order)."""
    where = {uid: k for k, uid in enumerate(uids)}
    return [where[f.sop_instance_uid] for f in series.frames]


def case_areas(
    folder: Path,
    truth_path: Path,
    segmenter: Segmenter,
    params: str | Path,
    with_readers: bool,
) -> tuple[list[AreaRow], int]:
    """The labelled areas of one case and the number of regions left out: those matching
    no painted area and those too small for radiomics."""
    series = load_series(sorted(folder.glob("*.dcm")))
    truth = np.load(truth_path)
    order = _truth_order(series, [str(u) for u in truth["sop_instance_uids"]])
    masks = truth["masks"][:, order] if len(truth["masks"]) else truth["masks"]
    rows, unmatched = [], 0
    for area in find_areas(series, segmenter):
        overlaps = [int((area.frame_mask & m).sum()) for m in masks]
        best = int(np.argmax(overlaps)) if overlaps else -1
        if best < 0 or overlaps[best] < MIN_OVERLAP * area.frame_mask.sum():
            unmatched += 1
            continue
        try:
            radiomics = area_radiomics(series, area.grid_mask, params)
            readers = None
            if with_readers:
                generous, strict = reader_masks(series.volume.hu, area.grid_mask)
                readers = (
                    area_radiomics(series, generous, params),
                    area_radiomics(series, strict, params),
                )
        except PipelineError:  # too small to describe: the pipeline leaves it unclassified
            unmatched += 1
            continue
        rows.append(
            AreaRow(
                case_id=folder.name,
                label=int(truth["labels"][best]),
                oracle=float(truth["probabilities"][best]),
                volume_ml=area.measurements.volume_ml,
                hu_max=area.measurements.hu_max,
                radiomics=radiomics,
                readers=readers,
            )
        )
    return rows, unmatched


def patient_split(
    case_ids: Sequence[str],
    labels: NDArray[np.int_],
    seed: int,
    folds_out: tuple[int, int] = TEST_FRACTION_FOLDS,
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Training and held-out masks of the areas: ``folds_out`` = (held, of) stratified
    patient folds held out (default 3 of 10, the study's 7:3)."""
    held, folds = folds_out
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    test = np.zeros(len(case_ids), dtype=bool)
    for k, (_, test_index) in enumerate(splitter.split(np.zeros(len(labels)), labels, case_ids)):
        if k < held:
            test[test_index] = True
    return ~test, test


def reliability_icc(rows: Sequence[AreaRow], names: Sequence[str]) -> NDArray[np.float64]:
    """min(intra-, inter-observer ICC(2,1)) of every feature over the reliability areas."""
    subset = [r for r in rows if r.readers is not None]
    if len(subset) < 3:
        raise ValueError(f"the ICC needs at least 3 re-segmented areas, got {len(subset)}")
    original = np.array([[r.radiomics[n] for n in names] for r in subset])
    generous = np.array([[r.readers[0][n] for n in names] for r in subset])  # type: ignore[index]
    strict = np.array([[r.readers[1][n] for n in names] for r in subset])  # type: ignore[index]
    with np.errstate(invalid="ignore", divide="ignore"):
        intra = icc([original, strict])
        inter = icc([original, generous])
    return np.asarray(np.fmin(intra, inter), dtype=np.float64)


def _single_feature(x_train: NDArray[np.float64], y_train: NDArray[np.int_]) -> LogisticRegression:
    """A one-variable logistic regression (a baseline)."""
    return LogisticRegression(C=1e6, max_iter=1000).fit(x_train.reshape(-1, 1), y_train)


def youden(y: NDArray[np.int_], score: NDArray[np.float64]) -> float:
    """The Youden cut-off of ``score`` on the areas ``y``."""
    return float(youden_cutoff(y, score))


@dataclass(frozen=True)
class FittedSplit:
    """The recipe fitted on one split's training areas, and every model's scores."""

    recipe: Pipeline
    cutoffs: dict[str, float]  # on each model's score scale, from the training areas
    scores: dict[str, NDArray[np.float64]]  # held-out scores per model
    y_test: NDArray[np.int_]
    train_radscore: NDArray[np.float64]


def fit_split(
    X: NDArray[np.float64],
    y: NDArray[np.int_],
    baselines: Mapping[str, NDArray[np.float64]],
    oracle: NDArray[np.float64],
    train: NDArray[np.bool_],
    icc_values: NDArray[np.float64],
    seed: int,
    cv: int,
) -> FittedSplit:
    """Fit the Rad-score and the baselines on ``train``; score the held-out areas."""
    recipe = iph_vs_contrast(icc_values=icc_values, random_state=seed)
    recipe.set_params(lasso__cv=cv)
    recipe.fit(X[train], y[train])
    test = ~train
    train_score = rad_scores(recipe, X[train])
    scores = {"Rad-score": rad_scores(recipe, X[test])}
    cutoffs = {"Rad-score": youden(y[train], train_score)}
    for name, values in baselines.items():
        model = _single_feature(values[train], y[train])
        scores[name] = model.decision_function(values[test].reshape(-1, 1))
        cutoffs[name] = youden(y[train], model.decision_function(values[train].reshape(-1, 1)))
    scores["Oracle (generative model)"] = oracle[test]
    cutoffs["Oracle (generative model)"] = youden(y[train], oracle[train])
    return FittedSplit(recipe, cutoffs, scores, y[test], train_score)


def _sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Logistic function."""
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


def collect_areas(
    cohort_dir: Path,
    segmenter: Segmenter,
    params: str | Path,
    progress: ProgressFn | None = None,
    reliability_areas: int = RELIABILITY_AREAS,
) -> tuple[list[AreaRow], int, int]:
    """Every labelled area of the cohort (readers on the first cases' areas until
    ``reliability_areas`` have them), the regions left out and the case count."""
    folders = sorted(p for p in (cohort_dir / "cases").iterdir() if p.is_dir())
    rows: list[AreaRow] = []
    unmatched = 0
    for k, folder in enumerate(folders):
        with_readers = sum(r.readers is not None for r in rows) < reliability_areas
        found, missed = case_areas(
            folder,
            cohort_dir / "ground_truth" / f"{folder.name}.npz",
            segmenter,
            params,
            with_readers,
        )
        rows += found
        unmatched += missed
        if progress is not None:
            progress("areas", k + 1, len(folders))
    return rows, unmatched, len(folders)


def train_iph_model(
    cohort_dir: Path,
    *,
    root: Path = STORE_ROOT,
    version: str = "1.0.0",
    seed: int = 0,
    params: str = DEFAULT_PARAMS,
    segmenter: Segmenter | None = None,
    cv: int = 10,
    extra_splits: int = EXTRA_SPLITS,
    reliability_areas: int = RELIABILITY_AREAS,
    folds_out: tuple[int, int] = TEST_FRACTION_FOLDS,
    progress: ProgressFn | None = None,
    extra: Mapping[str, Any] | None = None,
) -> TrainingReport:
    """Train on ``cohort_dir`` (written by ``generate_iph_cohort``), save ``version`` in
    ``root`` with its report ``root/<name>/<version>.report.md``; returns the report."""
    started = time.monotonic()
    segmenter = segmenter or HyperdenseThresholdPipeline()
    rows, unmatched, n_cases = collect_areas(
        cohort_dir, segmenter, params, progress, reliability_areas
    )
    extracted = time.monotonic()
    names = sorted(set.intersection(*(set(r.radiomics) for r in rows)))
    X = np.array([[r.radiomics[n] for n in names] for r in rows], dtype=np.float64)
    finite = np.all(np.isfinite(X), axis=0)
    names = [n for n, ok in zip(names, finite, strict=True) if ok]
    X = X[:, finite]
    y = np.array([r.label for r in rows], dtype=np.int64)
    case_ids = [r.case_id for r in rows]
    oracle = np.array([r.oracle for r in rows])
    baselines = {
        "HUmax alone": np.array([r.hu_max for r in rows]),
        "Volume alone": np.array([r.volume_ml for r in rows]),
    }
    icc_values = np.nan_to_num(reliability_icc(rows, names), nan=-1.0)
    train, test = patient_split(case_ids, y, seed, folds_out)
    fitted = fit_split(X, y, baselines, oracle, train, icc_values, seed, cv)
    rows_table = evaluation_table(
        {name: (fitted.y_test, score) for name, score in fitted.scores.items()},
        cutoffs=fitted.cutoffs,
    )
    table = to_markdown(rows_table)
    aucs = {row.model: row.auc.auc for row in rows_table}
    radscore = fitted.scores["Rad-score"]
    tests = {
        name: delong_test(fitted.y_test, radscore, fitted.scores[name])
        for name in ("HUmax alone", "Volume alone", "Oracle (generative model)")
    }
    calibration = hosmer_lemeshow(fitted.y_test, _sigmoid(radscore), groups=8)
    split_aucs = []
    for k in range(1, extra_splits + 1):
        other_train, _ = patient_split(case_ids, y, seed + k, folds_out)
        other = fit_split(X, y, baselines, oracle, other_train, icc_values, seed, cv)
        split_aucs.append(
            {
                name: float(evaluation_table({name: (other.y_test, s)})[0].auc.auc)
                for name, s in other.scores.items()
            }
        )
    trained = time.monotonic()
    recipe = fitted.recipe
    lasso = recipe.named_steps["lasso"]
    mrmr_names = _selected_names(recipe, names)
    formula = {
        "intercept": lasso.intercept_,
        "coefficients": {
            n: float(c) for n, c in zip(mrmr_names, lasso.coef_, strict=True) if c != 0.0
        },
        "scale": "z-scored features (training mean and SD of each, in the zscore step)",
    }
    cutoff_score = fitted.cutoffs["Rad-score"]
    metrics = {
        "held_out": {row.model: _row_dict(row) for row in rows_table},
        "delong_vs_radscore": {
            name: {"difference": t.difference, "z": t.z, "p_value": t.p_value}
            for name, t in tests.items()
        },
        "hosmer_lemeshow": {
            "statistic": calibration.statistic,
            "df": calibration.df,
            "p_value": calibration.p_value,
        },
        "extra_splits": split_aucs,
    }
    record = TrainingRecord(
        recipe={
            "selection": "ICC > 0.80 (min of intra and inter) -> z-score -> mRMR top 10 -> "
            f"LASSO logistic ({cv}-fold CV)",
            "seed": seed,
            "split": f"patient-level, {folds_out[0]} of {folds_out[1]} stratified group folds "
            "held out",
            "segmenter": segmenter.name,
        },
        feature_names=tuple(names),
        training_data_hash=training_data_hash(
            [f"{r.case_id}/{i}" for i, r in enumerate(rows)],
            label_table_bytes([f"{r.case_id}/{i}" for i, r in enumerate(rows)], list(y)),
        ),
        metrics=metrics,
        cutoffs={PRIMARY: float(_sigmoid(np.array([cutoff_score]))[0])},
        primary=PRIMARY,
        extra={
            "radiomics": {
                "params": params,
                "params_sha256": params_sha256(params),
                "features": list(names),
                "icc_kept": int(np.sum(icc_values > ICC_THRESHOLD)),
                "reliability_areas": int(sum(r.readers is not None for r in rows)),
            },
            "rad_score": {**formula, "cutoff": cutoff_score},
            **dict(extra or {}),
        },
    )
    folder = save_model(MODEL_NAME, version, {PRIMARY: recipe}, record, root=root)
    seconds = {"areas": extracted - started, "training": trained - extracted}
    report = TrainingReport(
        version=version,
        folder=folder,
        n_cases=n_cases,
        n_areas=len(rows),
        n_train=int(train.sum()),
        n_test=int(test.sum()),
        unmatched_regions=unmatched,
        folds_out=folds_out,
        table=table,
        aucs=aucs,
        split_aucs=split_aucs,
        seconds=seconds,
    )
    (root / MODEL_NAME / f"{version}.report.md").write_text(
        report_markdown(
            report, formula, cutoff_score, tests, calibration, names, icc_values, rows, extra
        )
    )
    return report


def _selected_names(recipe: Pipeline, names: Sequence[str]) -> list[str]:
    """The feature names that reach the LASSO (after the ICC filter and mRMR)."""
    current = np.asarray(names)
    for step in ("icc", "mrmr"):
        if step in recipe.named_steps:
            current = current[recipe.named_steps[step].get_support()]
    return [str(n) for n in current]


def _row_dict(row: EvaluationRow) -> dict[str, float]:
    """JSON-ready figures of one evaluation row."""
    m = row.metrics
    return {
        "n": row.n,
        "n_positive": row.n_positive,
        "auc": row.auc.auc,
        "auc_ci_low": row.auc.low,
        "auc_ci_high": row.auc.high,
        "cutoff": m.cutoff,
        "sensitivity": m.sensitivity,
        "specificity": m.specificity,
        "accuracy": m.accuracy,
        "ppv": m.ppv,
        "npv": m.npv,
    }


def _number(value: float) -> str:
    """A figure with 3 decimals, or n/a."""
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def report_markdown(
    report: TrainingReport,
    formula: Mapping[str, Any],
    cutoff: float,
    tests: Mapping[str, DelongTest],
    calibration: HosmerLemeshow,
    names: Sequence[str],
    icc_values: NDArray[np.float64],
    rows: Sequence[AreaRow],
    extra: Mapping[str, Any] | None,
) -> str:
    """The version's report: cohort, recipe, held-out table, tests, stability, formula."""
    from pipelines.iph_vs_contrast.cohort import (
        AREA_COUNT_P,
        LABEL_LOGIT,
        PATTERN_CUTS,
        oracle_auc_reference,
    )

    n_pos = sum(r.label for r in rows)
    lines = [
        f"# {MODEL_NAME} {report.version}: haemorrhage vs contrast staining, per area",
        "",
        "Trained on synthetic data - not for clinical use. Regenerated by "
        "`python -m pipelines.iph_vs_contrast.train_default`.",
        "",
        "## Cohort and generative model",
        "",
        f"{report.n_cases} synthetic post-thrombectomy head CTs "
        f"({_describe(extra)}), {report.n_areas} hyperdense areas found by the segmenter "
        f"and matched to a painted area ({n_pos} haemorrhage, {report.n_areas - n_pos} "
        f"contrast); {report.unmatched_regions} segmenter region(s) matched no painted area "
        "or were too small for radiomics and were left out. Generator: "
        "`pipelines.iph_vs_contrast.cohort` (its docstring has the full model): 1-3 areas "
        f"per case (p = {list(AREA_COUNT_P)}), patient latent "
        "shared by a case's areas, per-area texture t and shape s ~ N(0, 1); label "
        f"haemorrhage ~ Bernoulli(sigmoid({LABEL_LOGIT['intercept']} + "
        f"{LABEL_LOGIT['texture']} t + {LABEL_LOGIT['shape']} s)); image pattern from t + "
        f"noise (cuts {list(PATTERN_CUTS)}: contrast, mixed, haemorrhage), volume from s, "
        "contrast and haemorrhage HU physics of `pipelines.lesions`. Oracle AUC of the "
        f"generative model over 40 000 simulated areas: {oracle_auc_reference():.3f}.",
        "",
        "## Recipe",
        "",
        "Radiomics (pyradiomics, `pipelines/iph_vs_contrast/params/"
        f"iph_vs_contrast_original.yaml`, {len(names)} finite features), ICC(2,1) on "
        f"{sum(r.readers is not None for r in rows)} re-segmented training areas (intra: "
        "original vs a strict reader dropping voxels under 62 HU; inter: original vs a "
        "generous reader grown one voxel in-plane into >= 45 HU), kept when min(intra, "
        f"inter) > {ICC_THRESHOLD}: {int(np.sum(icc_values > ICC_THRESHOLD))} features; "
        "z-score -> mRMR top 10 -> LASSO logistic regression (stratified CV). "
        f"Patient-level split: {report.folds_out[0]} of {report.folds_out[1]} stratified "
        "group folds held out "
        f"({report.n_train} training, {report.n_test} held-out areas).",
        "",
        "Rad-score = "
        + f"{formula['intercept']:.3f}"
        + "".join(f" {c:+.3f} x {n}" for n, c in formula["coefficients"].items())
        + f" (z-scored features); cut-off (Youden, training areas) {cutoff:.3f}; "
        "probability of haemorrhage = sigmoid(Rad-score).",
        "",
        "## Held-out areas",
        "",
        "Each model is classified at the Youden cut-off of its training areas (the oracle "
        "at its own). AUC 95% CI: DeLong.",
        "",
        report.table,
        "DeLong tests of the Rad-score against: "
        + "; ".join(
            f"{name} (difference {t.difference:+.3f}, p = {_number(t.p_value)})"
            for name, t in tests.items()
        )
        + ".",
        "",
        f"Hosmer-Lemeshow of the Rad-score probability (8 groups): chi2 = "
        f"{calibration.statistic:.2f}, df = {calibration.df}, p = {_number(calibration.p_value)}.",
        "",
        "## Stability over patient splits",
        "",
        f"Held-out AUCs over {len(report.split_aucs)} further patient splits (seeds + 1.. "
        f"+{len(report.split_aucs)}; features and ICCs reused, the recipe refitted):",
        "",
        "| Split | " + " | ".join(report.aucs) + " |",
        "|---|" + "---:|" * len(report.aucs),
        "| main | " + " | ".join(f"{v:.3f}" for v in report.aucs.values()) + " |",
    ]
    for k, aucs in enumerate(report.split_aucs, start=1):
        lines.append(f"| +{k} | " + " | ".join(f"{aucs[n]:.3f}" for n in report.aucs) + " |")
    lines += [
        "",
        f"Seeds: one cohort and split seed ({_seed(extra)}) was trained and reported, with "
        f"{len(report.split_aucs)} further patient splits of the same areas above; no seed "
        "was chosen among others.",
        "",
        f"Time: {sum(report.seconds.values()):.0f} s on one CPU thread.",
        "",
    ]
    return "\n".join(lines)


def _seed(extra: Mapping[str, Any] | None) -> str:
    """The training cohort's seed, from the manifest's extra entries."""
    return str((extra or {}).get("training_cohort", {}).get("seed", "given cohort"))


def _describe(extra: Mapping[str, Any] | None) -> str:
    """Seed and image size of the training cohort, from the manifest's extra entries."""
    cohort = (extra or {}).get("training_cohort", {})
    if not cohort:
        return "cohort folder given"
    return (
        f"seed {cohort.get('seed')}, {cohort.get('rows')} px, {cohort.get('n_slices')} slices of "
        "5 mm"
    )
