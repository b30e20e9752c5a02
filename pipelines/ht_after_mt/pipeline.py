"""Pipeline ``ht_after_mt``: risk of haemorrhagic transformation after thrombectomy.

Read top to bottom in :meth:`HtAfterMtPipeline.run`: the threshold baseline segments the
hyperdense regions (its segment goes into the result, as in ``hyperdense_regions``); the
largest one is described by its radiomics, the fine-tuned CNN's features of its 2.5-D
crop and the clinical variables (header, and the clinical table named by
``DICOMNODE_CLINICAL_TABLE`` or the constructor; missing, unreadable and implausible
ones imputed and listed with their reasons: the table fails open, an unreadable table
never removes the imaging results); the
combined model of the promoted version gives the probability, classified at its
training cut-off; Grad-CAM of the CNN on the lesion's largest cross-section and the
frames two below and above it gives the heat maps. The model is loaded and hash-checked
once, by :meth:`HtAfterMtPipeline.check` at start-up (a model that fails its checks
there makes the pipeline unavailable: the node runs its default instead) or on the first
run.
"""

from __future__ import annotations

import os
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
)
from pipelines.cnn import grad_cam, prepare_case
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
from pipelines.series import LoadedSeries

CLINICAL_TABLE_ENV = "DICOMNODE_CLINICAL_TABLE"
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
        """The model version, loaded and hash-checked on first use (``ModelStoreError``
        when a file is missing or changed: the job fails as a refused model)."""
        with self._lock:
            if self._model is None:
                self._model = HtModel.load(self.version, self.root)
            return self._model

    def check(self) -> None:
        """Load and verify the model now (manifest, every file's sha256, radiomics
        parameters, CNN weights); ``PipelineUnavailable`` saying what is wrong, so that
        the node starts with its default pipeline in this one's place."""
        try:
            _ = self.model
        except ModelStoreError as exc:
            raise PipelineUnavailable(f"model {MODEL_NAME} {self.version} refused: {exc}") from exc

    def _lookup(self, ds: Dataset) -> tuple[RowLookup, str]:
        """The study's table row, or why there is none, and where the variables came from.

        A table that cannot be read is logged for the admin and reported in the outputs;
        the risk is then computed with every table variable imputed.
        """
        path = self.clinical_table or os.environ.get(CLINICAL_TABLE_ENV)
        if not path:
            return RowLookup(None, NO_TABLE), f"no clinical table (set {CLINICAL_TABLE_ENV})"
        try:
            table = ClinicalTable.read(Path(path), strict=False)
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
        """Segment, describe the largest hyperdense region, predict, explain."""
        model = self.model
        found, source = self._lookup(series.reference)
        labels = self.baseline.segment(series)
        baseline = self.baseline.run(series, labels)
        if baseline.segments[0].total is None:
            notes = [*baseline.notes, f"no hyperdense lesion: no risk of {OUTCOME} computed"]
            return replace(baseline, algorithm=self.algorithm, notes=notes)
        case = case_features(
            series, found, self.baseline, model.radiomics_params, model.cnn_input, labels
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
            imputed=prediction.imputed,
            clinical_issues=tuple(
                issue
                for issue in case.clinical_issues
                if issue.variable in imputed or not issue.imputed
            ),
        )
        notes = [
            *baseline.notes,
            f"scored lesion: the largest hyperdense region, {case.lesion.volume_ml:.1f} mL "
            f"(largest cross-section on frame {case.cnn_input.key_frame})",
            f"risk of {OUTCOME}: {risk.probability:.3f} "
            f"({'high' if risk.high_risk else 'low'} at cut-off {risk.cutoff:.3f})",
            self._clinical_note(source, prediction.imputed),
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
    def _clinical_note(source: str, imputed: tuple[str, ...]) -> str:
        """Where the clinical variables came from and which were imputed."""
        if not imputed:
            return f"{source}; nothing imputed"
        whole = set(TABLE_VARIABLES) <= set(imputed)
        what = "all table variables" if whole else ", ".join(imputed)
        return f"{source}; imputed with training medians/modes: {what}"
