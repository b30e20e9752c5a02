"""Pipeline ``ich_expansion``: risk of haematoma expansion from the admission NCCT.

Read top to bottom in :meth:`IchExpansionPipeline.run`: the configured segmenter
(``[pipelines.ich_expansion] segmenter``, default ``hyperdense_regions``) labels the
haemorrhage (its regions together are the haematoma: SEG segment labelled with the
segmenter's name); the bundled haemorrhage-slice classifier confirms the haematoma
frames; the expansion network (frozen ImageNet EfficientNet-Lite0 with the trained
per-slice head) scores each, and nDL is their area-weighted mean; the clinical variables
(header and the clinical table of ``[pipelines.ich_expansion] clinical_table``; missing
and implausible ones imputed and listed: the table fails open) enter the forward-selected
clinical model; the integrated model (nDL + clinical) gives the probability, classified
at its training cut-off. The SR's haematoma group holds the planimetric volume, the
ABC/2 volume (0.523 x D1 x D2 x D3) and its diameters, nDL, the probability and the
category; Grad-CAM of the expansion network relative to no haematoma
(``pipelines.cnn.lesion_heat_maps``, the method every risk pipeline draws) on the
largest cross-section and the nearest scored haematoma frame within two on each side
gives the saliency SCs. Every object carries the model's notice ("trained on synthetic
data - not for clinical use").
"""

from __future__ import annotations

import threading
from pathlib import Path

import structlog
import torch
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from model_store.registry import STORE_ROOT, ModelStoreError, load_manifest, select_version
from pipelines.base import (
    Algorithm,
    HeatMap,
    PipelineError,
    PipelineResult,
    PipelineUnavailable,
    RiskMeasurement,
    RiskPrediction,
    SegmentClass,
)
from pipelines.cnn import HEATMAP_REACH, lesion_heat_maps
from pipelines.cnn.inputs import frame_pixel_spacing
from pipelines.contract import OutputProfile, Segmenter
from pipelines.ht_after_mt.clinical import NO_TABLE, ClinicalTable, ClinicalTableError, RowLookup
from pipelines.hyperdense import HyperdenseThresholdPipeline
from pipelines.ich_expansion.clinical import screen_clinical
from pipelines.ich_expansion.features import (
    CNN_INPUT,
    Haematoma,
    find_haematoma,
    scored_frame_mask,
)
from pipelines.ich_expansion.model import MODEL_NAME, OUTCOME, PRIMARY, ExpansionModel, Prediction
from pipelines.measure import measure_segment
from pipelines.registry import get_segmenter
from pipelines.series import LoadedSeries
from pipelines.settings import PipelinesSettings
from pipelines.slice_classifier.classifier import SliceClassifier, load_slice_classifier
from pipelines.stages import charged_to

CLINICAL_TABLE_SETTING = "[pipelines.ich_expansion] clinical_table"
HEATMAP_LAYER = "features._blocks.2"
"""Grad-CAM layer: Lite0's last stride-8 stage, 16 x 16 cells on the 128 px input.
Relative to no haematoma, every raw peak lay within 5 mm of the haematoma on 40 held-out
cases (``bench/gradcam_placement.py --pipeline ich_expansion``), 82% of the heat; plain
Grad-CAM at the head (the method before) 28%, with 42 of 104 maps empty."""
PRIVATE_SCHEME = "99DCMNODE"
UNIT_ML = CodedConcept("ml", "UCUM", "milliliter")
UNIT_MM = CodedConcept("mm", "UCUM", "millimeter")
UNIT_NONE = CodedConcept("1", "UCUM", "no units")
ABC2_METHOD = CodedConcept("ABC2", PRIVATE_SCHEME, "ABC/2 (0.523 x D1 x D2 x D3)")
PLANIMETRY = CodedConcept.from_code(codes.DCM.Planimetry)
CRANIOCAUDAL = CodedConcept("CCEXTENT", PRIVATE_SCHEME, "Craniocaudal extent (D3)")
NDL_CONCEPT = CodedConcept("NDL", PRIVATE_SCHEME, "Normalised DL expansion score (nDL)")
CLINICAL_RISK = CodedConcept("HECLIN", PRIVATE_SCHEME, "Clinical model expansion probability")
OUTCOME_CODE = CodedConcept("HAEMEXPANSION", PRIVATE_SCHEME, "haematoma expansion")

log = structlog.get_logger(__name__)


def ascii_notice(notice: str) -> str:
    """The model's notice in ASCII (its em dash as a hyphen), e.g. "trained on synthetic
    data - not for clinical use": the notice every output object carries."""
    return notice.replace("\u2014", "-").replace("\u2013", "-")


