"""Pipeline ``ich_expansion_hybrid``: haematoma expansion from automatic segmentation,
radiomics and frozen CNN features (Lu et al. 2024).

Read top to bottom in :meth:`IchExpansionHybridPipeline.run`: the configured segmenter
(``[pipelines.ich_expansion_hybrid] segmenter``; BLAST-CT where its weights are) gives
the haematoma (its largest region: SEG segment labelled with the segmenter's name); its
radiomics with the study's filter set and the frozen EfficientNet-Lite0 features of its
largest slice and the slices +-3 feed the stored models; the combined model (sequential
forward selection, SVM) gives the probability, classified at its training cut-off; the
SR's haematoma group holds the probability, the category, the radiomics-only and
CNN-only probabilities and the features that drove the combined one (each feature's
contribution: the probability change when it alone is set to its training mean). Every
object names the CNN weights used and carries the model's notice.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from highdicom.sr import CodedConcept

from model_store.registry import STORE_ROOT, ModelStoreError, load_manifest, select_version
from pipelines.base import (
    Algorithm,
    PipelineError,
    PipelineResult,
    PipelineUnavailable,
    RiskMeasurement,
    RiskPrediction,
    SegmentClass,
)
from pipelines.cnn import CnnClassifier
from pipelines.contract import OutputProfile, Segmenter, Writer
from pipelines.hyperdense import HyperdenseThresholdPipeline
from pipelines.ich_expansion.pipeline import OUTCOME_CODE, PRIVATE_SCHEME, ascii_notice
from pipelines.ich_expansion_hybrid.features import (
    PACKAGED_WEIGHTS,
    feature_row,
    frozen_backbone,
    hybrid_features,
)
from pipelines.ich_expansion_hybrid.model import MODEL_NAME, OUTCOME, PRIMARY, HybridModel
from pipelines.measure import measure_segment
from pipelines.registry import get_segmenter
from pipelines.series import LoadedSeries
from pipelines.settings import PipelinesSettings

UNIT_PERCENT = CodedConcept("%", "UCUM", "percent")
RADIOMICS_RISK = CodedConcept("HERAD", PRIVATE_SCHEME, "Radiomics model expansion probability")
CNN_RISK = CodedConcept("HECNN", PRIVATE_SCHEME, "CNN model expansion probability")
WRITERS = frozenset({Writer.SEG, Writer.SC, Writer.SR})


def contribution_concept(rank: int, feature: str) -> CodedConcept:
    """The coded name of the ``rank``-th contribution (a private 99DCMNODE concept)."""
    return CodedConcept(f"HECONTRIB{rank}", PRIVATE_SCHEME, f"Contribution: {feature}"[:64])


def algorithm_name(cnn_weights: Path | None) -> str:
    """The algorithm's name, naming the CNN weights (SEG, SC and SR carry it)."""
    tag = "Lite0 ImageNet packaged" if cnn_weights is None else f"Lite0 {cnn_weights.stem}"
    return f"dicomnode ICH expansion hybrid (CNN: {tag})"[:64]


