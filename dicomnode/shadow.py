"""Shadow runs: a candidate version runs beside the model in service, its predictions
are recorded, nothing it makes is sent.

After each job of a pipeline whose model has a shadow version
(``dicomnode models shadow VERSION``, ``model_store.lifecycle``), :func:`run_shadow`
builds the same pipeline pinned to the shadow version, runs it on the job's series and
appends one JSON line to ``<state_dir>/shadow/<pipeline>.jsonl``: when, the series UID,
the versions in service and in shadow, and the shadow's risk and cut-off. A shadow that
fails is logged and never fails the job; its outputs are never written or sent.

In scale-out mode (``dicomnode.distributed``) the shadow runs on a Celery worker, with
the worker's model store: :func:`shadow_prediction` there, :func:`append_record` on the
node, the same line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from dicomnode.config import NodeConfig
from model_store.lifecycle import shadow_version
from model_store.registry import ModelStoreError, select_version
from pipelines.base import PipelineError
from pipelines.registry import get_pipeline
from pipelines.settings import PipelinesSettings, StoredModelSettings
from pipelines.volume import VolumeLoadError, load_series

SHADOW_DIR = "shadow"
RECORD_FIELDS = frozenset(
    {"at", "series_uid", "pipeline", "in_service", "shadow", "probability", "cutoff", "high_risk"}
)
"""The fields of one recorded shadow prediction, in-process and from a Celery worker."""

log = structlog.get_logger(__name__)


def shadow_settings(name: str, settings: PipelinesSettings) -> tuple[PipelinesSettings, str] | None:
    """``settings`` with pipeline ``name`` pinned to its model's shadow version, and that
    version; None when the pipeline has no stored model or no shadow."""
    own = getattr(settings, name, None)
    if not isinstance(own, StoredModelSettings) or own.version is not None:
        return None
    try:
        version = shadow_version(name, own.store_root)
    except ModelStoreError as exc:
        log.warning("shadow record unreadable", pipeline=name, reason=str(exc))
        return None
    if version is None:
        return None
    pinned = own.model_copy(update={"version": version})
    return settings.model_copy(update={name: pinned}), version


def record_path(state_dir: Path, name: str) -> Path:
    """Where the shadow predictions of pipeline ``name`` are recorded."""
    return state_dir / SHADOW_DIR / f"{name}.jsonl"


def read_records(state_dir: Path, name: str) -> list[dict[str, Any]]:
    """The recorded shadow predictions of ``name``, oldest first."""
    path = record_path(state_dir, name)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class ShadowFailure(Exception):
    """The shadow version could not run on a series; the message says why."""

    def __init__(self, version: str, reason: str) -> None:
        """The failure of shadow ``version``, with its ``reason``."""
        super().__init__(reason)
        self.version = version


def shadow_prediction(
    name: str, settings: PipelinesSettings, paths: Sequence[Path]
) -> dict[str, Any] | None:
    """Run the shadow version of ``name`` (its model store as ``settings`` name it) on the
    series ``paths``: the record of its prediction (:data:`RECORD_FIELDS`), None when the
    model has no shadow; ``ShadowFailure`` when it cannot run. Writes nothing."""
    pinned = shadow_settings(name, settings)
    if pinned is None:
        return None
    shadow, version = pinned
    own = getattr(settings, name)
    try:
        series = load_series(list(paths))
        result = get_pipeline(name, shadow).run(series)
        in_service = select_version(name, own.store_root)
    except (PipelineError, VolumeLoadError, ModelStoreError, OSError, ValueError) as exc:
        raise ShadowFailure(version, str(exc)) from exc
    risk = result.risk
    return {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "series_uid": str(series.reference.get("SeriesInstanceUID", "")),
        "pipeline": name,
        "in_service": in_service,
        "shadow": version,
        "probability": None if risk is None else round(risk.probability, 6),
        "cutoff": None if risk is None else round(risk.cutoff, 6),
        "high_risk": None if risk is None else risk.high_risk,
    }


def append_record(state_dir: Path, name: str, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to the shadow predictions of ``name``
    (``ValueError`` unless it has exactly the fields of :data:`RECORD_FIELDS`)."""
    if set(record) != RECORD_FIELDS:
        raise ValueError(f"a shadow record has the fields {sorted(RECORD_FIELDS)}, "
                         f"not {sorted(record)}")  # fmt: skip
    path = record_path(state_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    log.info("shadow prediction recorded", pipeline=name, shadow=record["shadow"])


def run_shadow(config: NodeConfig, name: str, paths: Sequence[Path]) -> dict[str, Any] | None:
    """Run the shadow version of ``name`` on the series ``paths`` and record its risk;
    returns the record (None when there is no shadow or it failed, which is logged)."""
    try:
        record = shadow_prediction(name, config.pipelines, paths)
    except ShadowFailure as exc:
        log.warning("shadow run failed", pipeline=name, shadow=exc.version, reason=str(exc))
        return None
    if record is not None:
        append_record(config.state_dir, name, record)
    return record
