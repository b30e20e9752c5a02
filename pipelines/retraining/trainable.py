"""What a pipeline offers the retraining service: a small protocol and a registry.

A trainable pipeline trains a new candidate version from a :class:`Cohort` (a cohort
folder, the node's stored cases with their labels, or both) into a model store and
returns the held-out evaluation the gate and the report need: the outcomes of the
held-out cases and the risks of the candidate *and of the model in service* on those
same cases (so that DeLong's paired comparison is possible). Each registered name maps to
``"module:Class"``; the class builds itself with ``from_options(options)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from pipelines.base import CaseRecord
from pipelines.evaluation import EvaluationRow

_TRAINABLES: dict[str, str] = {
    "ht_after_mt": "pipelines.ht_after_mt.retrain:HtRetrainer",
}


@dataclass(frozen=True)
class TrainOptions:
    """How hard a retraining run works (``[retraining]`` ``epochs``, ``cnn_input_size``,
    ``test_size``, ``seed``): small values for quick runs on the CPU; a cohort of fewer
    described cases than ``nested_cv_below`` is judged by nested cross-validation with
    ``outer_folds`` outer folds (``pipelines.retraining.nested``)."""

    epochs: int = 3
    cnn_input_size: int = 128
    test_size: float = 0.25
    seed: int = 0
    nested_cv_below: int = 0
    outer_folds: int = 5


@dataclass(frozen=True)
class RecordedCase:
    """A case the node scored and stored (``dicomnode.case_store``), with its label:
    ``case_id`` the study's pseudonymous key, ``patient`` the salted PatientID hash (the
    unit of the split), ``header`` the acquisition facts (``ood.header_facts``)."""

    case_id: str
    patient: str
    label: int
    header: Mapping[str, Any]
    record: CaseRecord


@dataclass(frozen=True)
class Cohort:
    """What a candidate is trained on: a cohort ``folder`` (``cases/<id>/`` and the
    clinical table with the labels), the node's labelled stored ``records``, or both."""

    folder: Path | None = None
    records: tuple[RecordedCase, ...] = ()

    def describe(self) -> str:
        """Where the cases come from, in words."""
        parts = [f"folder {self.folder}"] if self.folder is not None else []
        if self.records:
            parts.append(f"{len(self.records)} labelled cases of the case store")
        return " + ".join(parts) or "no cases"


@dataclass(frozen=True)
class CandidateEvaluation:
    """A newly saved candidate and its held-out evaluation beside the model in service."""

    model_name: str
    version: str
    folder: Path
    notice: str
    held_out_ids: tuple[str, ...]
    y_true: NDArray[np.int_]
    candidate: NDArray[np.float64]
    in_service: NDArray[np.float64] | None
    service_version: str | None
    service_note: str  # why there is no comparison, or how it was made
    table: Sequence[EvaluationRow]
    n_cases: int
    n_train: int
    split: str


class Trainable(Protocol):
    """A pipeline the retraining service can retrain (see the module)."""

    model_name: str
    label_outcome: str  # the outcome of ``dicomnode.labels`` its stored cases train on

    def train_candidate(self, cohort: Cohort, *, version: str, root: Path) -> CandidateEvaluation:
        """Train ``version`` on ``cohort`` into ``root`` and evaluate it on held-out
        patients beside the version in service (promoted, else latest) before it."""
        ...


class TrainableFactory(Protocol):
    """A trainable class: builds itself from the run's options."""

    def from_options(self, options: TrainOptions) -> Trainable:
        """The trainable with these options."""
        ...


def trainable_names() -> list[str]:
    """Names ``[retraining] models`` may list."""
    return sorted(_TRAINABLES)


def get_trainable(name: str, options: TrainOptions) -> Trainable:
    """The trainable registered as ``name``, built with ``options``."""
    try:
        module_name, class_name = _TRAINABLES[name].split(":")
    except KeyError:
        raise KeyError(
            f"no trainable model {name!r}; known: {', '.join(trainable_names())}"
        ) from None
    factory: TrainableFactory = getattr(importlib.import_module(module_name), class_name)
    return factory.from_options(options)