class IchExpansionHybridPipeline:
    """Pipeline ``ich_expansion_hybrid``: segmentation, radiomics + CNN, SVM."""

    name = "ich_expansion_hybrid"

    def __init__(
        self,
        version: str | None = None,
        *,
        root: Path = STORE_ROOT,
        segmenter: Segmenter | None = None,
        cnn_weights: Path | None = None,
        device: str = "cpu",
        radiomics_workers: int = 1,
    ) -> None:
        """Use ``version`` (default: promoted) of the model in ``root``; only the manifest
        is read here. ``cnn_weights``: a safetensors Lite0 backbone (default: the
        packaged ImageNet weights); ``radiomics_workers``: the pool size of its radiomics
        extraction."""
        self.version = version or select_version(MODEL_NAME, root)
        manifest = load_manifest(MODEL_NAME, self.version, root)
        self.root = root
        self.cnn_weights = cnn_weights
        self.radiomics_workers = radiomics_workers
        self.trained_weights = str(manifest.get("cnn", {}).get("weights", PACKAGED_WEIGHTS))
        self.weights_name = (
            PACKAGED_WEIGHTS
            if cnn_weights is None
            else f"EfficientNet-Lite0 weights from {cnn_weights.name}"
        )
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        self.segmenter: Segmenter = segmenter or HyperdenseThresholdPipeline()
        found = self.segmenter.segment_class
        self._class = SegmentClass(
            f"Haematoma by {self.segmenter.name}"[:64], found.category, found.property_type
        )
        self._profile = OutputProfile(
            seg_title="ICH EXPANSION HYBRID HAEMATOMA SEG",
            sc_title="ICH EXPANSION HYBRID SUMMARY",
            sr_title="ICH EXPANSION HYBRID REPORT",
            saliency_title="SALIENCY ICH EXPANSION HYBRID",
            segments=(self._class,),
            writers=WRITERS,
        )
        seg = self.segmenter.algorithm
        self._algorithm = Algorithm(
            name=algorithm_name(cnn_weights),
            version=self.version,
            kind="trained risk model",
            provenance=f"model {MODEL_NAME} {self.version} ({PRIMARY}: study radiomics + "
            f"frozen CNN features, forward selection, SVM); CNN weights: {self.weights_name}; "
            f"{manifest['notice']}; haematoma segmenter {self.segmenter.name} "
            f"({seg.name} {seg.version})",
            notice=ascii_notice(str(manifest["notice"])),
        )
        self._model: HybridModel | None = None
        self._network: CnnClassifier | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: PipelinesSettings) -> IchExpansionHybridPipeline:
        """The model of ``[pipelines.ich_expansion_hybrid]`` and its segmenter, extracting
        with the pool size of ``[pipelines.radiomics]``."""
        own = settings.ich_expansion_hybrid
        return cls(
            own.version,
            root=own.store_root,
            segmenter=get_segmenter(own.segmenter, settings),
            cnn_weights=own.cnn_weights,
            device=own.device,
            radiomics_workers=settings.radiomics.workers,
        )

    @property
    def profile(self) -> OutputProfile:
        """Haematoma SEG, summary SC and SR with the probability and its drivers."""
        return self._profile

    @property
    def algorithm(self) -> Algorithm:
        """The identity written into every output."""
        return self._algorithm

    def _loaded(self) -> tuple[HybridModel, CnnClassifier]:
        """Model and feature network, loaded and checked on first use."""
        with self._lock:
            if self._model is None:
                if self.weights_name != self.trained_weights:
                    raise ModelStoreError(
                        f"the model was trained on features of {self.trained_weights}, not "
                        f"{self.weights_name}: retrain it with these weights"
                    )
                self._model = HybridModel.load(self.version, self.root)
            if self._network is None:
                network, _ = frozen_backbone(self.cnn_weights)
                self._network = network.to(self.device)
            return self._model, self._network

    def check(self) -> None:
        """Load and verify the model, the CNN weights and the segmenter now."""
        try:
            self._loaded()
        except (ModelStoreError, OSError, ValueError, ImportError) as exc:
            raise PipelineUnavailable(f"model {MODEL_NAME} {self.version} refused: {exc}") from exc
        try:
            self.segmenter.check()
        except PipelineUnavailable as exc:
            raise PipelineUnavailable(
                f"{MODEL_NAME}: its haematoma segmenter {self.segmenter.name} is unavailable: {exc}"
            ) from exc

    def run(self, series: LoadedSeries) -> PipelineResult:
        """Segment, describe, predict and name the features that drove the prediction."""
        model, network = self._loaded()
        labels = self.segmenter.segment(series)
        try:
            with self._lock:
                described = hybrid_features(
                    series, self.segmenter, network, labels, self.radiomics_workers
                )
        except PipelineError as exc:
            empty = measure_segment(series, self._class, *labels)
            notes = [str(exc), model.notice]
            return PipelineResult(self.algorithm, [empty], len(series.frames) // 2, notes)
        segment = measure_segment(
            series, self._class, described.lesion.grid_mask.astype("int32"), 1
        )
        prediction = model.predict(feature_row(described))
        measurements = [
            RiskMeasurement(RADIOMICS_RISK, 100.0 * prediction.risks["radiomics"], UNIT_PERCENT,
                            "Radiomics model alone (%)"),
            RiskMeasurement(CNN_RISK, 100.0 * prediction.risks["cnn"], UNIT_PERCENT,
                            "CNN model alone (%)"),
        ]  # fmt: skip
        for rank, item in enumerate(prediction.contributions, start=1):
            measurements.append(
                RiskMeasurement(
                    contribution_concept(rank, item.feature),
                    100.0 * item.delta,
                    UNIT_PERCENT,
                    f"Driver {rank}: {item.feature} = {item.value:.4g}, contribution (points)",
                )
            )
        risk = RiskPrediction(
            outcome=OUTCOME,
            probability=prediction.risks[PRIMARY],
            cutoff=model.cutoff,
            model_name=MODEL_NAME,
            model_version=model.version,
            notice=model.notice,
            scored_region=(0, 0),
            scored_reason=f"the largest haemorrhage of segmenter {self.segmenter.name}; CNN "
            f"weights: {self.weights_name}",
            outcome_code=OUTCOME_CODE,
            measurements=measurements,
        )
        key = segment.total.key_frame if segment.total else len(series.frames) // 2
        notes = [
            f"haematoma: {described.lesion.volume_ml:.1f} mL by {self.segmenter.name}",
            f"risk of {OUTCOME}: {risk.probability:.3f} at cut-off {risk.cutoff:.3f}",
            "drivers: "
            + ", ".join(f"{c.feature} ({100 * c.delta:+.1f})" for c in prediction.contributions),
            f"CNN weights: {self.weights_name}",
            model.notice,
        ]
        return PipelineResult(self.algorithm, [segment], key, notes, risk)
