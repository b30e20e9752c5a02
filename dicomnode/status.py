"""DIMSE status codes the node answers or interprets (PS3.4 Annex B, PS3.7 Annex C)."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """Named DIMSE status codes; never write the numbers inline."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    CANNOT_UNDERSTAND_UNDECODABLE = 0xC210
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENT_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007


WARNING_STATUSES = frozenset(
    {
        Status.COERCION_OF_DATA_ELEMENTS,
        Status.ELEMENT_DISCARDED,
        Status.DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
    }
)


def is_stored(code: int) -> bool:
    """Whether a C-STORE response status means the peer kept the instance."""
    return code == Status.SUCCESS or code in WARNING_STATUSES
