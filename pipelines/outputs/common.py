"""What every output object shares: its identity, equipment, codes and text lines."""

from __future__ import annotations

import datetime
import math
import unicodedata
from dataclasses import dataclass

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import format_number_as_ds

from pipelines.base import Algorithm, PipelineResult, RegionMeasurements, RiskPrediction
from pipelines.outputs.regions import region_label, scored_region
from pipelines.outputs.uids import derive_uid
from pipelines.series import LoadedSeries

MANUFACTURER = "dicomnode"
DEVICE_SERIAL_NUMBER = "1"  # one software device; the node's AE title names the instance
PRIVATE_SCHEME = "99DCMNODE"  # coding scheme of the few concepts DICOM does not define
UNIT_ML = CodedConcept("ml", "UCUM", "milliliter")
UNIT_HU = CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
UNIT_MM2 = CodedConcept("mm2", "UCUM", "square millimeter")
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
EVIDENCE_PATIENT_STUDY = (*TYPE2_PATIENT_STUDY, "StudyInstanceUID", "SpecificCharacterSet")
UNSTATED = "NOT STATED BY SOURCE"
HU_MAX_METHOD = CodedConcept(
    "HUMAX3X3", PRIVATE_SCHEME, "Highest mean of a 3x3-pixel in-plane window"
)


@dataclass(frozen=True)
class OutputIdentity:
    """Series/instance identity and producing-device attributes of one output object."""

    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    series_description: str
    manufacturer_model_name: str  # the pipeline's name
    software_versions: str  # the algorithm's version
    content_datetime: datetime.datetime
    instance_number: int = 1

    @property
    def content_date(self) -> datetime.date:
        """ContentDate of the object."""
        return self.content_datetime.date()

    @property
    def content_time(self) -> datetime.time:
        """ContentTime of the object (whole seconds)."""
        return self.content_datetime.time().replace(microsecond=0)


def output_identity(
    series_instance_uid: str,
    pipeline_name: str,
    algorithm: Algorithm,
    kind: str,
    series_number: int,
    series_description: str,
    content_datetime: datetime.datetime,
    revision: int = 1,
) -> OutputIdentity:
    """Identity of output ``kind`` ("seg", "sc-1", "sr") derived from the source series.

    The series UID hashes ``"series-" + kind`` (first part before a dash), the instance UID
    hashes ``kind`` itself, both with the source series UID, pipeline name and version,
    and (see :func:`revision_seed`) the result revision from 2 on.
    """
    series_kind = "series-" + kind.split("-")[0]
    seed = (series_instance_uid, pipeline_name, algorithm.version, *revision_seed(revision))
    return OutputIdentity(
        series_instance_uid=derive_uid(*seed, series_kind),
        sop_instance_uid=derive_uid(*seed, kind),
        series_number=series_number,
        series_description=series_description,
        manufacturer_model_name=pipeline_name,
        software_versions=algorithm.version,
        content_datetime=content_datetime,
    )


def revision_seed(revision: int) -> tuple[str, ...]:
    """The UID seed part of result revision ``revision`` (1 = the first result of a series).

    Revision 1 adds nothing, so first results keep the UIDs they always had; each later
    revision (the series changed after it was processed) gives new UIDs, so PACS keeps the
    superseded objects apart until a rejection note retracts them.
    """
    if revision < 1:
        raise ValueError(f"a result revision counts from 1, not {revision}")
    return () if revision == 1 else (f"revision-{revision}",)


def revision_suffix(revision: int) -> str:
    """`` rev N`` for revisions from 2 on (shown in series descriptions), else empty."""
    return "" if revision == 1 else f" rev {revision}"


def algorithm_family(algorithm: Algorithm) -> CodedConcept:
    """CID 7162 family: Artificial Intelligence for learned methods, else Morphological
    Operations (thresholding, connected components and masks are image morphology)."""
    if "learn" in algorithm.kind.lower() or "model" in algorithm.kind.lower():
        return CodedConcept.from_code(codes.DCM.ArtificialIntelligence)
    return CodedConcept.from_code(codes.DCM.MorphologicalOperations)


def contributing_equipment(source: Dataset) -> list[hd.ContributingEquipment]:
    """The source scanner as acquisition equipment, when the source names its maker."""
    if not source.get("Manufacturer"):
        return []
    return [hd.ContributingEquipment.for_image_acquisition(source)]


def shallow_copy(source: Dataset) -> Dataset:
    """A new dataset holding ``source``'s elements (not copied) and file meta."""
    copied = Dataset()
    copied.update(source)
    if "file_meta" in source.__dict__:
        copied.file_meta = source.file_meta
    return copied


def patient_study_source(source: Dataset) -> Dataset:
    """``source``, or a shallow copy completed so that outputs copying its patient and
    study modules are valid: absent Type 2 attributes are added empty, and an empty
    DeidentificationMethod of a de-identified source (Type 1C) says it was not stated.
    """
    missing = [k for k in TYPE2_PATIENT_STUDY if k not in source]
    method_empty = (
        source.get("PatientIdentityRemoved") == "YES"
        and not source.get("DeidentificationMethod")
        and not source.get("DeidentificationMethodCodeSequence")
    )
    if not missing and not method_empty:
        return source
    completed = shallow_copy(source)
    for keyword in missing:
        setattr(completed, keyword, None)
    if method_empty:
        completed.DeidentificationMethod = UNSTATED
    return completed


