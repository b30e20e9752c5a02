"""DIMSE status codes the node answers or interprets (PS3.4 Annex B, PS3.7 Annex C).

Every C-STORE refusal has its own code, named here and described in
:data:`STATUS_MEANINGS`; README.md's "C-STORE statuses" table is rendered from it by
:func:`status_table_markdown` (a test keeps the two equal).
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """Named DIMSE status codes; never write the numbers inline."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    OUT_OF_RESOURCES = 0xA700
    OUT_OF_RESOURCES_DECODED_SIZE = 0xA701
    OUT_OF_RESOURCES_INFLATED_SIZE = 0xA702
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    SOP_CLASS_DIFFERS_FROM_CONTEXT = 0xA901
    MODALITY_DOES_NOT_MATCH_SOP_CLASS = 0xA902
    PIXEL_DATA_MISSING = 0xA903
    IMAGE_PIXEL_MODULE_INCONSISTENT = 0xA904
    RESCALE_INVALID = 0xA905
    CANNOT_UNDERSTAND = 0xC000
    CANNOT_UNDERSTAND_UNDECODABLE = 0xC210
    PIXEL_DATA_LENGTH_MISMATCH = 0xC211
    PIXEL_DATA_EMPTY = 0xC212
    PIXEL_DATA_ENCAPSULATION_INVALID = 0xC213
    DEFLATE_STREAM_INVALID = 0xC214
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENT_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007


DESTINATION_WARNING = "Not answered; read in responses from destinations (warning: stored)"

STATUS_MEANINGS: dict[Status, str] = {
    Status.SUCCESS: (
        "Stored: flushed to disk in the ingest journal (spooled and recorded right after), "
        "or without the journal spooled, fsynced and recorded. Also answered, without "
        "rewriting anything, when the same SOP Instance UID is re-sent with identical bytes"
    ),
    Status.PROCESSING_FAILURE: "The spool or the database failed for a reason other than space",
    Status.DUPLICATE_SOP_INSTANCE: (
        "The SOP Instance UID is already stored in another series or study; the stored "
        "instance is kept where it is"
    ),
    Status.OUT_OF_RESOURCES: (
        "The disk (spool or database) is full, or its free space is below "
        "`limits.min_free_bytes` (new associations are then rejected, transient)"
    ),
    Status.OUT_OF_RESOURCES_DECODED_SIZE: (
        "Rows x Columns x Samples x Frames x bytes per sample exceeds `limits.max_decoded_bytes`"
    ),
    Status.OUT_OF_RESOURCES_INFLATED_SIZE: (
        "A Deflated Explicit VR Little Endian dataset inflates beyond "
        "`limits.max_inflated_bytes` (refused before it is inflated in memory)"
    ),
    Status.DATASET_DOES_NOT_MATCH_SOP_CLASS: (
        "Study, Series or SOP Instance UID missing, longer than 64 characters or not "
        "digits and dots"
    ),
    Status.SOP_CLASS_DIFFERS_FROM_CONTEXT: (
        "SOP Class UID missing or not the presentation context's abstract syntax"
    ),
    Status.MODALITY_DOES_NOT_MATCH_SOP_CLASS: (
        "Modality missing or not the one the SOP class requires (CT for CT classes, MR for MR)"
    ),
    Status.PIXEL_DATA_MISSING: "An image SOP class without Pixel Data",
    Status.IMAGE_PIXEL_MODULE_INCONSISTENT: (
        "Rows, Columns, Bits Allocated/Stored, High Bit, Pixel Representation, Samples per "
        "Pixel, Photometric Interpretation or Number of Frames missing, out of range or "
        "inconsistent with each other"
    ),
    Status.RESCALE_INVALID: (
        "Rescale Slope or Intercept (top level or per-frame functional groups) not a single "
        "finite number, slope zero or negative, or so large that rescaled values overflow"
    ),
    Status.CANNOT_UNDERSTAND: "Reserved: not answered by the node",
    Status.CANNOT_UNDERSTAND_UNDECODABLE: (
        "The dataset cannot be parsed (truncated bytes, bad VR or length, malformed value)"
    ),
    Status.PIXEL_DATA_LENGTH_MISMATCH: (
        "Native Pixel Data length differs from what the Image Pixel attributes require "
        "(one padding byte allowed)"
    ),
    Status.PIXEL_DATA_EMPTY: "Pixel Data present with zero length",
    Status.PIXEL_DATA_ENCAPSULATION_INVALID: (
        "Compressed transfer syntax without encapsulated Pixel Data, malformed items, an "
        "empty fragment, fewer fragments than frames, or an inconsistent Basic or "
        "Extended Offset Table; or encapsulated Pixel Data in a native syntax"
    ),
    Status.DEFLATE_STREAM_INVALID: "A deflated dataset whose stream is corrupt or cut short",
    Status.COERCION_OF_DATA_ELEMENTS: DESTINATION_WARNING,
    Status.ELEMENT_DISCARDED: DESTINATION_WARNING,
    Status.DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING: DESTINATION_WARNING,
}

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


def status_table_markdown() -> str:
    """The README table of every status: code, name and why the node answers it."""
    lines = ["| Status | Name | When |", "|---|---|---|"]
    for status in Status:
        lines.append(f"| `0x{status:04X}` | `{status.name}` | {STATUS_MEANINGS[status]} |")
    return "\n".join(lines)
