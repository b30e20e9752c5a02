"""Structured JSON logging that never carries patient identifiers.

Bind context explicitly: ``log.bind(study_uid=..., series_uid=..., job_id=...)``.

Every line the process logs goes through one handler on the root stdlib logger, whose
``structlog.stdlib.ProcessorFormatter`` applies the same filters to all of them: the
node's own structlog events, every library's stdlib logging (pydicom, highdicom,
pynetdicom, MONAI...), Python warnings (``warnings.showwarning`` is replaced) and
uncaught exceptions (``sys.excepthook``, ``threading.excepthook``). The filters drop
identifying keys (:func:`drop_patient_identifiers`) and scrub identifying values and raw
dataset bytes from every remaining field, formatted tracebacks included
(:func:`scrub_identifying_values`, see :mod:`dicomnode.phi`). Each record is one JSON line.
"""

from __future__ import annotations

import atexit
import datetime
import io
import json
import logging
import re
import sys
import threading
import types
import warnings
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

from dicomnode import phi

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
# Fields the pipeline itself writes: never identifying, so never scrubbed.
_UNSCRUBBED_FIELDS = frozenset({"level", "timestamp", "logger"})
WARNING_EVENT = "library warning"
STDERR_EVENT = "stderr output"
UNFORMATTABLE_EVENT = "log line dropped: it could not be formatted and scrubbed"
OWN_LOGGERS = ("dicomnode", "pipelines", "model_store", "__main__")
UNCAUGHT_EVENT = "uncaught exception"

log = structlog.get_logger(__name__)
_warnings_log = structlog.get_logger("py.warnings")


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


def _scrubbed(value: object) -> object:
    """A JSON-ready copy of a field value with identifiers and raw bytes scrubbed.

    Strings are scrubbed, containers recursively; bytes become a placeholder; any other
    object is rendered with ``str`` first (the JSON renderer would otherwise ``repr`` it,
    unscrubbed).
    """
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return phi.scrub(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return phi.BYTES_REDACTED
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrubbed(v) for v in value]
    if isinstance(value, dict):
        return {phi.scrub(str(k)): _scrubbed(v) for k, v in value.items()}
    return phi.scrub(str(value))


def scrub_identifying_values(
    logger: object, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: scrub identifying values and raw bytes from every field."""
    for key, value in event_dict.items():
        if key not in _UNSCRUBBED_FIELDS:
            event_dict[key] = _scrubbed(value)
    return event_dict


class JsonStderr(io.TextIOBase):
    """A stand-in for ``sys.stderr`` that turns whatever is written to it outside the log
    pipeline into JSON lines: a library's own ``StreamHandler`` (pyradiomics installs
    one), a stray ``print(..., file=sys.stderr)``, a start-up error message. Each line
    becomes ``{"event": "stderr output", "text": <scrubbed line>, ...}``.

    Writes to file descriptor 2 from C code do not pass through Python and are not seen.
    """

    def __init__(self, target: TextIO) -> None:
        """Write the JSON lines to ``target`` (the real stderr)."""
        super().__init__()
        self.target = target
        self._pending = ""
        self._lock = threading.Lock()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        """The encoding of the real stderr."""
        return str(getattr(self.target, "encoding", "utf-8"))

    def writable(self) -> bool:
        """Always writable."""
        return True

    def fileno(self) -> int:
        """The real stderr's descriptor (for subprocesses and ``faulthandler``)."""
        return self.target.fileno()

    def write(self, text: str) -> int:
        """Buffer ``text``; emit each complete line as one JSON object."""
        with self._lock:
            self._pending += text
            *lines, self._pending = self._pending.split("\n")
            for line in lines:
                self._emit(line)
        return len(text)

    def flush(self) -> None:
        """Emit a pending partial line, then flush the real stderr (unless it is closed:
        this also runs at exit)."""
        if getattr(self.target, "closed", False):
            return
        with self._lock:
            if self._pending:
                self._emit(self._pending)
                self._pending = ""
        self.target.flush()

    def _emit(self, line: str) -> None:
        """One JSON line for one line of text (blank lines are dropped)."""
        if not line.strip():
            return
        record = {
            "event": STDERR_EVENT,
            "text": phi.scrub(line.rstrip("\r")),
            "level": "warning",
            "logger": "stderr",
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z"),
        }
        self.target.write(json.dumps(record) + "\n")


def _real_stream(stream: TextIO | None) -> TextIO:
    """Where log lines go: ``stream`` or the current stderr, past a :class:`JsonStderr`."""
    target = stream or sys.stderr
    return target.target if isinstance(target, JsonStderr) else target