def expansion_measurements(haematoma: Haematoma, prediction: Prediction) -> list[RiskMeasurement]:
    """Planimetric and ABC/2 volumes, the ABC/2 diameters, nDL and the clinical model's risk."""
    d1, d2, d3 = haematoma.abc2_mm
    volume = CodedConcept.from_code(codes.SCT.Volume)
    return [
        RiskMeasurement(volume, haematoma.volume_ml, UNIT_ML, "Haematoma volume (planimetric)",
                        method=PLANIMETRY),
        RiskMeasurement(volume, haematoma.abc2_ml, UNIT_ML, "Haematoma volume (ABC/2)",
                        method=ABC2_METHOD),
        RiskMeasurement(CodedConcept.from_code(codes.SCT.LongAxis), d1, UNIT_MM, "ABC/2 D1"),
        RiskMeasurement(CodedConcept.from_code(codes.SCT.ShortAxis), d2, UNIT_MM, "ABC/2 D2"),
        RiskMeasurement(CRANIOCAUDAL, d3, UNIT_MM, "ABC/2 D3"),
        RiskMeasurement(NDL_CONCEPT, prediction.ndl, UNIT_NONE, "nDL"),
        RiskMeasurement(CLINICAL_RISK, 100.0 * prediction.risks["clinical"],
                        CodedConcept("%", "UCUM", "percent"), "Clinical model alone (%)"),
    ]  # fmt: skip


