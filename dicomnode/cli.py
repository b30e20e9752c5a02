"""The ``dicomnode`` command: serve, run, echo, demo, train, deliveries, jobs."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from dicomnode import admin
from dicomnode.config import ConfigError, NodeConfig, default_config, load_config
from dicomnode.demo import describe, run_demo, shared_dir
from dicomnode.echo import echo
from dicomnode.logs import configure_logging
from dicomnode.node import Node
from dicomnode.offline import non_dicom_files, run_folder
from dicomnode.phi import scrub
from dicomnode.pipelines_check import check_pipelines_at_start
from dicomnode.processing import JobFailure, check_pipelines, processor, reporting
from dicomnode.retrain_cli import add_commands as add_retraining_commands
from dicomnode.startup import StartupError
from pipelines.registry import pipeline_names

# Run as a command (not called from Python with arguments), these keep stderr all JSON.
UNATTENDED_COMMANDS = frozenset({"serve", "run", "worker", "retrain"})


def _say(line: str = "") -> None:
    """Write one line of the command's own output to stdout (logs go to stderr), without
    any identifier the process has seen (reasons quote library errors)."""
    sys.stdout.write(scrub(line) + "\n")
    sys.stdout.flush()


def _config(path: Path | None) -> NodeConfig:
    """The config file's settings, or the embedded defaults; pipelines are checked."""
    config = load_config(path) if path else default_config(Path("var"), 11112)
    check_pipelines([config.default_pipeline, *(rule.pipeline for rule in config.routes)])
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node until SIGINT or SIGTERM."""
    config = _config(args.config)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if config.celery is not None:  # the workers build and check the pipelines
        from dicomnode.distributed import celery_processor

        with Node(config, celery_processor(config), reporting()):
            _say(f"{config.node.ae_title} listening on {config.node.host}:{config.node.port}")
            _say(f"jobs go to the Celery workers of queue {config.celery.queue!r}")
            stop.wait()
        return 0
    plan = check_pipelines_at_start(config)
    with Node(config, processor(config, plan=plan), reporting(), pipelines=plan.to_json):
        _say(f"{config.node.ae_title} listening on {config.node.host}:{config.node.port}")
        stop.wait()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a Celery worker that takes the node's jobs (scale-out, ``[celery]``)."""
    from dicomnode.distributed import run_worker

    config = _config(args.config)
    if config.celery is None:
        raise StartupError(f"{args.config}: dicomnode worker needs a [celery] section")
    check_pipelines_at_start(config)
    run_worker(config, args.hostname)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Route and process a folder offline; write outputs to ``--out``."""
    config = _config(args.config)
    outcomes = run_folder(args.folder, args.out, config, check_pipelines_at_start(config))
    for path in non_dicom_files(args.folder):
        _say(f"skipped   {path} (not a DICOM instance)")
    for outcome in outcomes:
        _say(
            f"{outcome.decision:<9} series {outcome.series_instance_uid} "
            f"({outcome.instances} instances): {outcome.reason}"
        )
        for path in outcome.outputs:
            _say(f"          wrote {path}")
    return 1 if any(o.decision == "failed" for o in outcomes) else 0


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a peer; exit status 0 when it answered Success."""
    result = echo(args.host, args.port, args.aet, args.calling_aet)
    outcome = "success" if result else f"FAILED: {result.reason}"
    _say(f"C-ECHO {args.aet}@{args.host}:{args.port} as {args.calling_aet}: {outcome}")
    return 0 if result else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Send a head CT with a lesion to a node and show where each result went."""
    settings = _config(args.config) if args.config else None
    report = run_demo(
        args.out.resolve(), args.shared or shared_dir(), settings=settings, pipeline=args.pipeline
    )
    _say(f"case: {report.case.description}")
    if report.case.lesion_volume_ml is not None:
        _say(f"inserted lesion volume: {report.case.lesion_volume_ml:.1f} mL")
    _say(f"node listened on 127.0.0.1:{report.node_port}; results sent to the demo PACS:")
    for path in report.results:
        _say(f"  {describe(path)}")
    if not report.idle:
        _say("the demo timed out before all results arrived")
        return 1
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a risk model on a cohort folder (optionally generated first) into the store."""
    from tqdm import tqdm

    from model_store.registry import STORE_ROOT, ModelStoreError, promote
    from pipelines.base import PipelineError
    from pipelines.cohort import generate_cohort
    from pipelines.ht_after_mt.train import TrainingSettings, train_ht_model
    from pipelines.volume import VolumeLoadError

    root = args.root or STORE_ROOT
    if args.generate:
        _say(f"generating a synthetic cohort of {args.generate} cases in {args.cohort}")
        generate_cohort(args.cohort, args.generate, args.seed, rows=args.rows)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="step", file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    try:
        report = train_ht_model(
            args.cohort,
            root=root,
            version=args.version,
            seed=args.seed,
            progress=progress,
            settings=TrainingSettings(epochs=args.epochs),
        )
    except (ModelStoreError, PipelineError, VolumeLoadError, ValueError, OSError) as exc:
        sys.stderr.write(f"dicomnode train: {exc}\n")
        return 2
    finally:
        for bar in bars.values():
            bar.close()
    _say(f"wrote {report.folder} (report: {report.report_path})")
    _say(
        f"{report.n_cases} cases with a lesion ({len(report.skipped)} without left out): "
        f"{report.n_train} training, {report.n_test} held out"
    )
    _say(report.table.rstrip("\n"))
    if args.promote:
        promote(args.model, args.version, root)
        _say(f"promoted {args.model} {args.version}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="dicomnode", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="log level (logs go to stderr)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the DICOM node")
    serve.add_argument("--config", type=Path, required=True, help="TOML configuration file")
    serve.set_defaults(handler=cmd_serve)
    worker = sub.add_parser("worker", help="run pipeline jobs for a node (Celery worker)")
    worker.add_argument("--config", type=Path, required=True, help="TOML with a [celery] section")
    worker.add_argument("--hostname", help="Celery node name (default: celery@<host>)")
    worker.set_defaults(handler=cmd_worker)
    run = sub.add_parser("run", help="process a folder of DICOM files offline")
    run.add_argument("folder", type=Path)
    run.add_argument("--out", type=Path, required=True, help="folder for the output objects")
    run.add_argument("--config", type=Path, help="TOML configuration (routing rules)")
    run.set_defaults(handler=cmd_run)
    ping = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    ping.add_argument("--host", default="127.0.0.1")
    ping.add_argument("--port", type=int, default=11112)
    ping.add_argument("--aet", default="DICOMNODE", help="called AE title")
    ping.add_argument("--calling-aet", default="ECHOSCU")
    ping.set_defaults(handler=cmd_echo)
    demo = sub.add_parser("demo", help="end-to-end demo on loopback")
    demo.add_argument("--out", type=Path, default=Path("demo-output"))
    demo.add_argument(
        "--config", type=Path, help="TOML configuration whose [pipelines] settings to use"
    )
    demo.add_argument(
        "--pipeline",
        choices=pipeline_names(),
        help="route the demo case to this pipeline (default: the config's head-CT rule)",
    )
    demo.add_argument(
        "--shared", type=Path, help="folder with the real head CT data (default: ../shared)"
    )
    demo.set_defaults(handler=cmd_demo)
    train = sub.add_parser("train", help="train a risk model on a cohort folder")
    train.add_argument("cohort", type=Path, help="cohort folder: cases/<id>/ and clinical.csv")
    train.add_argument("--model", choices=["ht_after_mt"], default="ht_after_mt")
    train.add_argument("--version", required=True, help="new model version, e.g. 1.1.0")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--generate", type=int, metavar="N", help="first generate N synthetic cases")
    train.add_argument("--rows", type=int, default=128, help="image size of generated cases")
    train.add_argument("--root", type=Path, help="model store folder (default: the bundled one)")
    train.add_argument("--epochs", type=int, default=3, help="CNN fine-tuning epochs")
    train.add_argument("--promote", action="store_true", help="put the new version in service")
    train.set_defaults(handler=cmd_train)
    admin.register(sub, _say)
    add_retraining_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dicomnode`` console script."""
    args = build_parser().parse_args(argv)
    configure_logging(
        logging.getLevelNamesMapping()[args.log_level.upper()],
        guard_stderr=argv is None and args.command in UNATTENDED_COMMANDS,
    )
    try:
        return int(args.handler(args))
    except (ConfigError, JobFailure, StartupError) as exc:
        sys.stderr.write(f"dicomnode: {exc}\n")
        return 2
    except (FileNotFoundError, ValueError) as exc:  # deliveries/jobs: no database, bad age
        if args.command not in admin.COMMANDS:
            raise
        sys.stderr.write(f"dicomnode {args.command}: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
