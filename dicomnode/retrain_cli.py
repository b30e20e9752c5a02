"""The commands of the retraining service and the model lifecycle:

- ``dicomnode retrain --config X [--now]``: the scheduled service (its own process), or
  one run now;
- ``dicomnode labels import|list|confirm|overrule``: outcome labels and their audit
  trail (``dicomnode.labels``);
- ``dicomnode cases list|export|import|prune|key``: the case store (``dicomnode.case_store``)
  and cohort exchange between sites (``dicomnode.case_exchange``);
- ``dicomnode models list|promote|rollback|shadow``: the versions of a model and where
  each stands, promotion (a candidate that failed or skipped the gate needs ``--force``
  and ``--reason``, audited), rollback to the version before, the shadow version.

The running node picks up a promotion, rollback or shadow change at its next job.
"""

from __future__ import annotations

import argparse
import getpass
import signal
import sys
import threading
from pathlib import Path

from dicomnode import labels as label_store
from dicomnode.case_exchange import export_cases, import_cases
from dicomnode.case_store import CaseStoreError, list_cases, prune, study_key
from dicomnode.config import load_config
from dicomnode.retrain import RetrainError, run_once, serve, store_root
from model_store.lifecycle import (
    promote_version,
    rollback,
    set_shadow,
    version_statuses,
)
from model_store.registry import STORE_ROOT, ModelStoreError
from pipelines.retraining.trainable import trainable_names


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def cmd_retrain(args: argparse.Namespace) -> int:
    """Run the retraining schedule until SIGINT/SIGTERM, or once with ``--now``."""
    config = load_config(args.config)
    if args.now:
        try:
            outcomes = run_once(config)
        except RetrainError as exc:
            sys.stderr.write(f"dicomnode retrain: {exc}\n")
            return 2
        for outcome in outcomes:
            verdict = "passed the gate" if outcome.passed else "failed the gate"
            _say(f"{outcome.model} {outcome.version}: {verdict} -> {outcome.action}")
            for reason in outcome.reasons:
                _say(f"  - {reason}")
            _say(f"  report: {outcome.report / 'report.html'}")
        return 0
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve(config, stop)
    except RetrainError as exc:
        sys.stderr.write(f"dicomnode retrain: {exc}\n")
        return 2
    return 0


def _root(args: argparse.Namespace) -> Path:
    if args.root is not None:
        return Path(args.root)
    if args.config is not None:
        return store_root(load_config(args.config), args.model)
    return STORE_ROOT


def cmd_models(args: argparse.Namespace) -> int:
    """List, promote, roll back or shadow versions of one model."""
    root = _root(args)
    by = args.by or getpass.getuser()
    try:
        if args.action == "list":
            for row in version_statuses(args.model, root):
                size = "" if row.training_cases is None else f" {row.training_cases} cases"
                _say(f"{row.version:<10} {row.status:<14} {row.created}{size}")
                for reason in row.reasons:
                    _say(f"           - {reason}")
        elif args.action == "promote":
            promote_version(
                args.model, args.version, root, by=by, reason=args.reason or "", force=args.force
            )
            _say(f"promoted {args.model} {args.version}")
        elif args.action == "rollback":
            back = rollback(args.model, root, by=by, reason=args.reason or "")
            _say(f"rolled {args.model} back to {back}")
        else:
            target = None if args.stop else args.version
            set_shadow(args.model, target, root, by=by, reason=args.reason or "")
            _say(f"{args.model} shadow: {target or 'none'}")
    except ModelStoreError as exc:
        sys.stderr.write(f"dicomnode models: {exc}\n")
        return 2
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    """Import, list, confirm or overrule outcome labels (audited)."""
    state = load_config(args.config).state_dir
    by = args.by or getpass.getuser()
    try:
        if args.action == "import":
            count = label_store.import_labels(state, Path(args.items[0]), by)
            _say(f"imported {count} labels")
        elif args.action == "list":
            for label in label_store.labels(state):
                confidence = "" if label.confidence is None else f" confidence {label.confidence}"
                _say(
                    f"{label.study_key} {label.outcome}={label.value} "
                    f"({label.status}, {label.source}{confidence})"
                )
        elif args.action == "confirm":
            key, outcome = args.items[:2]
            value = label_store.confirm(state, key, outcome, by, args.reason or "")
            _say(f"confirmed {key} {outcome}={value}")
        else:
            key, outcome, value = args.items[:3]
            label_store.overrule(state, key, outcome, int(value), by, args.reason or "")
            _say(f"overruled {key} {outcome}={value}")
    except (label_store.LabelError, ValueError) as exc:
        sys.stderr.write(f"dicomnode labels: {exc}\n")
        return 2
    return 0


