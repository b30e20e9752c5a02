"""Comprehensive 3D SR holding a TID 1500 Measurement Report of a pipeline's segments.

Each segment's total and each of its regions is one TID 1411 volumetric ROI group that
references the segment in the SEG. Measurements per group: Volume (mL), attenuation
coefficient with derivation Mean (HU), attenuation coefficient with derivation Maximum
and method ``HU_MAX_METHOD`` (highest mean HU of a 3x3-pixel in-plane window, a private
99DCMNODE concept), and Area with derivation Maximum (mm2, largest cross-section on the
source frames), which references the source image of that frame. The notice ("NOT FOR
DIAGNOSTIC USE") and the algorithm's kind and provenance are TEXT items of a root
"Qualitative Evaluations" container (TID 1500) and algorithm parameters of every group.
A risk prediction, when the pipeline makes one, goes in the same container as a NUM
(DCM 122157 Probability, in %), a CODE (private "Risk category at the model cut-off":
SCT High risk / Low risk) and TEXT lines naming the outcome, the model and its notice.
"""

from __future__ import annotations

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipelines.base import PipelineResult, RegionMeasurements, SegmentResult
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
    provenance_line,
    risk_lines,
    source_dataset,
    summary_lines,
)
from pipelines.outputs.uids import derive_uid
from pipelines.series import LoadedSeries

QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
RISK_CATEGORY = CodedConcept("RISKCAT", PRIVATE_SCHEME, "Risk category at the model cut-off")
UNIT_PERCENT = CodedConcept("%", "UCUM", "percent")


def algorithm_identification(result: PipelineResult) -> hd.sr.AlgorithmIdentification:
    """TID 4019 algorithm identification: name, version, kind, provenance and notice."""
    algorithm = result.algorithm
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[algorithm.kind, provenance_line(algorithm), algorithm.notice],
        family=algorithm_family(algorithm),
        manufacturer=MANUFACTURER,
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


def segment_groups(
    series: LoadedSeries,
    result: PipelineResult,
    seg: hd.seg.Segmentation,
    number: int,
    segment: SegmentResult,
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """One ROI group for the segment's total and one per region.

    An empty segment still gets its total group, with Volume 0 mL as its only
    measurement, so the report states that nothing was found.
    """
    referenced = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(str(series.reference.SeriesInstanceUID)),
    )
    algorithm_id = algorithm_identification(result)
    label = segment.segment.label
    named: list[tuple[str, list[hd.sr.Measurement]]] = []
    if segment.total is None:
        named.append((f"{label} total", [zero_volume(algorithm_id)]))
    else:
        named.append((f"{label} total", region_measurements(series, segment.total, algorithm_id)))
    named += [
        (f"{label} {k}", region_measurements(series, r, algorithm_id))
        for k, r in enumerate(segment.regions, start=1)
    ]
    return [
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derive_uid(str(seg.SOPInstanceUID), "tracking", str(number), name),
                identifier=name,
            ),
            referenced_segment=referenced,
            finding_type=segment.segment.property_type,
            finding_category=segment.segment.category,
            algorithm_id=algorithm_id,
            measurements=measurements,
        )
        for name, measurements in named
    ]


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
        name=algorithm.name,
        manufacturer_name=MANUFACTURER,
        model_name=identity.manufacturer_model_name,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def risk_items(result: PipelineResult) -> list[hd.sr.ContentItem]:
    """The risk as NUM (probability, %) and CODE (category at the model's cut-off)."""
    risk = result.risk
    if risk is None:
        return []
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    category = codes.SCT.HighRisk if risk.high_risk else codes.SCT.LowRisk
    return [
        hd.sr.NumContentItem(
            name=codes.DCM.Probability,
            value=ds_value(100.0 * risk.probability),
            unit=UNIT_PERCENT,
            relationship_type=contains,
        ),
        hd.sr.CodeContentItem(name=RISK_CATEGORY, value=category, relationship_type=contains),
    ]


def notice_container(result: PipelineResult) -> hd.sr.ContainerContentItem:
    """Root "Qualitative Evaluations" container: the risk items (if any), then the
    summary and risk lines as TEXT items."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    texts = [
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=line,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        for line in [*summary_lines(result), *risk_lines(result)]
    ]
    container.ContentSequence = hd.sr.ContentSequence([*risk_items(result), *texts])
    return container


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """Declaration of the private 99DCMNODE coding scheme used for ``HU_MAX_METHOD``."""
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
) -> hd.sr.Comprehensive3DSR:
    """Comprehensive 3D SR (TID 1500) of ``result``, referencing ``seg`` and key frames.

    ``result.segments`` must be the SEG's segments, in order (segment number = index + 1).

    Completion COMPLETE, verification UNVERIFIED, preliminary flag PRELIMINARY: nobody has
    reviewed an automatic result.
    """
    groups = [
        group
        for number, segment in enumerate(result.segments, start=1)
        for group in segment_groups(series, result, seg, number, segment)
    ]
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