class JsonLineHandler(logging.Handler):
    """Write each formatted record as one line to ``stream``, or to the ``sys.stderr`` of
    the moment (so a replaced stderr, a test's capture or a daemon's redirect, is used)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        """Write to ``stream``; ``None`` means the current ``sys.stderr``."""
        super().__init__()
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        """Format and write one record.

        A record that cannot be formatted (so cannot be scrubbed) is replaced by a fixed
        line naming its logger and the error: it is never written raw, and the failure
        never reaches the caller (a C-STORE handler, an association's thread). Errors
        writing to the stream go to ``handleError``.
        """
        try:
            line = self.format(record)
        except (ValueError, TypeError, RecursionError, re.error) as exc:
            line = unformattable_line(record, exc)
        try:
            stream = _real_stream(self._stream)
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            self.handleError(record)


def unformattable_line(record: logging.LogRecord, exc: BaseException) -> str:
    """The JSON line written instead of a record that could not be formatted."""
    return json.dumps(
        {
            "event": UNFORMATTABLE_EVENT,
            "error": type(exc).__name__,
            "level": "error",
            "logger": record.name,
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z"),
        }
    )


class LibraryLevelFilter(logging.Filter):
    """Let through structlog events (already filtered by level), this project's stdlib
    records from ``level`` up, and other libraries' records from WARNING (or ``level``)."""

    def __init__(self, level: int) -> None:
        """Filter against ``level``."""
        super().__init__()
        self.level = level
        self.library_level = max(logging.WARNING, level)

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is written."""
        if isinstance(record.msg, dict):  # from structlog, through wrap_for_formatter
            return True
        if record.name.split(".", 1)[0] in OWN_LOGGERS:
            return record.levelno >= self.level
        return record.levelno >= self.library_level


def _formatter() -> structlog.stdlib.ProcessorFormatter:
    """The one formatter: drop identifying keys, render tracebacks, scrub, JSON."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            drop_patient_identifiers,
            structlog.processors.format_exc_info,
            scrub_identifying_values,
            structlog.processors.JSONRenderer(),
        ],
    )


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` replacement: log the warning as one (scrubbed) JSON line."""
    _warnings_log.warning(
        WARNING_EVENT, category=category.__name__, warning=str(message),
        origin=f"{Path(filename).name}:{lineno}",
    )  # fmt: skip


def _uncaught(
    exc_type: type[BaseException],
    exc_value: BaseException,
    traceback: types.TracebackType | None,
) -> None:
    """``sys.excepthook`` replacement: log the traceback as one (scrubbed) JSON line."""
    log.critical(UNCAUGHT_EVENT, exc_info=(exc_type, exc_value, traceback))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook`` replacement: log the traceback and the thread's name."""
    if args.exc_value is None:
        return
    log.critical(
        UNCAUGHT_EVENT, thread=args.thread.name if args.thread else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )  # fmt: skip


def configure_logging(
    level: int = logging.INFO, stream: TextIO | None = None, *, guard_stderr: bool = False
) -> None:
    """Log JSON lines to ``stream`` (stderr by default) through the identifier filters.

    Without ``stream``, ``sys.stderr`` is looked up at each log call, so a replaced
    stderr (a test's capture, a daemon's redirect) is honoured. Calling it again replaces
    the previous configuration.

    ``level`` applies to structlog loggers and to this project's stdlib loggers
    (:data:`OWN_LOGGERS`); other libraries log from WARNING up, or from ``level`` when it
    is higher (:class:`LibraryLevelFilter`: highdicom's INFO lines, one per copied module,
    would otherwise flood the log). pynetdicom's own stdlib logger is held
    at WARNING even at DEBUG: there it dumps whole datasets.

    With ``guard_stderr``, ``sys.stderr`` is replaced by a :class:`JsonStderr`, so that
    text written to it by anything else also comes out as scrubbed JSON lines (for the
    unattended commands; not for interactive ones that draw progress bars).
    """
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handler = JsonLineHandler(stream)
    handler.setFormatter(_formatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, JsonLineHandler)]:
        root.removeHandler(old)
    handler.addFilter(LibraryLevelFilter(level))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, level))
    logging.captureWarnings(False)
    warnings.showwarning = _show_warning
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread
    if guard_stderr and not isinstance(sys.stderr, JsonStderr):
        sys.stderr = JsonStderr(sys.stderr)
        atexit.register(sys.stderr.flush)
