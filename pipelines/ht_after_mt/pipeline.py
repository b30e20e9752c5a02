"""Pipeline ``ht_after_mt``: risk of haemorrhagic transformation after thrombectomy.

Read top to bottom in :meth:`HtAfterMtPipeline.run`: the configured lesion segmenter
(``[pipelines.ht_after_mt] segmenter``, default the threshold baseline
``hyperdense_regions``; any :class:`pipelines.contract.Segmenter`) labels the candidate
lesions (their segment, labelled with the segmenter's name, goes into the result); the
largest one is described by its radiomics, the fine-tuned CNN's features of its 2.5-D
crop and the clinical variables (header, and the clinical table of
``[pipelines.ht_after_mt] clinical_table``; missing, unreadable and implausible ones
imputed and listed with their reasons: the table fails open, an unreadable table never
removes the imaging results); the combined model of the configured (default: promoted)
version in the configured model store gives the probability, classified at its training
cut-off; Grad-CAM of the CNN on the lesion's largest cross-section and the frames two
below and above it gives the heat maps. The notes and the algorithm's provenance name
the segmenter that produced the scored region. The model is loaded and hash-checked
once, by :meth:`HtAfterMtPipeline.check` at start-up (a model or segmenter that fails
its checks there makes the pipeline unavailable: the node runs its default instead) or
on the first run.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import structlog
from pydicom.dataset import Dataset

from model_store.registry import STORE_ROOT, ModelStoreError, load_manifest, select_version
from pipelines.base import (
    Algorithm,
    HeatMap,
    PipelineResult,
    PipelineUnavailable,
    RiskPrediction,
    SegmentClass,
)
from pipelines.cnn import grad_cam, prepare_case
from pipelines.contract import OutputProfile, Segmenter
from pipelines.ht_after_mt.clinical import NO_TABLE
from pipelines.ht_after_mt.features import (
    TABLE_VARIABLES,
    CaseFeatures,
    ClinicalTable,
    ClinicalTableError,
    RowLookup,
    case_features,
)
from pipelines.ht_after_mt.model import MODEL_NAME, OUTCOME, PRIMARY, HtModel
from pipelines.hyperdense import HyperdenseThresholdPipeline
from pipelines.measure import measure_segment
from pipelines.registry import get_segmenter
from pipelines.retraining.card import model_card
from pipelines.retraining.ood import manifest_input_check
from pipelines.series import LoadedSeries
from pipelines.settings import PipelinesSettings

CLINICAL_TABLE_SETTING = "[pipelines.ht_after_mt] clinical_table"
HEATMAP_OFFSETS = (-2, 0, 2)  # key slices: the largest cross-section n and n-2, n+2

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
        heatmap_offsets: tuple[int, ...] = HEATMAP_OFFSETS,
        segmenter: Segmenter | None = None,
    ) -> None:
        """Use ``version`` (default: the promoted one) of the model in ``root``.

        ``clinical_table`` (CSV or JSON): where the clinical variables come from; without
        one, every table variable is imputed. ``segmenter`` finds the lesion that is
        scored (default: the threshold baseline). Only the manifest is read here.
        """
        self.version = version or select_version(MODEL_NAME, root)
        manifest = load_manifest(MODEL_NAME, self.version, root)
        self.root = root
        self.clinical_table = clinical_table
        self.heatmap_offsets = heatmap_offsets
        self.segmenter: Segmenter = segmenter or HyperdenseThresholdPipeline()
        seg = self.segmenter.algorithm
        self._lesion_class = SegmentClass(
            label=f"{self.segmenter.segment_class.label} by {self.segmenter.name}"[:64],
            category=self.segmenter.segment_class.category,
            property_type=self.segmenter.segment_class.property_type,
        )
        self._profile = OutputProfile(
            seg_title="HT RISK LESION SEG",
            sc_title="HT RISK SUMMARY",
            sr_title="HT RISK REPORT",
            saliency_title="SALIENCY GRAD-CAM HT RISK",
            segments=(self._lesion_class,),
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
        clinical table, and its segmenter built from that segmenter's own settings."""
        own = settings.ht_after_mt
        return cls(
            own.version,
            root=own.store_root,
            clinical_table=own.clinical_table,
            segmenter=get_segmenter(own.segmenter, settings),
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

    def run(self, series: LoadedSeries) -> PipelineResult:
        """Segment, describe the largest region of the segmenter, predict, explain."""
        model = self.model
        found, source = self._lookup(series.reference)
        labels = self.segmenter.segment(series)
        segment = measure_segment(series, self._lesion_class, *labels)
        seg = self.segmenter.algorithm
        segmented = [
            f"lesion segmenter {self.segmenter.name} ({seg.name} {seg.version}): "
            f"{len(segment.regions)} region(s) on the acquired frames"
        ]
        key_frame = segment.total.key_frame if segment.total else len(series.frames) // 2
        imaging = PipelineResult(self.algorithm, [segment], key_frame, segmented)
        if segment.total is None:
            notes = [
                *segmented,
                f"no lesion: no risk of {OUTCOME} computed (no hyperdense lesion found by "
                f"segmenter {self.segmenter.name})",
            ]
            return replace(imaging, notes=notes)
        case = case_features(
            series, found, self.segmenter, model.radiomics_params, model.cnn_input, labels
        )
        with self._lock:
            prediction = model.predict(str(series.reference.get("SeriesInstanceUID", "")), case)
            heatmaps = self._heatmaps(series, case, model)
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
        )
        notes = [
            *segmented,
            f"scored lesion: the largest region of segmenter {self.segmenter.name}, "
            f"{case.lesion.volume_ml:.1f} mL "
            f"(largest cross-section on frame {case.cnn_input.key_frame})",
            f"risk of {OUTCOME}: {risk.probability:.3f} "
            f"({'high' if risk.high_risk else 'low'} at cut-off {risk.cutoff:.3f})",
            self._clinical_note(source, prediction.imputed),
            model.notice,
        ]
        return replace(imaging, notes=notes, risk=risk, heatmaps=heatmaps)

    def _heatmaps(self, series: LoadedSeries, case: CaseFeatures, model: HtModel) -> list[HeatMap]:
        """Grad-CAM (positive class) on the key frame and the frames at ``heatmap_offsets``."""
        config = replace(model.cnn_input, sample_offsets=self.heatmap_offsets)
        inputs = prepare_case(series, case.lesion.frame_mask, config)
        label = "Grad-CAM (EfficientNet-Lite0, fine-tuned), evidence for " + OUTCOME
        maps = []
        for sample in range(len(inputs.sample_centres)):
            cam = grad_cam(model.cnn, inputs, sample=sample)
            maps.append(HeatMap(frame=cam.frame_index, heat=cam.heat_frame, label=label))
        return maps

    @staticmethod
    def _clinical_note(source: str, imputed: tuple[str, ...]) -> str:
        """Where the clinical variables came from and which were imputed."""
        if not imputed:
            return f"{source}; nothing imputed"
        whole = set(TABLE_VARIABLES) <= set(imputed)
        what = "all table variables" if whole else ", ".join(imputed)
        return f"{source}; imputed with training medians/modes: {what}"