def cmd_cases(args: argparse.Namespace) -> int:
    """List, export, import or prune the case store; print a study's key."""
    config = load_config(args.config)
    settings = config.case_store
    if settings is None:
        sys.stderr.write("dicomnode cases: the configuration has no [case_store] section\n")
        return 2
    root = settings.root()
    try:
        if args.action == "list":
            for case in list_cases(root):
                risk = case.prediction or {}
                _say(
                    f"{case.key} {case.pipeline} acquired {case.acquired_at or '-'} "
                    f"{'scored' if case.scored else 'not scored'}"
                    + (
                        f" {risk.get('model_version')} risk {risk.get('probability'):.3f}"
                        if risk
                        else ""
                    )
                )
        elif args.action == "export":
            count = export_cases(root, config.state_dir, Path(args.items[0]), args.items[1:])
            _say(f"exported {count} cases to {args.items[0]}")
        elif args.action == "import":
            by = args.by or getpass.getuser()
            count = import_cases(root, config.state_dir, Path(args.items[0]), by)
            _say(f"imported {count} cases from {args.items[0]}")
        elif args.action == "prune":
            _say(f"removed {prune(settings)} cases")
        else:
            _say(study_key(args.items[0], settings.salt))
    except (CaseStoreError, IndexError, OSError) as exc:
        reason = "missing argument" if isinstance(exc, IndexError) else str(exc)
        sys.stderr.write(f"dicomnode cases: {reason}\n")
        return 2
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``retrain`` and ``models`` to the ``dicomnode`` command line."""
    retrain = sub.add_parser("retrain", help="the retraining service (its own process)")
    retrain.add_argument("--config", type=Path, required=True, help="TOML with [retraining]")
    retrain.add_argument("--now", action="store_true", help="run once now, then exit")
    retrain.set_defaults(handler=cmd_retrain)
    models = sub.add_parser("models", help="model versions: list, promote, rollback, shadow")
    models.add_argument("action", choices=["list", "promote", "rollback", "shadow"])
    models.add_argument("version", nargs="?", help="the version to promote or shadow")
    models.add_argument("--model", choices=trainable_names(), default="ht_after_mt")
    models.add_argument("--config", type=Path, help="TOML naming the model store")
    models.add_argument("--root", type=Path, help="model store folder (overrides --config)")
    models.add_argument("--force", action="store_true", help="promote despite the gate")
    models.add_argument("--reason", help="why (required with --force; audited)")
    models.add_argument("--by", help="who (audited; default: the login name)")
    models.add_argument("--stop", action="store_true", help="shadow: stop the shadow run")
    models.set_defaults(handler=cmd_models)
    labels = sub.add_parser("labels", help="outcome labels: import, list, confirm, overrule")
    labels.add_argument("action", choices=["import", "list", "confirm", "overrule"])
    labels.add_argument(
        "items",
        nargs="*",
        help="import: FILE; confirm: STUDY OUTCOME; overrule: STUDY OUTCOME VALUE",
    )
    labels.add_argument("--config", type=Path, required=True, help="TOML naming the state_dir")
    labels.add_argument("--reason", help="why (required to overrule; audited)")
    labels.add_argument("--by", help="who (audited; default: the login name)")
    labels.set_defaults(handler=cmd_labels)
    cases = sub.add_parser("cases", help="the case store: list, export, import, prune, key")
    cases.add_argument("action", choices=["list", "export", "import", "prune", "key"])
    cases.add_argument(
        "items",
        nargs="*",
        help="export: FILE [KEY ...]; import: FILE; key: STUDY_INSTANCE_UID",
    )
    cases.add_argument("--config", type=Path, required=True, help="TOML with [case_store]")
    cases.add_argument("--by", help="who imports (audited; default: the login name)")
    cases.set_defaults(handler=cmd_cases)
