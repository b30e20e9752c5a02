"""The retraining service: ``dicomnode retrain``, its own process beside ``serve``.

On the cron schedule of ``[retraining] schedule`` (apscheduler), or once with ``--now``,
each model of ``[retraining] models`` is retrained on the cohort folder into a new
candidate version, evaluated on held-out patients beside the version in service, judged
by the promotion gate (``pipelines.retraining.gate``) and reported (HTML + PNG,
``pipelines.retraining.report``). The verdict is stored beside the candidate
(``model_store.lifecycle``); a candidate that passes stays a candidate, goes into shadow
or is promoted (``[retraining] on_pass``); one that fails stays a candidate with its
reasons.

Crash safety: one run at a time (an exclusive ``flock`` on ``<state_dir>/retrain.lock``,
released by the kernel when the process dies); a version folder appears only once
complete (``model_store.artefacts.save_model``: staging folder, fsync, rename); the
verdict, ``promoted.json`` and the report folder are each written whole or not at all.
A process killed at any point leaves the version in service untouched and at worst a
finished candidate without a verdict, which cannot be promoted without ``--force``;
the next run removes the staging folders a killed run left.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from dicomnode.case_labels import derive_store_labels, labelled_cases
from dicomnode.case_store import CaseStoreError
from dicomnode.config import NodeConfig
from dicomnode.retraining_settings import RetrainingSettings, cron_trigger
from model_store.lifecycle import (
    GateRecord,
    audit,
    clean_staging,
    fsync_dir,
    next_version,
    now_iso,
    promote_version,
    set_shadow,
    write_gate,
)
from model_store.registry import STORE_ROOT
from pipelines.retraining.gate import GatePolicy, evaluate_gate
from pipelines.retraining.report import ReportInputs, write_report
from pipelines.retraining.trainable import (
    CandidateEvaluation,
    Cohort,
    TrainOptions,
    get_trainable,
)

LOCK_FILE = "retrain.lock"
REPORTS = "retraining"
SERVICE_USER = "retraining service"

log = structlog.get_logger(__name__)


class RetrainError(Exception):
    """The retraining service cannot run as configured; the message says why."""


class RetrainBusy(RetrainError):
    """Another retraining run holds the lock."""


@dataclass(frozen=True)
class RunOutcome:
    """One model's retraining: the candidate, the gate's verdict, what was done with it."""

    model: str
    version: str
    passed: bool
    reasons: tuple[str, ...]
    action: str  # "candidate", "shadow" or "promoted"
    report: Path


def retraining(config: NodeConfig) -> RetrainingSettings:
    """The config's ``[retraining]`` section, which ``dicomnode retrain`` needs."""
    if config.retraining is None:
        raise RetrainError("the configuration has no [retraining] section")
    return config.retraining


def store_root(config: NodeConfig, name: str) -> Path:
    """The model store a model is retrained in: ``[retraining] model_store_dir``, else
    its pipeline's ``model_store_dir``, else the bundled store."""
    settings = config.retraining
    if settings is not None and settings.model_store_dir is not None:
        return settings.model_store_dir
    own = getattr(config.pipelines, name, None)
    root = getattr(own, "store_root", None)
    return root if isinstance(root, Path) else STORE_ROOT


def report_root(config: NodeConfig) -> Path:
    """Where the run reports go: ``[retraining] report_dir``, else ``<state_dir>/retraining``."""
    settings = retraining(config)
    return settings.report_dir or config.state_dir / REPORTS


@contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (freed by the kernel if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RetrainBusy(f"another retraining run holds {path}") from None
        yield
    finally:
        os.close(fd)


def _write_report_atomically(inputs: ReportInputs, folder: Path) -> Path:
    """The report written into a staging folder and renamed into ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write_report(inputs, staging)
        os.chmod(staging, 0o755)
        for entry in staging.iterdir():
            os.chmod(entry, 0o644)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
        fsync_dir(folder.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def _policy(settings: RetrainingSettings) -> GatePolicy:
    return GatePolicy(
        margin=settings.margin,
        slope_min=settings.slope_min,
        slope_max=settings.slope_max,
        min_events=settings.min_events,
    )


def build_cohort(config: NodeConfig, name: str, outcome: str) -> Cohort:
    """``[retraining] cohort_dir`` and, with ``use_case_store``, the stored cases of
    ``name`` labelled for ``outcome`` (labels from follow-up CT derived first)."""
    settings = retraining(config)
    if not settings.use_case_store:
        return Cohort(settings.cohort_dir)
    if config.case_store is None:
        raise RetrainError("[retraining] use_case_store needs a [case_store] section")
    root = config.case_store.root()
    try:
        derive_store_labels(root, config.state_dir)
        records = labelled_cases(root, config.state_dir, name, outcome)
    except CaseStoreError as exc:
        raise RetrainError(f"the case store cannot be read: {exc}") from exc
    return Cohort(settings.cohort_dir, records)


def retrain_model(config: NodeConfig, name: str) -> RunOutcome:
    """Retrain, judge, report and act on one model (see the module)."""
    settings = retraining(config)
    root = store_root(config, name)
    removed = clean_staging(name, root)
    if removed:
        log.warning("removed staging left by an interrupted run", model=name, entries=removed)
    version = next_version(name, root)
    options = TrainOptions(
        epochs=settings.epochs,
        cnn_input_size=settings.cnn_input_size,
        test_size=settings.test_size,
        seed=settings.seed,
        nested_cv_below=settings.nested_cv_below,
        outer_folds=settings.outer_folds,
    )
    log.info("retraining started", model=name, version=version, store=str(root))
    trainable = get_trainable(name, options)
    cohort = build_cohort(config, name, trainable.label_outcome)
    log.info("cohort", model=name, source=cohort.describe())
    evaluation: CandidateEvaluation = trainable.train_candidate(cohort, version=version, root=root)
    log.info("candidate saved", model=name, version=version, held_out=len(evaluation.y_true))
    policy = _policy(settings)
    decision = evaluate_gate(evaluation.y_true, evaluation.candidate, evaluation.in_service, policy)
    metrics = {
        **decision.metrics,
        "service_version": evaluation.service_version,
        "service_note": evaluation.service_note,
        "n_cases": evaluation.n_cases,
        "n_train": evaluation.n_train,
    }
    write_gate(
        name, GateRecord(version, decision.passed, decision.reasons, metrics, now_iso()), root
    )
    report = _write_report_atomically(
        ReportInputs(
            model_name=name,
            version=version,
            notice=evaluation.notice,
            y_true=evaluation.y_true,
            candidate=evaluation.candidate,
            in_service=evaluation.in_service,
            service_version=evaluation.service_version,
            table=evaluation.table,
            gate=decision,
            min_events=policy.min_events,
            n_train=evaluation.n_train,
            n_cases=evaluation.n_cases,
            split=evaluation.split,
        ),
        report_root(config) / name / version,
    )
    action = "candidate"
    if decision.passed and settings.on_pass == "promote":
        promote_version(name, version, root, by=SERVICE_USER, reason="passed the gate")
        action = "promoted"
    elif decision.passed and settings.on_pass == "shadow":
        set_shadow(name, version, root, by=SERVICE_USER, reason="passed the gate")
        action = "shadow"
    audit(
        name, "retrained", root, version=version, by=SERVICE_USER, passed=decision.passed,
        reasons=list(decision.reasons), outcome=action,
    )  # fmt: skip
    log.info(
        "retraining finished", model=name, version=version, passed=decision.passed,
        reasons=list(decision.reasons), action=action,
    )  # fmt: skip
    return RunOutcome(name, version, decision.passed, decision.reasons, action, report)


def run_once(config: NodeConfig) -> list[RunOutcome]:
    """One retraining run of every configured model, under the run lock."""
    settings = retraining(config)
    with run_lock(config.state_dir / LOCK_FILE):
        return [retrain_model(config, name) for name in settings.models]


def _scheduled_run(config: NodeConfig, done: threading.Event | None) -> None:
    """One scheduled run; its failure is logged and the schedule goes on."""
    try:
        run_once(config)
    except RetrainBusy as exc:
        log.warning("scheduled retraining skipped", reason=str(exc))
    except (RetrainError, ValueError, OSError, KeyError, RuntimeError) as exc:
        log.error("scheduled retraining failed", reason=f"{type(exc).__name__}: {exc}")
    finally:
        if done is not None:
            done.set()


def serve(config: NodeConfig, stop: threading.Event, ran: threading.Event | None = None) -> None:
    """Run the schedule until ``stop`` is set (``ran`` is set after each run)."""
    settings = retraining(config)
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(
        _scheduled_run, cron_trigger(settings.schedule), args=(config, ran),
        id="retrain", max_instances=1, coalesce=True, misfire_grace_time=3600,
    )  # fmt: skip
    scheduler.start()
    log.info("retraining scheduled", schedule=settings.schedule, models=settings.models)
    try:
        stop.wait()
    finally:
        scheduler.shutdown(wait=False)
