"""Pipeline ``iph_vs_contrast``: every intraparenchymal hyperdense area of a
post-thrombectomy NCCT classified as haemorrhage or contrast staining by its Rad-score.

Read top to bottom in :meth:`IphVsContrastPipeline.run`: the configured segmenter
(``[pipelines.iph_vs_contrast] segmenter``, default the threshold baseline
``hyperdense_regions``, whose regions never include calcification) labels the
hyperdense areas; each area that an acquired frame crosses is measured on the frames
(volume, HUmax, mean HU), described by its radiomics (the model's parameter file) and
given the Rad-score of the configured (default: promoted) model version, its
probability of haemorrhage (sigmoid of the Rad-score) and its class at the model's
Youden cut-off. The result holds one segment class per outcome, haemorrhage (SCT
50960005 Hemorrhage) and contrast staining (DCM 111428 Extravasation), with one region
per area (so the SEG has one segment per area, coded by its class) and one
:class:`pipelines.base.RegionClassification` per area (Rad-score, cut-off, probability:
the SR's measurement group of the area, the SC's legend lines). An area whose radiomics
cannot be computed (too small) goes into a third class, "Hyperdense area, not
classified", with the reason in the notes. The model is loaded and hash-checked once,
by :meth:`IphVsContrastPipeline.check` at start-up or on the first run.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from model_store.registry import STORE_ROOT, ModelStoreError, load_manifest, select_version
from pipelines.base import (
    Algorithm,
    PipelineError,
    PipelineResult,
    PipelineUnavailable,
    RegionClassification,
    SegmentClass,
    SegmentResult,
)
from pipelines.contract import OutputProfile, Segmenter, Writer
from pipelines.hyperdense import HyperdenseThresholdPipeline
from pipelines.iph_vs_contrast.features import Area, area_radiomics, find_areas, frame_geometry
from pipelines.iph_vs_contrast.model import MODEL_NAME, OUTCOME, AreaVerdict, IphModel
from pipelines.measure import measure_region
from pipelines.registry import get_segmenter
from pipelines.series import LoadedSeries, label_dtype
from pipelines.settings import PipelinesSettings

ABNORMAL = CodedConcept.from_code(codes.SCT.MorphologicallyAbnormalStructure)
HAEMORRHAGE_CLASS = SegmentClass(
    label="Haemorrhage",
    category=ABNORMAL,
    property_type=CodedConcept.from_code(codes.SCT.Hemorrhage),  # SCT 50960005
)
CONTRAST_CLASS = SegmentClass(
    label="Contrast staining",
    category=ABNORMAL,
    # DCM 111428 Extravasation: "leakage of fluid (e.g. contrast) out of its container",
    # the iodinated contrast that left the vessels; SNOMED CT's "contrast media" codes
    # name the substance or an allergy, not this finding.
    property_type=CodedConcept.from_code(codes.DCM.Extravasation),
)
UNCLASSIFIED_CLASS = SegmentClass(
    label="Hyperdense area, not classified",
    category=ABNORMAL,
    property_type=CodedConcept.from_code(codes.SCT.Lesion),
)
IPH_PROFILE_TITLES = {
    "seg_title": "IPH VS CONTRAST SEG",
    "sc_title": "IPH VS CONTRAST SUMMARY",
    "sr_title": "IPH VS CONTRAST REPORT",
    "saliency_title": "SALIENCY",
}
SCORE_NAME = "Rad-score"
POSITIVE_CODE = CodedConcept.from_code(codes.SCT.Hemorrhage)


def class_segment(
    series: LoadedSeries, segment: SegmentClass, areas: Sequence[Area]
) -> SegmentResult:
    """One class's segment: its areas as regions (in the order given), their union and
    total, and the frame labels that keep each area its own SEG segment."""
    shape = series.frame_hu.shape
    union = np.zeros(shape, dtype=bool)
    labels = np.zeros(shape, dtype=label_dtype(len(areas)))
    for k, area in enumerate(areas, start=1):
        labels[area.frame_mask & (labels == 0)] = k
        union |= area.frame_mask
    pixel_area, thickness = frame_geometry(series)
    total = measure_region(union, series.frame_hu, pixel_area, thickness) if areas else None
    return SegmentResult(
        segment=segment,
        frame_mask=union,
        regions=[a.measurements for a in areas],
        total=total,
        region_labels=labels,
    )


class IphVsContrastPipeline:
    """Pipeline ``iph_vs_contrast``: hyperdense areas classified by a Rad-score."""

    name = "iph_vs_contrast"

    def __init__(
        self,
        version: str | None = None,
        *,
        root: Path = STORE_ROOT,
        segmenter: Segmenter | None = None,
        radiomics_workers: int = 1,
    ) -> None:
        """Use ``version`` (default: the promoted one) of the model in ``root``, on the
        areas of ``segmenter`` (default: the threshold baseline); ``radiomics_workers``:
        the pool size of each area's radiomics extraction. Only the manifest is read here."""
        self.version = version or select_version(MODEL_NAME, root)
        manifest = load_manifest(MODEL_NAME, self.version, root)
        self.root = root
        self.radiomics_workers = radiomics_workers
        self.segmenter: Segmenter = segmenter or HyperdenseThresholdPipeline()
        self._model: IphModel | None = None
        self._lock = threading.Lock()
        seg = self.segmenter.algorithm
        self._profile = OutputProfile(
            **IPH_PROFILE_TITLES,
            segments=(HAEMORRHAGE_CLASS, CONTRAST_CLASS, UNCLASSIFIED_CLASS),
            writers=frozenset({Writer.SEG, Writer.SC, Writer.SR}),
        )
        notice = str(manifest["notice"]).replace("\u2014", "-")
        self._algorithm = Algorithm(
            name="dicomnode IPH vs contrast staining (Rad-score)",
            version=self.version,
            kind="trained classification model",
            provenance=f"model {MODEL_NAME} {self.version} (ICC > 0.80, mRMR, LASSO "
            f"logistic Rad-score), {notice}; training data sha256 "
            f"{str(manifest['training_data_hash'])[:16]}; area segmenter "
            f"{self.segmenter.name} ({seg.name} {seg.version})",
            notice=notice,
        )

    @classmethod
    def from_settings(cls, settings: PipelinesSettings) -> IphVsContrastPipeline:
        """The classifier of ``[pipelines.iph_vs_contrast]``: model store folder and
        version, and its segmenter built from that segmenter's own settings; extracting
        with the pool size of ``[pipelines.radiomics]``."""
        own = settings.iph_vs_contrast
        return cls(
            own.version,
            root=own.store_root,
            segmenter=get_segmenter(own.segmenter, settings),
            radiomics_workers=settings.radiomics.workers,
        )

    @property
    def profile(self) -> OutputProfile:
        """SEG (one segment per area, coded haemorrhage or contrast staining), summary
        SC with the areas coloured by class, SR with one group per area."""
        return self._profile

    @property
    def algorithm(self) -> Algorithm:
        """The identity written into every output."""
        return self._algorithm

    @property
    def model(self) -> IphModel:
        """The model version, loaded and hash-checked on first use."""
        with self._lock:
            if self._model is None:
                self._model = IphModel.load(self.version, self.root)
            return self._model

    def check(self) -> None:
        """Load and verify the model (manifest, sha256 of every file, radiomics
        parameters) and the segmenter's artefacts; ``PipelineUnavailable`` otherwise."""
        try:
            _ = self.model
        except ModelStoreError as exc:
            raise PipelineUnavailable(f"model {MODEL_NAME} {self.version} refused: {exc}") from exc
        try:
            self.segmenter.check()
        except PipelineUnavailable as exc:
            raise PipelineUnavailable(
                f"{MODEL_NAME}: its area segmenter {self.segmenter.name} is unavailable: {exc}"
            ) from exc

    def run(self, series: LoadedSeries) -> PipelineResult:
        """Find the areas, classify each, and return them by class."""
        model = self.model
        areas = find_areas(series, self.segmenter)
        verdicts: list[AreaVerdict | None] = []
        unmeasured: list[str] = []
        for k, area in enumerate(areas, start=1):
            try:
                radiomics = area_radiomics(
                    series, area.grid_mask, model.radiomics_params, self.radiomics_workers
                )
                verdicts.append(model.classify(radiomics))
            except PipelineError as exc:
                verdicts.append(None)
                unmeasured.append(f"area {k} ({area.measurements.volume_ml:.2f} mL): {exc}")
        by_class: dict[int, list[tuple[Area, AreaVerdict | None]]] = {0: [], 1: [], 2: []}
        for area, verdict in zip(areas, verdicts, strict=True):
            index = 2 if verdict is None else 0 if verdict.haemorrhage else 1
            by_class[index].append((area, verdict))
        classes = [HAEMORRHAGE_CLASS, CONTRAST_CLASS, UNCLASSIFIED_CLASS]
        kept = [0, 1, 2] if by_class[2] else [0, 1]
        segments = [class_segment(series, classes[i], [a for a, _ in by_class[i]]) for i in kept]
        classifications = [
            self._classification((class_index, region_index), verdict, model)
            for class_index in (0, 1)
            for region_index, (_, verdict) in enumerate(by_class[class_index])
            if verdict is not None
        ]
        key_frame = areas[0].measurements.key_frame if areas else len(series.frames) // 2
        seg = self.segmenter.algorithm
        notes = [
            f"area segmenter {self.segmenter.name} ({seg.name} {seg.version}): "
            f"{len(areas)} hyperdense area(s) on the acquired frames (calcification is "
            "never classified)",
            f"{len(by_class[0])} classified haemorrhage, {len(by_class[1])} contrast "
            f"staining at the Rad-score cut-off {model.score_cutoff:.3f} (probability "
            f"{model.cutoff:.3f})",
            *(f"not classified: {reason}" for reason in unmeasured),
            model.notice.replace("\u2014", "-"),
        ]
        return PipelineResult(
            self.algorithm, segments, key_frame, notes, classifications=classifications
        )

    @staticmethod
    def _classification(
        region: tuple[int, int], verdict: AreaVerdict, model: IphModel
    ) -> RegionClassification:
        """The SR/SC record of one area's verdict."""
        return RegionClassification(
            region=region,
            score_name=SCORE_NAME,
            score=verdict.rad_score,
            score_cutoff=model.score_cutoff,
            probability=verdict.probability,
            positive=OUTCOME,
            model_name=MODEL_NAME,
            model_version=model.version,
            notice=model.notice,
            positive_code=POSITIVE_CODE,
        )