def ds_value(value: float) -> float:
    """``value`` rounded so that its DS string has at most 16 characters."""
    return float(format_number_as_ds(round(float(value), 3)))


def algorithm_title(algorithm: Algorithm) -> str:
    """One line naming the algorithm: name, version and kind (ASCII)."""
    return plain(f"{algorithm.name} {algorithm.version} ({algorithm.kind})")


def provenance_line(algorithm: Algorithm) -> str:
    """One line saying where the algorithm's parameters or training come from (ASCII)."""
    return plain(f"Provenance: {algorithm.provenance}")


def measurement_line(label: str, total: RegionMeasurements | None) -> str:
    """One line of a segment's total measurements, or that nothing was found."""
    if total is None:
        return f"{label}: none found"
    if not math.isfinite(total.hu_mean):  # a non-CT image (MR): no Hounsfield units
        return f"{label}: {total.volume_ml:.1f} mL"
    return (
        f"{label}: {total.volume_ml:.1f} mL, HUmax {total.hu_max:.0f}, mean {total.hu_mean:.0f} HU"
    )


ASCII_EQUIVALENTS = str.maketrans(
    {
        "\u2014": "-",  # em dash
        "\u2013": "-",  # en dash
        "\u2012": "-",  # figure dash
        "\u2010": "-",  # hyphen
        "\u2011": "-",  # non-breaking hyphen
        "\u2212": "-",  # minus sign
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2026": "...",
        "\u00a0": " ",  # no-break space
        "\u00b1": "+/-",
        "\u00d7": "x",
        "\u00b5": "u",  # micro sign
        "\u03bc": "u",  # Greek mu
        "\u00b0": " deg",
        "\u2264": "<=",
        "\u2265": ">=",
        "\u2248": "~",
        "\u2192": "->",
        "\u00b2": "2",
        "\u00b3": "3",
    }
)


def plain(text: str) -> str:
    """``text`` in the DICOM default repertoire (ASCII), so that it needs no Specific
    Character Set and reads the same in every viewer: dashes, quotes and common symbols
    get their ASCII equivalents, accented letters lose their accents (NFKD), and only a
    character with no equivalent at all becomes "?".
    """
    decomposed = unicodedata.normalize("NFKD", text.translate(ASCII_EQUIVALENTS))
    kept = "".join(c for c in decomposed if not unicodedata.combining(c))
    return kept.encode("ascii", "replace").decode("ascii")


def summary_lines(result: PipelineResult) -> list[str]:
    """Human-readable lines every output shows: algorithm, results, notice, provenance."""
    lines = [algorithm_title(result.algorithm)]
    lines += [measurement_line(s.segment.label, s.total) for s in result.segments]
    lines += [result.algorithm.notice, provenance_line(result.algorithm)]
    return [plain(line) for line in lines]


def risk_lines(result: PipelineResult) -> list[str]:
    """Lines stating a result's risk prediction, its model, its notice and the region it
    scored, then the result's statements (e.g. that no risk was computed, and why)."""
    risk = result.risk
    if risk is None:
        return [plain(line) for line in result.statements]
    category = "HIGH" if risk.high_risk else "low"
    lines = [
        f"Risk of {risk.outcome}: {100 * risk.probability:.0f}% ({category} at the model's "
        f"cut-off {100 * risk.cutoff:.0f}%)",
        f"Model: {risk.model_name} {risk.model_version} - {risk.notice}",
    ]
    lines += [
        f"{m.label}: {m.value:.3g}" + ("" if m.unit.value == "1" else f" {m.unit.value}")
        for m in risk.measurements
    ]
    scored = scored_region(result)
    if scored is not None:
        class_index, region_index = scored
        segment = result.segments[class_index]
        volume = segment.regions[region_index].volume_ml
        label = region_label(segment.segment, region_index)
        reason = f": {risk.scored_reason}" if risk.scored_reason else ""
        lines.append(f"Scored region: {label} ({volume:.1f} mL){reason}")
    lines += clinical_lines(risk)
    lines += list(risk.explanation)
    lines += result.statements
    return [plain(line) for line in lines]


def clinical_lines(risk: RiskPrediction) -> list[str]:
    """The clinical variables imputed, grouped by reason, and other clinical-data notes.

    E.g. ``Imputed clinical variables (training median/mode): nihss (value 99 outside
    plausible range 0-42); diabetes, smoking (missing (empty or NA) in the clinical
    table)``. A variable imputed without a stated reason is listed as missing.
    """
    lines = []
    if risk.imputed:
        reasons: dict[str, list[str]] = {}
        for name in risk.imputed:
            why = [i.reason for i in risk.clinical_issues if i.variable == name and i.imputed]
            reasons.setdefault("; ".join(why) or "missing", []).append(name)
        groups = [f"{', '.join(names)} ({reason})" for reason, names in reasons.items()]
        lines.append("Imputed clinical variables (training median/mode): " + "; ".join(groups))
    notes = [f"{i.variable}: {i.reason}" for i in risk.clinical_issues if not i.imputed]
    if notes:
        lines.append("Clinical data notes: " + "; ".join(notes))
    return lines


def source_dataset(series: LoadedSeries, frame: int) -> Dataset:
    """The source instance holding ``series.frames[frame]``."""
    uid = series.frames[frame].sop_instance_uid
    for ds in series.datasets:
        if ds.SOPInstanceUID == uid:
            return ds
    raise ValueError(f"frame {frame} refers to instance {uid}, which the series does not hold")
