"""Pipeline ``ht_after_mt``: risk of haemorrhagic transformation after thrombectomy.

Read top to bottom in :meth:`HtAfterMtPipeline.run`: the threshold baseline segments the
hyperdense regions (its segment goes into the result, as in ``hyperdense_regions``); the
largest one is described by its radiomics, the fine-tuned CNN's features of its 2.5-D
crop and the clinical variables (header, and the clinical table named by
``DICOMNODE_CLINICAL_TABLE`` or the constructor; missing ones imputed and listed); the
combined model of the promoted version gives the probability, classified at its
training cut-off; Grad-CAM of the CNN on the lesion's largest cross-section and the
frames two below and above it gives the heat maps. The model is loaded and hash-checked
once, on the first run.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path

from model_store.registry import STORE_ROOT, load_manifest, select_version
from pipelines.base import Algorithm, HeatMap, PipelineError, PipelineResult, RiskPrediction
from pipelines.cnn import grad_cam, prepare_case
from pipelines.ht_after_mt.features import (
    TABLE_VARIABLES,
    CaseFeatures,
    ClinicalTable,
    ClinicalTableError,
    case_features,
)
from pipelines.ht_after_mt.model import MODEL_NAME, OUTCOME, PRIMARY, HtModel
from pipelines.hyperdense import HyperdenseThresholdPipeline
from pipelines.series import LoadedSeries

CLINICAL_TABLE_ENV = "DICOMNODE_CLINICAL_TABLE"
HEATMAP_OFFSETS = (-2, 0, 2)  # key slices: the largest cross-section n and n-2, n+2


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
    ) -> None:
        """Use ``version`` (default: the promoted one) of the model in ``root``.

        ``clinical_table`` (CSV or JSON) overrides ``$DICOMNODE_CLINICAL_TABLE``; with
        neither, every table variable is imputed. Only the manifest is read here.
        """
        self.version = version or select_version(MODEL_NAME, root)
        manifest = load_manifest(MODEL_NAME, self.version, root)
        self.root = root
        self.clinical_table = clinical_table
        self.heatmap_offsets = heatmap_offsets
        self.baseline = HyperdenseThresholdPipeline()
        self._model: HtModel | None = None
        self._lock = threading.Lock()
        self._algorithm = Algorithm(
            name="dicomnode HT risk after thrombectomy (clinical+radiomics+CNN)",
            version=self.version,
            kind="trained risk model",
            provenance=f"model {MODEL_NAME} {self.version} ({PRIMARY} variant, "
            f"EfficientNet-Lite0 CNN), {manifest['notice']}; training data sha256 "
            f"{str(manifest['training_data_hash'])[:16]}",
        )

    @property
    def algorithm(self) -> Algorithm:
        """The identity written into every output."""
        return self._algorithm

    @property
    def model(self) -> HtModel:
        """The model version, loaded and hash-checked on first use."""
        with self._lock:
            if self._model is None:
                self._model = HtModel.load(self.version, self.root)
            return self._model

    def _table(self) -> ClinicalTable | None:
        """The clinical table of the constructor, else of the environment; None if neither."""
        path = self.clinical_table or os.environ.get(CLINICAL_TABLE_ENV)
        if not path:
            return None
        try:
            return ClinicalTable.read(Path(path))
        except ClinicalTableError as exc:
            raise PipelineError(f"clinical table: {exc}") from exc

    def run(self, series: LoadedSeries) -> PipelineResult:
        """Segment, describe the largest hyperdense region, predict, explain."""
        model = self.model
        table = self._table()
        row = table.lookup_dataset(series.reference) if table is not None else None
        labels = self.baseline.segment(series)
        baseline = self.baseline.run(series, labels)
        if baseline.segments[0].total is None:
            notes = [*baseline.notes, f"no hyperdense lesion: no risk of {OUTCOME} computed"]
            return replace(baseline, algorithm=self.algorithm, notes=notes)
        try:
            case = case_features(
                series, row, self.baseline, model.radiomics_params, model.cnn_input, labels
            )
        except ClinicalTableError as exc:
            raise PipelineError(f"clinical table: {exc}") from exc
        with self._lock:
            prediction = model.predict(str(series.reference.get("SeriesInstanceUID", "")), case)
            heatmaps = self._heatmaps(series, case, model)
        risk = RiskPrediction(
            outcome=OUTCOME,
            probability=prediction.risks[PRIMARY],
            cutoff=model.cutoff,
            model_name=MODEL_NAME,
            model_version=model.version,
            notice=model.notice,
            imputed=prediction.imputed,
        )
        notes = [
            *baseline.notes,
            f"scored lesion: the largest hyperdense region, {case.lesion.volume_ml:.1f} mL "
            f"(largest cross-section on frame {case.cnn_input.key_frame})",
            f"risk of {OUTCOME}: {risk.probability:.3f} "
            f"({'high' if risk.high_risk else 'low'} at cut-off {risk.cutoff:.3f})",
            self._clinical_note(table, row, prediction.imputed),
            model.notice,
        ]
        return replace(
            baseline, algorithm=self.algorithm, notes=notes, risk=risk, heatmaps=heatmaps
        )

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
    def _clinical_note(
        table: ClinicalTable | None, row: object | None, imputed: tuple[str, ...]
    ) -> str:
        """Where the clinical variables came from and which were imputed."""
        if table is None:
            source = f"no clinical table (set {CLINICAL_TABLE_ENV})"
        elif row is None:
            source = f"no row for this study in {table.source}"
        else:
            source = f"clinical variables from {table.source}"
        if not imputed:
            return f"{source}; nothing imputed"
        whole = set(TABLE_VARIABLES) <= set(imputed)
        what = "all table variables" if whole else ", ".join(imputed)
        return f"{source}; imputed with training medians/modes: {what}"
