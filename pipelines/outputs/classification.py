"""SR items and display lines of per-region classifier verdicts
(``PipelineResult.classifications``, e.g. haemorrhage vs contrast staining per area).

In the TID 1411 group of a classified region (``sr.region_group``), after the region's
own measurements:

- the score (e.g. Rad-score), a private 99DCMNODE concept ``CLASSIFIERSCORE`` named
  after the score, no units (UCUM ``1``);
- Threshold Value (DCM 122411): the model's cut-off on the score's scale, no units;
- Probability (DCM 122157, %) of the positive class, with that class as a concept
  modifier (DCM 121071 Finding);

each identified by the model (TID 4019: name, version, notice); and the class at the
cut-off as a qualitative evaluation Classification (SCT 278201002) whose value is the
region's segment class (its SEG property type, e.g. SCT Hemorrhage or DCM
Extravasation). The same verdicts become one text line per region on the Secondary
Capture (in the class's colour, so the lines are the overlay's legend) and in the SR's
text container.
"""

from __future__ import annotations

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from pipelines.base import PipelineResult, RegionClassification
from pipelines.outputs.common import MANUFACTURER, PRIVATE_SCHEME, ds_value, plain
from pipelines.outputs.regions import PlannedSegment, Rgb, class_colour, region_label

UNIT_NONE = CodedConcept("1", "UCUM", "no units")
UNIT_PERCENT = CodedConcept("%", "UCUM", "percent")
SCORE_CODE = "CLASSIFIERSCORE"
THRESHOLD = CodedConcept.from_code(codes.DCM.ThresholdValue)  # DCM 122411
PROBABILITY = CodedConcept.from_code(codes.DCM.Probability)  # DCM 122157
FINDING = CodedConcept.from_code(codes.DCM.Finding)  # DCM 121071, concept modifier
CLASSIFICATION = CodedConcept.from_code(codes.SCT.Classification)  # SCT 278201002
PRIVATE_POSITIVE_CODE = "POSITIVECLASS"
CLASSIFIER_COLOUR: Rgb = (255, 210, 80)  # the model line under the per-region lines


def classification_of(
    result: PipelineResult, class_index: int, region_index: int | None
) -> RegionClassification | None:
    """The verdict on region ``region_index`` of segment ``class_index``, if any."""
    if region_index is None:
        return None
    for verdict in result.classifications:
        if verdict.region == (class_index, region_index):
            return verdict
    return None


def check_classifications(result: PipelineResult) -> None:
    """Refuse verdicts naming a region the result does not hold, or one region twice."""
    seen: set[tuple[int, int]] = set()
    for verdict in result.classifications:
        class_index, region_index = verdict.region
        if not 0 <= class_index < len(result.segments) or not 0 <= region_index < len(
            result.segments[class_index].regions
        ):
            raise ValueError(
                f"a classification names region {region_index} of segment {class_index}, "
                "which the result does not hold"
            )
        if verdict.region in seen:
            raise ValueError(f"region {verdict.region} is classified twice")
        seen.add(verdict.region)


def model_identification(verdict: RegionClassification) -> hd.sr.AlgorithmIdentification:
    """TID 4019 identification of the classifier: name, version and its notice."""
    return hd.sr.AlgorithmIdentification(
        name=plain(verdict.model_name),
        version=plain(verdict.model_version),
        parameters=[plain(verdict.notice)],
        family=CodedConcept.from_code(codes.DCM.ArtificialIntelligence),
        manufacturer=MANUFACTURER,
    )


def positive_concept(verdict: RegionClassification) -> CodedConcept:
    """The positive class, coded; without a code, a private 99DCMNODE one of its text."""
    if verdict.positive_code is not None:
        return verdict.positive_code
    return CodedConcept(PRIVATE_POSITIVE_CODE, PRIVATE_SCHEME, plain(verdict.positive)[:64])


def classification_items(
    result: PipelineResult, planned: PlannedSegment
) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    """Score, cut-off and probability measurements and the class of a planned segment's
    region; empty lists when the region was not classified."""
    verdict = classification_of(result, planned.class_index, planned.region_index)
    if verdict is None:
        return [], []
    model = model_identification(verdict)
    score_name = CodedConcept(SCORE_CODE, PRIVATE_SCHEME, plain(verdict.score_name)[:64])
    probability = hd.sr.Measurement(
        name=PROBABILITY,
        value=ds_value(100.0 * verdict.probability),
        unit=UNIT_PERCENT,
        algorithm_id=model,
    )
    probability[0].ContentSequence.append(
        hd.sr.CodeContentItem(
            name=FINDING,
            value=positive_concept(verdict),
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    measurements = [
        hd.sr.Measurement(
            name=score_name, value=ds_value(verdict.score), unit=UNIT_NONE, algorithm_id=model
        ),
        hd.sr.Measurement(
            name=THRESHOLD,
            value=ds_value(verdict.score_cutoff),
            unit=UNIT_NONE,
            algorithm_id=model,
        ),
        probability,
    ]
    evaluation = hd.sr.QualitativeEvaluation(
        name=CLASSIFICATION, value=planned.segment.property_type
    )
    return measurements, [evaluation]


def classification_lines(result: PipelineResult) -> list[tuple[str, Rgb]]:
    """One line per classified region, in its class's colour (the overlay's legend),
    e.g. ``Haemorrhage 1: 3.2 mL, HUmax 84, Rad-score 0.52 (cut-off -0.36),
    P(intraparenchymal haemorrhage) 63%``."""
    lines: list[tuple[str, Rgb]] = []
    for class_index, segment in enumerate(result.segments):
        colour = class_colour(class_index, segment.segment)
        for region_index, region in enumerate(segment.regions):
            verdict = classification_of(result, class_index, region_index)
            if verdict is None:
                continue
            label = region_label(segment.segment, region_index)
            relation = ">=" if verdict.is_positive else "<"
            lines.append(
                (
                    plain(
                        f"{label}: {region.volume_ml:.1f} mL, HUmax {region.hu_max:.0f}, "
                        f"{verdict.score_name} {verdict.score:.2f} {relation} cut-off "
                        f"{verdict.score_cutoff:.2f}, P({verdict.positive}) "
                        f"{100.0 * verdict.probability:.0f}%"
                    ),
                    colour,
                )
            )
    if result.classifications:
        first = result.classifications[0]
        lines.append(
            (
                plain(f"Classifier: {first.model_name} {first.model_version} - {first.notice}"),
                CLASSIFIER_COLOUR,
            )
        )
    return lines
