"""The model card in the SR: one line naming the risk model's name, version, artefact
hash, training-cohort hash and size, cut-off, calibration slope and date, written as a
TID 4019 algorithm parameter of the risk measurements and as a TEXT line of the
report's qualitative evaluations (ASCII only), followed by the per-prediction input
check (``pipelines.retraining.ood``) when the risk carries one."""

from __future__ import annotations

from pipelines.base import ModelCard, PipelineResult

HASH_DIGITS = 16
"""Hash digits shown (64 bits: enough to tell artefacts apart, short enough to read)."""


def model_card_line(card: ModelCard) -> str:
    """The card as one ASCII line."""
    size = "unknown" if card.training_cohort_size is None else str(card.training_cohort_size)
    slope = "not measured" if card.calibration_slope is None else f"{card.calibration_slope:.2f}"
    text = (
        f"model card: {card.name} {card.version}; artefact sha256 "
        f"{card.artefact_sha256[:HASH_DIGITS]}; training cohort sha256 "
        f"{card.training_cohort_sha256[:HASH_DIGITS]}, {size} cases; cut-off "
        f"{card.cutoff:.3f}; calibration slope {slope}; created {card.created}"
    )
    return text.encode("ascii", "replace").decode("ascii")


def model_card_lines(result: PipelineResult) -> list[str]:
    """The card line and the input-check line of the result's risk, where given."""
    risk = result.risk
    if risk is None:
        return []
    lines = [] if risk.model_card is None else [model_card_line(risk.model_card)]
    if risk.input_check:
        lines.append(risk.input_check.encode("ascii", "replace").decode("ascii"))
    return lines
