"""What a pipeline returns, whatever its method: coded segments on the source frames,
per-region measurements, and the identity of the algorithm that made them.

Learned segmenters and risk models of later work return the same types, so the output
writers (``pipelines.outputs``) and the service never depend on a particular method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from highdicom.sr import CodedConcept
from numpy.typing import NDArray

from pipelines.series import LoadedSeries

if TYPE_CHECKING:
    from pipelines.contract import OutputProfile

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"


@dataclass(frozen=True)
class Algorithm:
    """Identity of the method behind a result, as it is named in every output."""

    name: str  # e.g. "dicomnode hyperdense threshold baseline"
    version: str  # e.g. "1.0.0"; part of the output SOP Instance UID seed
    kind: str  # "threshold baseline", "learned segmenter", ...
    provenance: str  # what trained it or where its parameters come from
    notice: str = NOT_FOR_DIAGNOSTIC_USE

    def __post_init__(self) -> None:
        """Name, version and notice become DICOM LO values: at most 64 characters."""
        for field_name in ("name", "version", "notice"):
            value = getattr(self, field_name)
            if len(value) > 64:
                raise ValueError(f"Algorithm.{field_name} exceeds 64 characters: {value!r}")


@dataclass(frozen=True)
class SegmentClass:
    """A coded segment class (DICOM SEG Segment Sequence item)."""

    label: str
    category: CodedConcept
    property_type: CodedConcept


@dataclass(frozen=True)
class RegionMeasurements:
    """Measurements of one connected region (or of all regions of a class together)."""

    volume_ml: float
    hu_max: float  # highest 3x3-pixel in-plane mean HU, over windows centred in the region
    hu_mean: float
    key_frame: int  # index into LoadedSeries.frames of the frame where the region is largest
    key_area_mm2: float  # region's area on that frame


@dataclass(frozen=True)
class SegmentResult:
    """One segment class: its mask on the source frames and its measurements."""

    segment: SegmentClass
    frame_mask: NDArray[np.bool_]  # (n_frames, rows, columns), on LoadedSeries.frames
    regions: Sequence[RegionMeasurements]  # largest first
    total: RegionMeasurements | None  # None when the segment is empty
    # (n_frames, rows, columns) on LoadedSeries.frames: 0 outside, k inside regions[k - 1].
    # None: the writers label the connected parts of ``frame_mask`` themselves.
    region_labels: NDArray[np.integer] | None = None  # (see ``label_dtype``)


@dataclass(frozen=True)
class ClinicalIssue:
    """Why a clinical variable of a risk model was not taken as given.

    ``imputed``: the variable had no usable value and the model's fill value was used
    (e.g. "value 99 outside plausible range 0-42", "no row for this study in the clinical
    table"); otherwise a second source gave it (e.g. an implausible header age, the
    table's used). ``reason`` never holds a patient identifier.
    """

    variable: str
    reason: str
    imputed: bool = True


@dataclass(frozen=True)
class ModelCard:
    """What every risk output says about the model that made it: its identity, the
    artefact it was loaded from, what it was trained on, its operating point and
    calibration, and when it was made (``pipelines.outputs.model_card`` writes it)."""

    name: str
    version: str
    artefact_sha256: str  # the manifest's own sha256, which pins every file's hash
    training_cohort_sha256: str  # model_store.artefacts.training_data_hash
    training_cohort_size: int | None
    cutoff: float
    calibration_slope: float | None  # on the held-out cases at the promotion gate
    created: str  # UTC, ISO 8601


@dataclass(frozen=True)
class RiskMeasurement:
    """A further number a risk model reports beside its probability (e.g. a haematoma
    volume by ABC/2, a deep-learning score): a TID 1500 numeric item of the scored
    region's group, and a summary line ``label: value unit``."""

    name: CodedConcept  # concept name, e.g. SCT Volume
    value: float
    unit: CodedConcept  # UCUM
    label: str  # e.g. "Haematoma volume (ABC/2)"
    method: CodedConcept | None = None  # e.g. the ABC/2 method
    derivation: CodedConcept | None = None


@dataclass(frozen=True)
class RiskPrediction:
    """A model's risk for one case, as the SR and SCs report it."""

    outcome: str  # e.g. "haemorrhagic transformation"
    probability: float  # 0..1
    cutoff: float  # the model's operating point (Youden on its training data)
    model_name: str
    model_version: str
    notice: str  # e.g. "trained on synthetic data - not for clinical use"
    imputed: Sequence[str] = ()  # clinical variables that were missing and imputed
    clinical_issues: Sequence[ClinicalIssue] = ()  # why each was imputed, and other notes
    # (segment index, region index) of the region the model scored, both from 0 into
    # PipelineResult.segments and its regions; None: the first segment's largest region.
    scored_region: tuple[int, int] | None = None
    scored_reason: str = ""  # why that region, e.g. "the largest haemorrhage"
    # Coded outcome; None: a private 99DCMNODE code derived from ``outcome``.
    outcome_code: CodedConcept | None = None
    model_card: ModelCard | None = None  # written into the SR when given
    input_check: str | None = None  # out-of-distribution check line (pipelines.retraining.ood)
    # Further numbers the model reports with the risk (written after probability and cut-off).
    measurements: Sequence[RiskMeasurement] = ()
    # Lines explaining the prediction, written after the risk (e.g. nomogram points).
    explanation: Sequence[str] = ()

    @property
    def high_risk(self) -> bool:
        """The category at the model's cut-off."""
        return self.probability >= self.cutoff


@dataclass(frozen=True)
class RegionClassification:
    """A per-region classifier's verdict on one region (e.g. haemorrhage vs contrast
    staining), as the SR and SC report it beside the region's measurements.

    The class the region was given is its segment's class (``PipelineResult.segments``
    holds one segment per class); this record carries the score behind it.
    """

    region: tuple[int, int]  # (segment index, region index), both from 0
    score_name: str  # e.g. "Rad-score"
    score: float
    score_cutoff: float  # the model's operating point on the score's scale
    probability: float  # 0..1, of ``positive``
    positive: str  # the class the probability is of, e.g. "intraparenchymal haemorrhage"
    model_name: str
    model_version: str
    notice: str  # e.g. "trained on synthetic data - not for clinical use"
    positive_code: CodedConcept | None = None  # coded ``positive``

    @property
    def is_positive(self) -> bool:
        """The class at the cut-off: ``score >= score_cutoff``."""
        return self.score >= self.score_cutoff


@dataclass(frozen=True)
class HeatMap:
    """A saliency map (e.g. Grad-CAM) on one source frame, values in [0, 1]."""

    frame: int  # index into LoadedSeries.frames
    heat: NDArray[np.float32]  # (rows, columns) of that frame
    label: str  # e.g. "Grad-CAM (EfficientNet-Lite0), positive class"


@dataclass(frozen=True)
class CaseRecord:
    """What retraining needs from one run, for the node's case store
    (``dicomnode.case_store``): the image and regions every run has, and, when the model
    scored a lesion, its inputs and features. Built only for a job that keeps it
    (``pipelines.run_scope.keeping_cases``).

    ``arrays``: named arrays (e.g. ``volume_hu`` int16 and ``volume_affine`` of the
    resampled volume, ``regions`` the segmenter's candidate lesions on its grid, the
    scored lesion's masks and the CNN input samples). ``features``: feature blocks by
    name (``radiomics``, ``clinical``), each name -> value (None: missing).
    ``inputs``: JSON-ready settings and facts needed to rebuild the model inputs (empty
    when nothing was scored).
    """

    arrays: Mapping[str, NDArray[Any]]
    features: Mapping[str, Mapping[str, float | None]] = field(default_factory=dict)
    inputs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineResult:
    """Everything the output writers need from a pipeline run."""

    algorithm: Algorithm
    segments: Sequence[SegmentResult]
    key_frame: int  # frame shown in the Secondary Capture
    notes: Sequence[str] = field(default_factory=tuple)
    risk: RiskPrediction | None = None
    heatmaps: Sequence[HeatMap] = field(default_factory=tuple)
    # Per-region classifier verdicts (e.g. pipeline iph_vs_contrast), one per region.
    classifications: Sequence[RegionClassification] = field(default_factory=tuple)
    # Lines every output states beside the measurements (SC panel, SR TEXT, saliency SC),
    # e.g. "no lesion: no risk computed (...)" from a risk model that scored nothing.
    statements: Sequence[str] = field(default_factory=tuple)
    # What retraining needs from this run: a trainable risk model fills it in when the
    # job keeps it (``pipelines.run_scope.keeping_cases``: a case store is configured).
    case_record: CaseRecord | None = None


class Pipeline(Protocol):
    """A clinical pipeline: a pure function of a loaded series, with its registry
    ``name``, its ``algorithm`` identity and its output ``profile``
    (``pipelines.contract``); built from its settings (``pipelines.settings``)."""

    name: str

    @property
    def algorithm(self) -> Algorithm:
        """The identity written into every output."""
        ...

    @property
    def profile(self) -> OutputProfile:
        """Titles, segment classes and writers of the pipeline's outputs."""
        ...

    def run(self, series: LoadedSeries) -> PipelineResult:
        """Segment and measure ``series``; raise ``PipelineError`` with a readable reason."""
        ...

    def check(self) -> None:
        """Verify, before any job, that every artefact the pipeline needs (parameters,
        model manifest and file hashes, weights) is present and intact, and load it;
        raise ``PipelineUnavailable`` saying what is wrong and where."""
        ...


class PipelineError(Exception):
    """A pipeline could not produce a result; the message is shown to an admin."""


class PipelineUnavailable(PipelineError):
    """A pipeline cannot run here (e.g. its model files are absent); the message says
    what is missing and where to put it. The node then falls back to its default."""


class NotHeadCt(PipelineError):
    """The series holds no intracranial soft tissue: it is not a head CT, or no skull."""


class ModelRefused(PipelineError):
    """A model artefact failed its integrity check (its hash differs from the manifest's)."""
