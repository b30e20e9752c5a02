"""Pipeline ``ais_prognosis_mri``: probability of a poor outcome (mRS 3-6) after acute
ischaemic stroke from one MRI study (Pei et al., Front Neurol 2025), study-level.

Read top to bottom in :meth:`AisPrognosisMriPipeline.run_study`: the study's series by
role (DWI b = 1000 and ADC required, FLAIR and T1 used when present) are resampled onto
the DWI grid (one frame of reference), N4-corrected and z-scored
(:mod:`.imaging`); the infarct ROI is the threshold ADC < 620e-6 mm2/s with DWI
hyperintensity; its radiomics (1 mm resampling, ``ais_prognosis_mri.yaml``), the 2.5-D
CNN's score (DWI slices n-2, n, n+2) and the clinical variables (NIHSS, ICH from the
clinical table of ``[pipelines.ais_prognosis_mri] clinical_table``; missing ones imputed
and listed) feed the CRD model, whose nomogram points per variable are reported.
Grad-CAM of the CNN relative to no infarct (``pipelines.cnn.lesion_heat_maps``, the
method every risk pipeline draws) on the ROI's largest slice and the nearest ROI slice
within two on each side gives the heat maps. Outputs (SEG of the ROI, SC, SR, Grad-CAM
SCs) are on the DWI series.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from model_store.registry import STORE_ROOT, ModelStoreError, load_manifest, select_version
from pipelines.ais_prognosis_mri.features import (
    CLINICAL_LABELS,
    CNN_INPUT,
    ClinicalLookup,
    clinical_lookup,
    cnn_input,
    radiomics_features,
    read_clinical_table,
)
from pipelines.ais_prognosis_mri.imaging import (
    OPTIONAL_ROLES,
    REQUIRED_ROLES,
    ROI_ALGORITHM,
    ROLE_DWI,
    PreparedStudy,
    prepare_study,
)
from pipelines.ais_prognosis_mri.model import (
    BACKBONE_TITLE,
    CRD_LABELS,
    CRD_VARIABLES,
    MODEL_NAME,
    OUTCOME,
    STUDY_BACKBONE,
    MriModel,
    Prediction,
)
from pipelines.base import (
    Algorithm,
    ClinicalIssue,
    HeatMap,
    PipelineError,
    PipelineResult,
    PipelineUnavailable,
    RegionMeasurements,
    RiskPrediction,
    SegmentClass,
    SegmentResult,
)
from pipelines.cnn import lesion_heat_maps
from pipelines.contract import OutputProfile
from pipelines.geometry import grid_to_frame_indices
from pipelines.measure import measure_segment
from pipelines.outputs.common import plain
from pipelines.series import LoadedSeries
from pipelines.settings import PipelinesSettings
from pipelines.stages import charged_to

HEATMAP_LAYER = "features.layer1"
"""Grad-CAM layer: the half-width ResNet-10's stride-4 stage, 12 x 12 cells (5 mm on the
60 mm crop). Relative to no infarct, 88% of raw peaks lay within 5 mm of the ROI on 40
held-out studies (``bench/gradcam_placement.py --pipeline ais_prognosis_mri``); at the
stride-8 ``layer2`` 83%; plain Grad-CAM at ``layer4`` (2 x 2 cells, the method before)
1%."""
POOR_PROGNOSIS = CodedConcept("170969009", "SCT", "Prognosis bad")
INFARCT_SEGMENT = SegmentClass(
    label="Infarct ROI (ADC/DWI threshold)",
    category=CodedConcept.from_code(codes.SCT.MorphologicallyAbnormalStructure),
    property_type=CodedConcept("55641003", "SCT", "Infarct"),
)
PROFILE = OutputProfile(
    seg_title="MRI INFARCT ROI SEG",
    sc_title="MRI PROGNOSIS SUMMARY",
    sr_title="MRI PROGNOSIS REPORT",
    saliency_title="SALIENCY GRAD-CAM MRI PROGNOSIS",
    segments=(INFARCT_SEGMENT,),
)


def without_hu(region: RegionMeasurements) -> RegionMeasurements:
    """An MR region's measurements: no Hounsfield units (NaN; the writers leave them out)."""
    return replace(region, hu_max=math.nan, hu_mean=math.nan)


