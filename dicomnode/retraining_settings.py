"""``[retraining]``: the separate retraining service's schedule, cohort and promotion gate.

Read with the node's config (``dicomnode.config.NodeConfig.retraining``) but used only by
``dicomnode retrain``, its own process: the receiving node never trains. Relative paths
are taken relative to the config file.
"""

from __future__ import annotations

from typing import Annotated

from apscheduler.triggers.cron import CronTrigger
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from pipelines.retraining.trainable import trainable_names
from pipelines.settings import ResolvedPath

SECONDS_FIELDS = 6
"""A schedule with this many fields starts with seconds."""


def cron_trigger(expression: str) -> CronTrigger:
    """The schedule: a 5-field crontab expression (UTC), or 6 fields with seconds first
    (``sec min hour day month day_of_week``, apscheduler's field syntax)."""
    fields = expression.split()
    if len(fields) == SECONDS_FIELDS:
        second, minute, hour, day, month, day_of_week = fields
        return CronTrigger(
            second=second, minute=minute, hour=hour, day=day, month=month,
            day_of_week=day_of_week, timezone="UTC",
        )  # fmt: skip
    return CronTrigger.from_crontab(expression, timezone="UTC")


def _cron(value: str) -> str:
    """A schedule :func:`cron_trigger` accepts."""
    try:
        cron_trigger(value)
    except ValueError as exc:
        raise ValueError(f"not a crontab expression ({exc})") from exc
    return value


def _models(value: list[str]) -> list[str]:
    """Trainable model names only."""
    unknown = [name for name in value if name not in trainable_names()]
    if unknown:
        raise ValueError(f"not trainable: {unknown}; known: {trainable_names()}")
    return value


Cron = Annotated[str, AfterValidator(_cron)]


class RetrainingSettings(BaseModel):
    """``[retraining]`` (see the module and ``deploy/dicomnode.example.toml``).

    ``schedule``: crontab expression, UTC (default Sundays 03:00). ``models``: the
    trainable pipelines to retrain. ``cohort_dir``: the cohort folder (``cases/<id>/``
    and ``clinical.csv`` with the labels). ``use_case_store``: also train on the node's
    stored cases (``[case_store]``) that have a label (imported or derived from follow-up
    CT, which each run derives first). ``nested_cv_below``: a cohort with fewer described
    cases is judged by nested cross-validation (``outer_folds`` outer folds; 0: never).
    ``model_store_dir``: the store candidates are written to and promoted in (default:
    the bundled store). ``report_dir``: where each
    run's report goes (default: ``<state_dir>/retraining``). The gate: ``margin``
    (non-inferiority margin of the AUC), ``slope_min``/``slope_max`` (calibration slope
    bounds), ``min_events`` (held-out events and non-events needed). ``on_pass``: what
    happens to a candidate that passes: ``candidate`` (stays one), ``shadow`` (runs
    beside the model in service) or ``promote``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schedule: Cron = "0 3 * * 0"
    models: Annotated[list[str], AfterValidator(_models)] = ["ht_after_mt"]
    cohort_dir: ResolvedPath = None
    use_case_store: bool = False
    model_store_dir: ResolvedPath = None
    report_dir: ResolvedPath = None
    epochs: int = Field(default=3, ge=1)
    cnn_input_size: int = Field(default=128, ge=32)
    test_size: float = Field(default=0.3, gt=0, le=0.5)
    seed: int = 0
    nested_cv_below: int = Field(default=0, ge=0)
    outer_folds: int = Field(default=5, ge=2, le=10)
    margin: float = Field(default=0.05, ge=0, le=0.5)
    slope_min: float = Field(default=0.5, gt=0)
    slope_max: float = Field(default=2.0, gt=0)
    min_events: int = Field(default=10, ge=1)
    on_pass: str = Field(default="shadow", pattern="^(candidate|shadow|promote)$")

    @model_validator(mode="after")
    def _bounds(self) -> RetrainingSettings:
        """The slope bounds are ordered and a cohort is named."""
        if self.slope_min >= self.slope_max:
            raise ValueError("slope_min must be less than slope_max")
        if self.cohort_dir is None and not self.use_case_store:
            raise ValueError(
                "name the cohort: cohort_dir (a cohort folder), use_case_store = true, or both"
            )
        return self
