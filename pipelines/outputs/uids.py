"""Deterministic UIDs for the objects a pipeline writes.

The same source series, pipeline, algorithm version and object kind always give the same
UID, so re-sending a series replaces its outputs in PACS instead of duplicating them; a
new algorithm version gives new UIDs, so its outputs are kept apart from older ones.
"""

from __future__ import annotations

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

UID_PREFIX = PYDICOM_ROOT_UID  # pydicom's root, which pydicom offers for derived UIDs


def derive_uid(*parts: str) -> str:
    """A UID that is a pure function of ``parts`` (order and boundaries included).

    Each part is length-prefixed before hashing, so ("ab", "c") and ("a", "bc") differ.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part to hash")
    seed = "".join(f"{len(part)}:{part};" for part in parts)
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=[seed]))