class IchExpansionPipeline:
    """Pipeline ``ich_expansion``: haematoma, nDL, integrated model, Grad-CAM."""

    name = "ich_expansion"

    def __init__(
        self,
        version: str | None = None,
        *,
        root: Path = STORE_ROOT,
        clinical_table: Path | None = None,
        segmenter: Segmenter | None = None,
        device: str = "cpu",
        heatmap_reach: int = HEATMAP_REACH,
    ) -> None:
        """Use ``version`` (default: promoted) of the model in ``root``; only the manifest
        is read here."""
        self.version = version or select_version(MODEL_NAME, root)
        manifest = load_manifest(MODEL_NAME, self.version, root)
        self.root = root
        self.clinical_table = clinical_table
        self.heatmap_reach = heatmap_reach
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        self.segmenter: Segmenter = segmenter or HyperdenseThresholdPipeline()
        found = self.segmenter.segment_class
        self._class = SegmentClass(
            f"Haematoma by {self.segmenter.name}"[:64], found.category, found.property_type
        )
        self._profile = OutputProfile(
            seg_title="ICH EXPANSION HAEMATOMA SEG",
            sc_title="ICH EXPANSION SUMMARY",
            sr_title="ICH EXPANSION REPORT",
            saliency_title="SALIENCY GRAD-CAM ICH EXPANSION",
            segments=(self._class,),
        )
        seg = self.segmenter.algorithm
        self._algorithm = Algorithm(
            name="dicomnode ICH expansion (nDL + clinical, integrated)",
            version=self.version,
            kind="trained risk model",
            provenance=f"model {MODEL_NAME} {self.version} ({PRIMARY}: nDL of frozen ImageNet "
            f"EfficientNet-Lite0 + slice classifier, forward-selected clinical), "
            f"{manifest['notice']}; training data sha256 "
            f"{str(manifest['training_data_hash'])[:16]}; haematoma segmenter "
            f"{self.segmenter.name} ({seg.name} {seg.version})",
            notice=ascii_notice(str(manifest["notice"])),
        )
        self._model: ExpansionModel | None = None
        self._classifier: SliceClassifier | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: PipelinesSettings) -> IchExpansionPipeline:
        """The model of ``[pipelines.ich_expansion]`` and its segmenter's own settings."""
        own = settings.ich_expansion
        return cls(
            own.version,
            root=own.store_root,
            clinical_table=own.clinical_table,
            segmenter=get_segmenter(own.segmenter, settings),
            device=own.device,
        )

    @property
    def profile(self) -> OutputProfile:
        """Haematoma SEG, summary SC, SR with the expansion risk, Grad-CAM SCs."""
        return self._profile

    @property
    def algorithm(self) -> Algorithm:
        """The identity written into every output."""
        return self._algorithm

    def _loaded(self) -> tuple[ExpansionModel, SliceClassifier]:
        """Model and slice classifier, loaded and hash-checked on first use."""
        with self._lock:
            if self._model is None:
                self._model = ExpansionModel.load(self.version, self.root)
                self._model.network.to(self.device)
            if self._classifier is None:
                self._classifier = load_slice_classifier()
            return self._model, self._classifier

    def check(self) -> None:
        """Load and verify the model, the slice classifier and the segmenter now."""
        try:
            self._loaded()
        except (ModelStoreError, OSError, ValueError) as exc:
            raise PipelineUnavailable(f"model {MODEL_NAME} {self.version} refused: {exc}") from exc
        try:
            self.segmenter.check()
        except PipelineUnavailable as exc:
            raise PipelineUnavailable(
                f"{MODEL_NAME}: its haematoma segmenter {self.segmenter.name} is unavailable: {exc}"
            ) from exc

    def _lookup(self, series: LoadedSeries) -> tuple[RowLookup, str]:
        """The study's table row (or why none) and where the variables came from."""
        path = self.clinical_table
        if path is None:
            return RowLookup(None, NO_TABLE), f"no clinical table (set {CLINICAL_TABLE_SETTING})"
        try:
            table = ClinicalTable.read(path, strict=False)
        except ClinicalTableError as exc:
            log.warning("clinical table unreadable; its variables are imputed",
                        table=str(path), reason=exc.reason)  # fmt: skip
            reason = f"clinical table unreadable: {exc.reason}"
            return RowLookup(None, reason), reason
        found = table.find_dataset(series.reference)
        if found.row is None:
            return found, f"{found.reason} ({table.source})"
        return found, f"clinical variables from {table.source}"

    def run(self, series: LoadedSeries) -> PipelineResult:
        """Segment the haematoma, score its frames, predict expansion, explain."""
        model, classifier = self._loaded()
        found, source = self._lookup(series)
        labels = self.segmenter.segment(series)
        seg = self.segmenter.algorithm
        try:
            haematoma = find_haematoma(series, self.segmenter, classifier, self._class, labels)
        except PipelineError as exc:
            empty = measure_segment(series, self._class, *labels)
            notes = [str(exc), model.notice]
            return PipelineResult(self.algorithm, [empty], len(series.frames) // 2, notes)
        clinical = screen_clinical(series.reference, found)
        with self._lock:
            prediction = model.predict(series, haematoma, clinical.values)
            heatmaps = self._heatmaps(series, haematoma, model)
        imputed = set(prediction.imputed)
        n_frames = len(haematoma.frames)
        risk = RiskPrediction(
            outcome=OUTCOME,
            probability=prediction.risks[PRIMARY],
            cutoff=model.cutoff,
            model_name=MODEL_NAME,
            model_version=model.version,
            notice=model.notice,
            imputed=prediction.imputed,
            clinical_issues=tuple(
                i for i in clinical.issues if i.variable in imputed or not i.imputed
            ),
            scored_region=(0, 0),
            scored_reason=f"the haematoma of segmenter {self.segmenter.name}; nDL over "
            f"{n_frames} haematoma frame(s) confirmed by the slice classifier",
            outcome_code=OUTCOME_CODE,
            measurements=expansion_measurements(haematoma, prediction),
        )
        notes = [
            f"haematoma segmenter {self.segmenter.name} ({seg.name} {seg.version}): "
            f"{len(haematoma.segment.regions)} region(s), {haematoma.volume_ml:.1f} mL "
            f"planimetric, {haematoma.abc2_ml:.1f} mL ABC/2",
            f"nDL {prediction.ndl:.3f} over {n_frames} frame(s)",
            f"risk of {OUTCOME}: {risk.probability:.3f} at cut-off {risk.cutoff:.3f}",
            source,
            model.notice,
        ]
        return PipelineResult(
            self.algorithm, [haematoma.segment], haematoma.key_frame, notes, risk, heatmaps
        )

    @charged_to("model")
    def _heatmaps(
        self, series: LoadedSeries, haematoma: Haematoma, model: ExpansionModel
    ) -> list[HeatMap]:
        """Grad-CAM of the expansion network relative to no haematoma (evidence for
        expansion) on the haematoma frames the model scores: the largest cross-section and
        the nearest scored frame within ``heatmap_reach`` on each side."""
        return lesion_heat_maps(
            model.network,
            series.frame_hu,
            scored_frame_mask(haematoma),
            frame_pixel_spacing(series, haematoma.key_frame),
            CNN_INPUT,
            f"Grad-CAM relative to no haematoma (EfficientNet-Lite0 ImageNet, expansion "
            f"head), evidence for {OUTCOME}",
            lesion="haematoma",
            reach=self.heatmap_reach,
            layer=HEATMAP_LAYER,
        )
