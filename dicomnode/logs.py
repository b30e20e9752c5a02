"""Structured JSON logging that never carries patient identifiers.

Bind context explicitly: ``log.bind(study_uid=..., series_uid=..., job_id=...)``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_IDENTIFYING = frozenset(
    {
        "accessionnumber",
        "referringphysicianname",
        "performingphysicianname",
        "operatorsname",
        "institutionname",
        "institutionaddress",
        "birthdate",
    }
)


def _normalise(key: str) -> str:
    """Lower-case a key and drop separators: ``Patient_Name`` -> ``patientname``."""
    return "".join(ch for ch in key.lower() if ch.isalnum())


def is_identifying(key: str) -> bool:
    """Whether a log field could name or identify a patient."""
    norm = _normalise(key)
    return norm.startswith(("patient", "otherpatient", "issuerofpatient")) or norm in _IDENTIFYING


def drop_patient_identifiers(
    logger: object, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: remove every field that could identify a patient."""
    for key in [k for k in event_dict if is_identifying(k)]:
        del event_dict[key]
    return event_dict


def configure_logging(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Log JSON lines to ``stream`` (stderr by default) through the identifier filter.

    Without ``stream``, ``sys.stderr`` is looked up at each log call, so a replaced
    stderr (a test's capture, a daemon's redirect) is honoured.

    pynetdicom's own stdlib logger is held at WARNING: at DEBUG it dumps whole datasets.
    """
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            drop_patient_identifiers,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_: structlog.WriteLogger(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