@charged_to("segmentation")
def infarct_segment(study: PreparedStudy) -> SegmentResult:
    """The ROI's regions on the DWI frames, measured (volume, area; no HU on MR)."""
    segment = measure_segment(study.reference, INFARCT_SEGMENT, study.labels, study.count)
    return replace(
        segment,
        regions=[without_hu(r) for r in segment.regions],
        total=None if segment.total is None else without_hu(segment.total),
    )


def nomogram_line(prediction: Prediction) -> str:
    """The CRD nomogram: each variable's value and points, the total and its probability."""
    parts = [
        f"{CRD_LABELS[v]} {prediction.crd_inputs[v]:.2f} = {prediction.points[v]:.1f} pts"
        for v in CRD_VARIABLES
    ]
    return (
        f"Nomogram (CRD) points: {'; '.join(parts)}; total {prediction.total_points:.1f} pts "
        f"-> P({OUTCOME}) {prediction.probabilities['crd']:.3f}"
    )


class AisPrognosisMriPipeline:
    """Study-level pipeline ``ais_prognosis_mri`` (DWI, ADC, FLAIR, T1 of one study)."""

    name = "ais_prognosis_mri"
    required_roles = REQUIRED_ROLES
    optional_roles = OPTIONAL_ROLES
    reference_role = ROLE_DWI

    def __init__(
        self,
        version: str | None = None,
        *,
        root: Path = STORE_ROOT,
        clinical_table: Path | None = None,
        device: str = "cpu",
        radiomics_workers: int = 1,
    ) -> None:
        """Use ``version`` (default: the promoted one) of the model in ``root``; the
        clinical variables come from ``clinical_table`` (CSV), else are imputed.
        ``radiomics_workers``: the pool size of its radiomics extraction."""
        try:
            self.version = version or select_version(MODEL_NAME, root)
            manifest = load_manifest(MODEL_NAME, self.version, root)
        except ModelStoreError as exc:
            raise PipelineUnavailable(f"model {MODEL_NAME} unavailable: {exc}") from exc
        self.root = root
        self.clinical_table = clinical_table
        self.radiomics_workers = radiomics_workers
        self.device = torch.device(
            "cuda" if device == "auto" and torch.cuda.is_available() else
            ("cpu" if device == "auto" else device)
        )  # fmt: skip
        self._model: MriModel | None = None
        self._lock = threading.Lock()
        self._algorithm = Algorithm(
            name="dicomnode AIS prognosis MRI (clinical+radiomics+DL)",
            version=self.version,
            kind="trained risk model",
            provenance=f"model {MODEL_NAME} {self.version} (CRD logistic, 2.5-D {BACKBONE_TITLE} "
            f"CNN; study: {STUDY_BACKBONE}), {manifest['notice']}; infarct ROI: {ROI_ALGORITHM}",
            notice=plain(str(manifest["notice"])),  # every object, the SEG's description too
        )

    @classmethod
    def from_settings(cls, settings: PipelinesSettings) -> AisPrognosisMriPipeline:
        """The pipeline of ``[pipelines.ais_prognosis_mri]``, extracting with the pool
        size of ``[pipelines.radiomics]``."""
        own = settings.ais_prognosis_mri
        return cls(
            own.version, root=own.store_root, clinical_table=own.clinical_table,
            device=own.device, radiomics_workers=settings.radiomics.workers,
        )  # fmt: skip

    @property
    def algorithm(self) -> Algorithm:
        """The identity written into every output."""
        return self._algorithm

    @property
    def profile(self) -> OutputProfile:
        """SEG of the infarct ROI, summary SC, SR with the prognosis, Grad-CAM SCs."""
        return PROFILE

    @property
    def model(self) -> MriModel:
        """The model version, loaded and hash-checked on first use."""
        with self._lock:
            if self._model is None:
                self._model = MriModel.load(self.version, self.root)
                self._model.cnn.to(self.device)
            return self._model

    def check(self) -> None:
        """Load and verify the model now; ``PipelineUnavailable`` saying what is wrong."""
        try:
            _ = self.model
        except ModelStoreError as exc:
            raise PipelineUnavailable(f"model {MODEL_NAME} {self.version} refused: {exc}") from exc

    def run(self, series: LoadedSeries) -> PipelineResult:
        """A single series is not a study: refuse, saying how to route one."""
        raise PipelineError(
            f"{self.name} is a study-level pipeline: route its MRI study with a rule of "
            'level = "study" and roles dwi, adc (flair, t1 optional)'
        )

    def _clinical(self, study: PreparedStudy) -> ClinicalLookup:
        """The study's NIHSS and ICH from the clinical table, or why they are missing."""
        table = None if self.clinical_table is None else read_clinical_table(self.clinical_table)
        return clinical_lookup(table, study.reference.reference)

    def run_study(self, series_by_role: Mapping[str, LoadedSeries]) -> PipelineResult:
        """Prepare, segment, describe, predict and explain one MRI study."""
        model = self.model
        study = prepare_study(series_by_role)
        segment = infarct_segment(study)
        used = ", ".join(r for r in (*REQUIRED_ROLES, *OPTIONAL_ROLES) if r in series_by_role)
        notes = [
            f"series used: {used}; resampled onto the DWI grid (same frame of reference), "
            "N4 bias-corrected, z-scored",
            f"infarct ROI: {ROI_ALGORITHM}, {len(segment.regions)} region(s)",
        ]
        key_frame = segment.total.key_frame if segment.total else len(study.reference.frames) // 2
        result = PipelineResult(self.algorithm, [segment], key_frame, notes)
        if segment.total is None:
            return replace(result, notes=[*notes, f"no infarct ROI: no probability of {OUTCOME}"])
        found = self._clinical(study)
        case = cnn_input(study)
        radiomics = radiomics_features(study, self.radiomics_workers)
        with self._lock:
            prediction = model.predict(found.values, radiomics, case)
            heatmaps = self._heatmaps(study, model)
        issues = tuple(
            ClinicalIssue(name, found.reasons.get(name, "missing")) for name in prediction.imputed
        )
        probabilities = prediction.probabilities
        risk = RiskPrediction(
            outcome=OUTCOME,
            probability=probabilities["crd"],
            cutoff=model.cutoff,
            model_name=MODEL_NAME,
            model_version=model.version,
            notice=model.notice,
            imputed=prediction.imputed,
            clinical_issues=issues,
            scored_region=(0, 0),
            scored_reason="the infarct ROI (all its regions) gives the radiomics and CNN input",
            outcome_code=POOR_PROGNOSIS,
            explanation=(
                nomogram_line(prediction),
                "Single-source models: "
                + "; ".join(
                    f"{name} {probabilities[name]:.3f}" for name in ("clinical", "radiomics", "dl")
                ),
                "Clinical variables: "
                + "; ".join(
                    f"{CLINICAL_LABELS[v]} {prediction.crd_inputs[v]:g}"
                    + (" (imputed)" if v in prediction.imputed else "")
                    for v in ("nihss", "ich")
                ),
            ),
        )
        return replace(result, notes=[*notes, nomogram_line(prediction)], risk=risk,
                       heatmaps=heatmaps)  # fmt: skip

    @charged_to("model")
    def _heatmaps(self, study: PreparedStudy, model: MriModel) -> list[HeatMap]:
        """Grad-CAM relative to no infarct (evidence for a poor outcome) on the ROI's
        largest slice and its nearest ROI slices, on the DWI frames lying on them."""
        maps = lesion_heat_maps(
            model.cnn,
            study.zscored[ROLE_DWI],
            study.roi,
            (study.spacing[1], study.spacing[2]),
            CNN_INPUT,
            f"Grad-CAM relative to no infarct (2.5-D {BACKBONE_TITLE}), evidence for {OUTCOME}",
            lesion="infarct ROI",
            layer=HEATMAP_LAYER,
        )
        series = study.reference
        to_frame = self._slice_to_frame(series)
        return [
            replace(heatmap, frame=to_frame[heatmap.frame])
            for heatmap in maps
            if heatmap.frame in to_frame and heatmap.heat.shape == series.frame_hu.shape[1:]
        ]

    @staticmethod
    def _slice_to_frame(series: LoadedSeries) -> dict[int, int]:
        """DWI volume slice -> the acquired frame on it (frames on the grid's planes)."""
        index = grid_to_frame_indices(series.stack, series.grid)
        return {int(row[0]): frame for frame, row in enumerate(index) if np.all(row[1:] == 0)}
