"""Comprehensive 3D SR holding a TID 1500 Measurement Report of a pipeline's regions.

Each region is one TID 1411 volumetric ROI group with its own Tracking Identifier and UID
(those of its SEG segment), referencing its own segment of the SEG (``regions``): Finding
(the class's property type: haemorrhage SCT 50960005, calcification SCT 18115005, contrast
staining DCM 111428 Extravasation, ...), Finding Site (intracranial structure, with
laterality when the region lies off the midline) and the measurements: Volume (mL),
attenuation coefficient with derivation Mean (HU), attenuation coefficient with
derivation Maximum and method ``HU_MAX_METHOD`` (highest mean HU of a 3x3-pixel in-plane
window, a private 99DCMNODE concept), and Area with derivation Maximum (mm2, largest
cross-section on the source frames), which references the source image of that frame.
A class with several regions adds a TID 1501 group with the class total; an empty class
keeps one group, Volume 0 mL, referencing its empty segment.

A risk prediction goes into the group of the region the model scored, as measurements
that TID 1500 readers (dcmqi's ``tid1500reader``, hence 3D Slicer) return: Probability
(DCM 122157, %) and Threshold Value (DCM 122411, the model's cut-off, %), each with the
outcome as a concept modifier (DCM 121071 Finding) and the model as TID 4019 algorithm
identification (name, version, notice), and the category at the cut-off as a
qualitative evaluation (DCM 121153 Lesion Risk: SCT High risk / Low risk). The TEXT
lines name the scored region and why it was chosen (``RiskPrediction.scored_reason``).
A risk with no region to attach to (the result has none) is stated in TEXT only.

Per-region classifier verdicts (``PipelineResult.classifications``, e.g. haemorrhage vs
contrast staining per area) go into the group of each classified region: the score, its
cut-off, the probability of the positive class and the class as a qualitative
evaluation (``pipelines.outputs.classification``).

The notice ("NOT FOR DIAGNOSTIC USE"), the algorithm's kind and provenance and the lines
the Secondary Capture shows are TEXT items of a root "Qualitative Evaluations" container.
Every text is ASCII (``common.plain``), so no Specific Character Set is needed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipelines.base import PipelineResult, RegionMeasurements, RiskPrediction, SegmentResult
from pipelines.outputs.classification import (
    check_classifications,
    classification_items,
    classification_lines,
)
from pipelines.outputs.common import (
    HU_MAX_METHOD,
    MANUFACTURER,
    PRIVATE_SCHEME,
    UNIT_HU,
    UNIT_ML,
    UNIT_MM2,
    OutputIdentity,
    algorithm_family,
    ds_value,
    patient_study_source,
    plain,
    provenance_line,
    risk_lines,
    source_dataset,
    summary_lines,
)
from pipelines.outputs.model_card import model_card_line, model_card_lines
from pipelines.outputs.regions import PlannedSegment, finding_site, scored_region, segment_plan
from pipelines.outputs.uids import derive_uid
from pipelines.series import LoadedSeries

QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
UNIT_PERCENT = CodedConcept("%", "UCUM", "percent")
RISK_PROBABILITY = CodedConcept.from_code(codes.DCM.Probability)  # DCM 122157
RISK_CUTOFF = CodedConcept.from_code(codes.DCM.ThresholdValue)  # DCM 122411
RISK_CATEGORY = CodedConcept.from_code(codes.DCM.LesionRisk)  # DCM 121153
RISK_OUTCOME = CodedConcept.from_code(codes.DCM.Finding)  # DCM 121071, concept modifier
HIGH_RISK = CodedConcept.from_code(codes.SCT.HighRisk)
LOW_RISK = CodedConcept.from_code(codes.SCT.LowRisk)
SHORT_STRING = 16  # SH: the longest code value
Group = (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def algorithm_identification(result: PipelineResult) -> hd.sr.AlgorithmIdentification:
    """TID 4019 algorithm identification: name, version, kind, provenance and notice."""
    algorithm = result.algorithm
    return hd.sr.AlgorithmIdentification(
        name=plain(algorithm.name),
        version=plain(algorithm.version),
        parameters=[plain(algorithm.kind), provenance_line(algorithm), plain(algorithm.notice)],
        family=algorithm_family(algorithm),
        manufacturer=MANUFACTURER,
    )


def model_identification(risk: RiskPrediction) -> hd.sr.AlgorithmIdentification:
    """TID 4019 identification of the risk model: name, version and its notice."""
    return hd.sr.AlgorithmIdentification(
        name=plain(risk.model_name),
        version=plain(risk.model_version),
        parameters=[
            plain(risk.notice),
            *([model_card_line(risk.model_card)] if risk.model_card else []),
        ],
        family=CodedConcept.from_code(codes.DCM.ArtificialIntelligence),
        manufacturer=MANUFACTURER,
    )


def outcome_concept(risk: RiskPrediction) -> CodedConcept:
    """The risk's coded outcome; without one, a private 99DCMNODE code of its text
    (e.g. HAEMORRHAGICTRA "haemorrhagic transformation")."""
    if risk.outcome_code is not None:
        return risk.outcome_code
    value = re.sub(r"[^A-Z0-9]", "", plain(risk.outcome).upper())[:SHORT_STRING] or "OUTCOME"
    return CodedConcept(value, PRIVATE_SCHEME, plain(risk.outcome)[:64])


def risk_measurements(risk: RiskPrediction) -> list[hd.sr.Measurement]:
    """Probability and cut-off (%) of the outcome, each naming the outcome and model,
    then the model's further measurements (``RiskPrediction.measurements``)."""
    model = model_identification(risk)
    measurements = [
        hd.sr.Measurement(
            name=name,
            value=ds_value(100.0 * value),
            unit=UNIT_PERCENT,
            algorithm_id=model,
        )
        for name, value in ((RISK_PROBABILITY, risk.probability), (RISK_CUTOFF, risk.cutoff))
    ]
    for measurement in measurements:
        measurement[0].ContentSequence.append(
            hd.sr.CodeContentItem(
                name=RISK_OUTCOME,
                value=outcome_concept(risk),
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            )
        )
    measurements += [
        hd.sr.Measurement(
            name=item.name,
            value=ds_value(item.value),
            unit=item.unit,
            method=item.method,
            derivation=item.derivation,
            algorithm_id=model,
        )
        for item in risk.measurements
    ]
    return measurements


