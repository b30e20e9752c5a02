"""Pipeline ``ht_after_mt``: risk of haemorrhagic transformation after thrombectomy.

Read top to bottom in :meth:`HtAfterMtPipeline.run`: the configured lesion segmenter
(``[pipelines.ht_after_mt] segmenter``; any :class:`pipelines.contract.Segmenter`)
labels the candidate lesions; calcified foci are found apart (the threshold baseline's
calcification rule) and never scored; :mod:`pipelines.ht_after_mt.scoring` chooses the
scored lesion, the largest haemorrhage-class region, and says why ("largest hyperdense
region (12.3 mL) of 3 found by hyperdense_unet"). The result's segments are the scored
lesion (its own SEG segment, "Scored lesion by <segmenter>"), the other regions ("Other
lesion, not scored") and the calcifications ("Calcification, never scored"); the risk
names the scored segment (``RiskPrediction.scored_region``) and its reason, which the
SC and the SR state (the risk sits in the scored region's SR measurement group). With no
lesion, the SEG holds one empty segment and the SC and SR say "no lesion: no risk
computed" (``PipelineResult.statements``): no risk, no heat maps.

The scored lesion is described by its radiomics, the fine-tuned CNN's features of its
2.5-D crop and the clinical variables (header, and the clinical table of
``[pipelines.ht_after_mt] clinical_table``; missing, unreadable and implausible ones
imputed and listed with their reasons: the table fails open, an unreadable table never
removes the imaging results); the combined model of the configured (default: promoted)
version in the configured model store gives the probability, classified at its training
cut-off. Grad-CAM of the CNN (:func:`pipelines.cnn.lesion_heat_maps`, the method every
risk pipeline draws) is computed on the lesion crop the network sees, relative to the
same crop without lesion (so the map holds only what the lesion changes, not the black
surround), mapped back to the frame and shown within ``HEAT_MARGIN_MM`` of the lesion (its
label states how much of the map's heat lay there and where the raw peak lies), on the
lesion's largest cross-section and its nearest neighbours that hold lesion only. The
model is loaded and hash-checked once, by :meth:`HtAfterMtPipeline.check` at start-up (a
model or segmenter that fails its checks there makes the pipeline unavailable: the node
runs its default instead) or on the first run.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import structlog
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from model_store.registry import STORE_ROOT, ModelStoreError, load_manifest, select_version
from pipelines.base import (
    Algorithm,
    HeatMap,
    PipelineResult,
    PipelineUnavailable,
    RiskPrediction,
    SegmentResult,
)
from pipelines.cnn import HEATMAP_REACH, NEGATIVE, POSITIVE, largest_frame, lesion_heat_maps
from pipelines.cnn.inputs import frame_pixel_spacing
from pipelines.contract import OutputProfile, Segmenter
from pipelines.geometry import grid_to_frames
from pipelines.ht_after_mt.casedata import case_record
from pipelines.ht_after_mt.clinical import NO_TABLE
from pipelines.ht_after_mt.features import (
    TABLE_VARIABLES,
    CaseFeatures,
    ClinicalTable,
    ClinicalTableError,
    RowLookup,
    case_features,
    input_config_to_dict,
)
from pipelines.ht_after_mt.model import MODEL_NAME, OUTCOME, PRIMARY, HtModel
from pipelines.ht_after_mt.scoring import (
    LesionChoice,
    choose_lesion,
    relabel_without,
    scored_reason,
)
from pipelines.hyperdense import CALCIFICATION_SEGMENT, HyperdenseThresholdPipeline
from pipelines.measure import measure_segment
from pipelines.registry import get_pipeline, get_segmenter
from pipelines.retraining.card import model_card
from pipelines.retraining.ood import manifest_input_check
from pipelines.run_scope import cases_kept, run_scope
from pipelines.series import LoadedSeries
from pipelines.settings import PipelinesSettings
from pipelines.stages import charged_to

CLINICAL_TABLE_SETTING = "[pipelines.ht_after_mt] clinical_table"
HEATMAP_LAYER = "features._blocks.2"
"""Grad-CAM layer: Lite0's last stride-8 stage, 16 x 16 cells (5 mm on the 80 mm crop).
Relative to the no-lesion input, its raw peak lay a median 0 mm from the lesion, 84% of
peaks within 5 mm (``bench/gradcam_placement.py``, 40 held-out cases); plain Grad-CAM
at the stride-16 stage (the method before): median 5.4 mm, 47% within 5 mm, peaks up to
50 mm away."""

LABEL_LIMIT = 62  # SegmentLabel is LO (64); the SEG adds " <k>" to each region's label
SCORED_LABEL = "Scored lesion"
OTHER_LABEL = "Other lesion, not scored"
NO_LESION_LABEL = "No lesion, no risk"
CALCIFICATION_LABEL = "Calcification, never scored"

log = structlog.get_logger(__name__)


class HtAfterMtPipeline:
    """Pipeline ``ht_after_mt``: HIM segmentation, fused risk model, Grad-CAM."""

    name = "ht_after_mt"

    def __init__(
        self,
        version: str | None = None,
        *,
        root: Path = STORE_ROOT,
        clinical_table: Path | None = None,
        heatmap_reach: int = HEATMAP_REACH,
        segmenter: Segmenter | None = None,
        calcification_finder: HyperdenseThresholdPipeline | None = None,
        radiomics_workers: int = 1,
    ) -> None:
        """Use ``version`` (default: the promoted one) of the model in ``root``.

        ``clinical_table`` (CSV or JSON): where the clinical variables come from; without
        one, every table variable is imputed. ``segmenter`` finds the lesion that is
        scored (default: the threshold baseline); ``calcification_finder`` tells
        calcified foci apart (default: the segmenter when it is the threshold baseline,
        else a threshold baseline of its own); ``radiomics_workers``: the pool size of
        the lesion's radiomics extraction. Only the manifest is read here.
        """
        self.version = version or select_version(MODEL_NAME, root)
        manifest = load_manifest(MODEL_NAME, self.version, root)
        self.root = root
        self.clinical_table = clinical_table
        self.heatmap_reach = heatmap_reach
        self.radiomics_workers = radiomics_workers
        self.segmenter: Segmenter = segmenter or HyperdenseThresholdPipeline()
        if calcification_finder is None:
            own = self.segmenter
            finder = own if isinstance(own, HyperdenseThresholdPipeline) else None
            calcification_finder = finder or HyperdenseThresholdPipeline()
        self.calcification_finder = calcification_finder
        seg = self.segmenter.algorithm
        found = self.segmenter.segment_class
        name = self.segmenter.name
        self._lesion_class = replace(found, label=f"{SCORED_LABEL} by {name}"[:LABEL_LIMIT])
        self._other_class = replace(found, label=f"{OTHER_LABEL} by {name}"[:LABEL_LIMIT])
        self._no_lesion_class = replace(found, label=f"{NO_LESION_LABEL} by {name}"[:LABEL_LIMIT])
        self._calcification_class = replace(CALCIFICATION_SEGMENT, label=CALCIFICATION_LABEL)
        self._profile = OutputProfile(
            seg_title="HT RISK LESION SEG",
            sc_title="HT RISK SUMMARY",
            sr_title="HT RISK REPORT",
            saliency_title="SALIENCY GRAD-CAM HT RISK",
            segments=(
                self._lesion_class,
                self._other_class,
                self._calcification_class,
                self._no_lesion_class,
            ),
        )
        self._model: HtModel | None = None
        self._lock = threading.Lock()
        self._algorithm = Algorithm(
            name="dicomnode HT risk after thrombectomy (clinical+radiomics+CNN)",
            version=self.version,
            kind="trained risk model",
            provenance=f"model {MODEL_NAME} {self.version} ({PRIMARY} variant, "
            f"EfficientNet-Lite0 CNN), {manifest['notice']}; training data sha256 "
            f"{str(manifest['training_data_hash'])[:16]}; lesion segmenter "
            f"{self.segmenter.name} ({seg.name} {seg.version})",
        )

    @classmethod
    def from_settings(cls, settings: PipelinesSettings) -> HtAfterMtPipeline:
        """The risk model of ``[pipelines.ht_after_mt]``: model store folder and version,
        clinical table, and its segmenter built from that segmenter's own settings;
        extracting with the pool size of ``[pipelines.radiomics]``."""
        own = settings.ht_after_mt
        return cls(
            own.version,
            root=own.store_root,
            clinical_table=own.clinical_table,
            segmenter=get_segmenter(own.segmenter, settings),
            calcification_finder=cast(
                HyperdenseThresholdPipeline, get_pipeline("hyperdense_regions", settings)
            ),
            radiomics_workers=settings.radiomics.workers,
        )

    @property
    def profile(self) -> OutputProfile:
        """SEG of the segmenter's regions (labelled with its name), summary SC, SR with
        the risk, and one Grad-CAM Secondary Capture per heat map."""
        return self._profile

    @property
    def algorithm(self) -> Algorithm:
        """The identity written into every output."""
        return self._algorithm

    @property
    def model(self) -> HtModel:
        """The model version, loaded and hash-checked on first use (``ModelStoreError``
        when a file is missing or changed: the job fails as a refused model)."""
        with self._lock:
            if self._model is None:
                self._model = HtModel.load(self.version, self.root)
            return self._model

    def check(self) -> None:
        """Load and verify the model now (manifest, every file's sha256, radiomics
        parameters, CNN weights) and the segmenter's artefacts; ``PipelineUnavailable``
        saying what is wrong, so that the node starts with its default pipeline in this
        one's place."""
        try:
            _ = self.model
        except ModelStoreError as exc:
            raise PipelineUnavailable(f"model {MODEL_NAME} {self.version} refused: {exc}") from exc
        try:
            self.segmenter.check()
        except PipelineUnavailable as exc:
            raise PipelineUnavailable(
                f"{MODEL_NAME}: its lesion segmenter {self.segmenter.name} is unavailable: {exc}"
            ) from exc

    def _lookup(self, ds: Dataset) -> tuple[RowLookup, str]:
        """The study's table row, or why there is none, and where the variables came from.

        A table that cannot be read is logged for the admin and reported in the outputs;
        the risk is then computed with every table variable imputed.
        """
        path = self.clinical_table
        if path is None:
            return RowLookup(None, NO_TABLE), f"no clinical table (set {CLINICAL_TABLE_SETTING})"
        try:
            table = ClinicalTable.read(path, strict=False)
        except ClinicalTableError as exc:
            log.warning(
                "clinical table unreadable; its variables are imputed", table=str(path),
                reason=exc.reason,
            )  # fmt: skip
            reason = f"clinical table unreadable: {exc.reason}"
            return RowLookup(None, reason), reason
        found = table.find_dataset(ds)
        if found.row is None:
            return found, f"{found.reason} ({table.source})"
        return found, f"clinical variables from {table.source}"

    def _calcifications(self, series: LoadedSeries) -> tuple[NDArray[np.integer], int]:
        """Calcified foci on the volume grid (the threshold baseline's rule: dense cores
        above its calcification threshold), found apart from the lesions, never scored."""
        classes = self.calcification_finder.segment_classes(series)
        return classes.calcification, classes.calcification_count

    def _segments(
        self,
        series: LoadedSeries,
        labels: NDArray[np.int32],
        count: int,
        choice: LesionChoice,
        calcified: tuple[NDArray[np.integer], int],
    ) -> list[SegmentResult]:
        """The scored lesion (its own segment), the other regions, the calcifications;
        with nothing scored, one empty lesion segment and the calcifications."""
        if choice.label is None:
            empty = np.zeros(labels.shape, dtype=np.uint8)
            segments = [measure_segment(series, self._no_lesion_class, empty, 0)]
        else:
            scored = (labels == choice.label).view(np.uint8)  # label 1, no copy
            others = relabel_without(labels, count, (choice.label, *choice.calcified))
            segments = [measure_segment(series, self._lesion_class, scored, 1)]
            rest = measure_segment(series, self._other_class, *others)
            if rest.regions:
                segments.append(rest)
        calcification = measure_segment(series, self._calcification_class, *calcified)
        if calcification.regions:
            segments.append(calcification)
        return segments

    def run(self, series: LoadedSeries) -> PipelineResult:
        """Segment, choose the scored lesion (``scoring``), describe it, predict, explain;
        the case record only for a job that keeps it (``pipelines.run_scope``)."""
        with run_scope():  # the segmenter's regions and calcifications: one segmentation
            return self._run(series)

    def _run(self, series: LoadedSeries) -> PipelineResult:
        """:meth:`run` inside its run scope."""
        model = self.model
        found, source = self._lookup(series.reference)
        labels, count = self.segmenter.segment(series)
        calcified = self._calcifications(series)
        on_frames = [bool(grid_to_frames(series, labels == k).any()) for k in range(1, count + 1)]
        choice = choose_lesion(
            labels, count, calcified[0] > 0, on_frames, series.volume.voxel_volume_ml
        )
        segments = self._segments(series, labels, count, choice, calcified)
        n_calcified = sum(
            len(s.regions) for s in segments if s.segment == self._calcification_class
        )
        lesion_total = segments[0].total
        measured_ml = lesion_total.volume_ml if lesion_total else 0.0
        reason = scored_reason(choice, self.segmenter.name, n_calcified, measured_ml)
        seg = self.segmenter.algorithm
        segmented = [
            f"lesion segmenter {self.segmenter.name} ({seg.name} {seg.version}): "
            f"{count} region(s); {reason}"
        ]
        key_frame = lesion_total.key_frame if lesion_total else len(series.frames) // 2
        imaging = PipelineResult(self.algorithm, segments, key_frame, segmented)
        if choice.label is None or lesion_total is None:
            record = case_record(series, labels) if cases_kept() else None
            return replace(imaging, statements=(reason,), case_record=record)
        scored = ((labels == choice.label).view(np.uint8), 1)
        case = case_features(
            series,
            found,
            self.segmenter,
            model.radiomics_params,
            model.cnn_input,
            scored,
            radiomics_workers=self.radiomics_workers,
        )
        with self._lock:
            prediction = model.predict(str(series.reference.get("SeriesInstanceUID", "")), case)
            high = prediction.risks[PRIMARY] >= model.cutoff
            heatmaps = self._heatmaps(series, case, model, high)
        imputed = set(prediction.imputed)
        risk = RiskPrediction(
            outcome=OUTCOME,
            probability=prediction.risks[PRIMARY],
            cutoff=model.cutoff,
            model_name=MODEL_NAME,
            model_version=model.version,
            notice=model.notice,
            model_card=model_card(model.artefact.manifest, self.root),
            input_check=manifest_input_check(
                model.artefact.manifest,
                prediction.features.column_names,
                prediction.features.matrix()[0],
                series.reference,
            ),
            imputed=prediction.imputed,
            clinical_issues=tuple(
                issue
                for issue in case.clinical_issues
                if issue.variable in imputed or not issue.imputed
            ),
            scored_region=(0, 0),
            scored_reason=reason,
        )
        notes = [
            *segmented,
            f"scored lesion: {case.lesion.volume_ml:.1f} mL "
            f"(largest cross-section on frame {case.cnn_input.key_frame})",
            f"risk of {OUTCOME}: {risk.probability:.3f} "
            f"({'high' if risk.high_risk else 'low'} at cut-off {risk.cutoff:.3f})",
            self._clinical_note(source, prediction.imputed),
            model.notice,
        ]
        record = (
            case_record(
                series, labels, case, model.radiomics_params, input_config_to_dict(model.cnn_input)
            )
            if cases_kept()
            else None
        )
        return replace(imaging, notes=notes, risk=risk, heatmaps=heatmaps, case_record=record)

    @charged_to("model")
    def _heatmaps(
        self, series: LoadedSeries, case: CaseFeatures, model: HtModel, high_risk: bool
    ) -> list[HeatMap]:
        """Grad-CAM of the CNN relative to no lesion (``pipelines.cnn.lesion_heat_maps``)
        for the class it leans to: evidence for the outcome when the risk is high, against
        it when low; on the scored lesion's frames only."""
        mask = case.lesion.frame_mask
        class_index, evidence = (POSITIVE, "for") if high_risk else (NEGATIVE, "against")
        return lesion_heat_maps(
            model.cnn,
            series.frame_hu,
            mask,
            frame_pixel_spacing(series, largest_frame(mask)),
            model.cnn_input,
            f"Grad-CAM relative to no lesion (EfficientNet-Lite0, fine-tuned), evidence "
            f"{evidence} {OUTCOME}",
            class_index,
            lesion="scored lesion",
            reach=self.heatmap_reach,
            layer=HEATMAP_LAYER,
        )

    @staticmethod
    def _clinical_note(source: str, imputed: tuple[str, ...]) -> str:
        """Where the clinical variables came from and which were imputed."""
        if not imputed:
            return f"{source}; nothing imputed"
        whole = set(TABLE_VARIABLES) <= set(imputed)
        what = "all table variables" if whole else ", ".join(imputed)
        return f"{source}; imputed with training medians/modes: {what}"