def risk_category(risk: RiskPrediction) -> hd.sr.QualitativeEvaluation:
    """The category at the model's cut-off, coded (Lesion Risk: High risk / Low risk)."""
    return hd.sr.QualitativeEvaluation(
        name=RISK_CATEGORY, value=HIGH_RISK if risk.high_risk else LOW_RISK
    )


def region_measurements(
    series: LoadedSeries,
    region: RegionMeasurements,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> list[hd.sr.Measurement]:
    """Volume, mean HU, HUmax and largest cross-section area of one region."""
    key_source = source_dataset(series, region.key_frame)
    frame_number = series.frames[region.key_frame].frame_number
    key_image = hd.sr.SourceImageForMeasurement(
        referenced_sop_class_uid=key_source.SOPClassUID,
        referenced_sop_instance_uid=key_source.SOPInstanceUID,
        referenced_frame_numbers=None if frame_number is None else [frame_number],
    )
    attenuation = codes.DCM.AttenuationCoefficient
    if not math.isfinite(region.hu_mean):  # a non-CT image (MR): volume and area only
        volume = hd.sr.Measurement(
            name=codes.SCT.Volume, value=ds_value(region.volume_ml), unit=UNIT_ML,
            algorithm_id=algorithm_id,
        )  # fmt: skip
        area = hd.sr.Measurement(
            name=codes.SCT.Area, value=ds_value(region.key_area_mm2), unit=UNIT_MM2,
            derivation=codes.SCT.Maximum, referenced_images=[key_image],
            algorithm_id=algorithm_id,
        )  # fmt: skip
        return [volume, area]
    return [
        hd.sr.Measurement(
            name=codes.SCT.Volume,
            value=ds_value(region.volume_ml),
            unit=UNIT_ML,
            algorithm_id=algorithm_id,
        ),
        hd.sr.Measurement(
            name=attenuation,
            value=ds_value(region.hu_mean),
            unit=UNIT_HU,
            derivation=codes.SCT.Mean,
            algorithm_id=algorithm_id,
        ),
        hd.sr.Measurement(
            name=attenuation,
            value=ds_value(region.hu_max),
            unit=UNIT_HU,
            derivation=codes.SCT.Maximum,
            method=HU_MAX_METHOD,
            algorithm_id=algorithm_id,
        ),
        hd.sr.Measurement(
            name=codes.SCT.Area,
            value=ds_value(region.key_area_mm2),
            unit=UNIT_MM2,
            derivation=codes.SCT.Maximum,
            referenced_images=[key_image],
            algorithm_id=algorithm_id,
        ),
    ]


def region_group(
    series: LoadedSeries,
    result: PipelineResult,
    seg: hd.seg.Segmentation,
    planned: PlannedSegment,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group of one planned segment: its own tracking identifier and UID, its
    own segment, finding, finding site, measurements, and the risk if it was scored."""
    algorithm_id = algorithm_identification(result)
    if planned.measurements is None:
        measurements = [zero_volume(algorithm_id)]
    else:
        measurements = region_measurements(series, planned.measurements, algorithm_id)
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    risk = result.risk
    if risk is not None and scored_region(result) == (planned.class_index, planned.region_index):
        measurements += risk_measurements(risk)
        evaluations.append(risk_category(risk))
    classified, classes = classification_items(result, planned)
    measurements += classified
    evaluations += classes
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=planned.tracking_uid(str(seg.SOPInstanceUID)), identifier=plain(planned.label)
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=planned.number,
            source_series=hd.sr.SourceSeriesForSegmentation(
                str(series.reference.SeriesInstanceUID)
            ),
        ),
        finding_type=planned.finding,
        finding_category=planned.segment.category,
        finding_sites=[finding_site(series, planned)],
        algorithm_id=algorithm_id,
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )


def total_group(
    series: LoadedSeries, result: PipelineResult, seg: hd.seg.Segmentation, segment: SegmentResult
) -> hd.sr.MeasurementsAndQualitativeEvaluations | None:
    """TID 1501 group of a class's total over its regions; None unless it has several
    (the total of one region is that region's group)."""
    if segment.total is None or len(segment.regions) < 2:
        return None
    algorithm_id = algorithm_identification(result)
    label = plain(f"{segment.segment.label} total")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(str(seg.SOPInstanceUID), "tracking", "total", label),
            identifier=label,
        ),
        finding_type=segment.segment.property_type,
        finding_category=segment.segment.category,
        algorithm_id=algorithm_id,
        measurements=region_measurements(series, segment.total, algorithm_id),
    )


def measurement_groups(
    series: LoadedSeries,
    result: PipelineResult,
    seg: hd.seg.Segmentation,
    plan: Sequence[PlannedSegment] | None = None,
) -> list[Group]:
    """Per class: one TID 1411 group per region (or its empty segment), then its total
    (segments as ``plan``, the SEG's, or ``regions.segment_plan``)."""
    planned = segment_plan(result) if plan is None else plan
    groups: list[Group] = []
    for class_index, segment in enumerate(result.segments):
        groups += [
            region_group(series, result, seg, p) for p in planned if p.class_index == class_index
        ]
        total = total_group(series, result, seg, segment)
        if total is not None:
            groups.append(total)
    return groups


def zero_volume(algorithm_id: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    """Volume 0 mL: the measurement of an empty segment (nothing was found)."""
    return hd.sr.Measurement(
        name=codes.SCT.Volume, value=0.0, unit=UNIT_ML, algorithm_id=algorithm_id
    )


def observation_context(
    result: PipelineResult, identity: OutputIdentity
) -> hd.sr.ObservationContext:
    """The algorithm as device observer (TID 1004)."""
    algorithm = result.algorithm
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derive_uid(identity.manufacturer_model_name, algorithm.name, algorithm.version),
        name=plain(algorithm.name),
        manufacturer_name=MANUFACTURER,
        model_name=plain(identity.manufacturer_model_name),
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def notice_container(result: PipelineResult) -> hd.sr.ContainerContentItem:
    """Root "Qualitative Evaluations" container: the summary and risk lines as TEXT."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=line,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for line in [
                *summary_lines(result),
                *risk_lines(result),
                *(line for line, _ in classification_lines(result)),
                *model_card_lines(result),
            ]
        ]
    )
    return container


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """Declaration of the private 99DCMNODE coding scheme (``HU_MAX_METHOD``, outcomes)."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="dicomnode private concepts",
        responsible_organization=MANUFACTURER,
    )


def evidence_for(series: LoadedSeries, result: PipelineResult) -> list[Dataset]:
    """Source instances referenced by key frames, deduplicated, in frame order."""
    frames: set[int] = set()
    for segment in result.segments:
        frames.update(region.key_frame for region in segment.regions)
        if segment.total is not None:
            frames.add(segment.total.key_frame)
    found: dict[str, Dataset] = {}
    for frame in sorted(frames):
        ds = source_dataset(series, frame)
        found.setdefault(str(ds.SOPInstanceUID), ds)
    return list(found.values())


def build_sr(
    series: LoadedSeries,
    result: PipelineResult,
    seg: hd.seg.Segmentation,
    identity: OutputIdentity,
    plan: Sequence[PlannedSegment] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Comprehensive 3D SR (TID 1500) of ``result``, referencing ``seg`` and key frames.

    ``seg`` must be the SEG that ``build_seg`` wrote for ``result`` (one segment per
    region, numbered as ``regions.segment_plan`` numbers them; ``plan``: that plan, when
    the caller made it already).

    Completion COMPLETE, verification UNVERIFIED, preliminary flag PRELIMINARY: nobody has
    reviewed an automatic result.
    """
    check_classifications(result)
    groups = measurement_groups(series, result, seg, plan)
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(result, identity),
        procedure_reported=codes.LN.HeadCT,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(notice_container(result))
    evidence = [*evidence_for(series, result), seg]
    if len(evidence) == 1:
        evidence.insert(0, series.reference)
    evidence[0] = patient_study_source(evidence[0])
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        performed_procedure_codes=[codes.LN.HeadCT],
        coding_schemes=[private_coding_scheme()],
        series_description=identity.series_description,
        manufacturer_model_name=identity.manufacturer_model_name,
        software_versions=identity.software_versions,
        content_date=identity.content_date,
        content_time=identity.content_time,
    )
