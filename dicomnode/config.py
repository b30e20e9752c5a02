"""The node's one typed configuration, read from a TOML file and validated by pydantic.

Relative ``spool_dir`` and ``state_dir`` in a file are taken relative to that file, and so
are the folders and files of the pipelines' settings (``[pipelines.<name>]``,
``pipelines.settings``).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from dicomnode.case_store import CaseStoreSettings
from dicomnode.completeness import CompletenessSettings
from dicomnode.door import AssociationLimits
from dicomnode.journal import JournalSettings
from dicomnode.retraining_settings import RetrainingSettings
from dicomnode.tls import ClientTls, ServerTls
from pipelines.settings import PipelinesSettings


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` lists ``path: reason`` lines."""

    def __init__(self, source: str, problems: list[str]) -> None:
        """Keep the problems and build a message listing each one."""
        self.problems = problems
        super().__init__(f"invalid configuration {source}:\n  " + "\n  ".join(problems))


def _check_ae_title(value: str) -> str:
    """An AE title: 1-16 characters, no backslash or control characters, not blank."""
    if not value.strip() or len(value) > 16:
        raise ValueError("AE title must be 1 to 16 characters and not blank")
    if any(ch == "\\" or ord(ch) < 0x20 or ord(ch) > 0x7E for ch in value):
        raise ValueError("AE title must be printable ASCII without backslash")
    return value.strip()


def _check_regex(value: str | None) -> str | None:
    """A Python regular expression that compiles."""
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from exc
    return value


def _as_list(value: object) -> object:
    """Accept one string where a list of strings is expected."""
    return [value] if isinstance(value, str) else value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Regex = Annotated[str | None, AfterValidator(_check_regex)]
Port = Annotated[int, Field(ge=1, le=65535)]
OneOrMore = Annotated[list[str] | None, BeforeValidator(_as_list)]


class _Model(BaseModel):
    """Base for every config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class NodeSettings(_Model):
    """The node's own Application Entity and where it listens."""

    ae_title: AETitle = "DICOMNODE"
    host: str = "0.0.0.0"
    port: Port = 11112
    max_pdu: int = Field(default=131072, ge=0)
    connections: AssociationLimits = AssociationLimits()
    tls: ServerTls | None = None
    journal: JournalSettings = JournalSettings()


class AllowedCaller(_Model):
    """A peer allowed to open associations; ``host`` pins its address when given."""

    ae_title: AETitle
    host: str | None = None


class Destination(_Model):
    """A storage SCP results are sent to."""

    ae_title: AETitle
    host: str
    port: Port
    tls: ClientTls | None = None


class RouteMatch(_Model):
    """Conditions on a series; all given must hold, string equality ignores case."""

    modality: OneOrMore = None
    body_part_examined: OneOrMore = None
    series_description: Regex = None
    protocol_name: Regex = None
    image_type_contains: OneOrMore = None
    calling_ae_title: OneOrMore = None
    called_ae_title: OneOrMore = None


class StudyRole(_Model):
    """How a series of a study is recognised in one role of a study-level rule (e.g. the
    ``dwi`` of an MRI study); every condition given must hold, on the series' first
    instance. ``diffusion_b_value``: DiffusionBValue (top level or in the MR Diffusion
    functional group), within 1 s/mm2. ``required = false``: the study is processed
    without it once it has been quiet for the rule's ``study_stable_age_s``."""

    required: bool = True
    modality: OneOrMore = None
    series_description: Regex = None
    sequence_name: Regex = None
    image_type_contains: OneOrMore = None
    diffusion_b_value: float | None = None


class RouteRule(_Model):
    """Series matching ``match`` go to ``pipeline``; its results to ``destinations``.

    ``level = "study"``: the series of one study that fill the rule's ``roles``
    (``dicomnode.studies``) make ONE job, queued when every required role's series is
    complete and either every role is present or the study has received nothing for
    ``study_stable_age_s``; the job's pipeline reads them by role.
    """

    name: str = Field(min_length=1)
    match: RouteMatch = RouteMatch()
    pipeline: str = Field(min_length=1)
    destinations: list[str] = []
    completeness: CompletenessSettings | None = None  # this rule's trust; else the node's
    level: Literal["series", "study"] = "series"
    roles: dict[str, StudyRole] = {}
    study_stable_age_s: float = Field(default=120.0, gt=0)

    @model_validator(mode="after")
    def _check_roles(self) -> RouteRule:
        """A study-level rule names at least one required role; a series rule none."""
        if self.level == "study" and not any(r.required for r in self.roles.values()):
            raise ValueError('a level = "study" rule needs roles, at least one required')
        if self.level == "series" and self.roles:
            raise ValueError('roles are for level = "study" rules only')
        return self


HOUR_S = 3600.0
GIB = 1 << 30


class OutboxSettings(_Model):
    """Retry policy for sending results: exponential back-off, capped, for a time window
    (``retry_window_h`` since the item was queued or last sent again by hand), then a dead
    letter (``dicomnode deliveries retry|discard``). ``max_attempts`` optionally ends the
    window early. A destination in back-off is probed with C-ECHO every
    ``probe_interval_s``; when it answers, its items are tried at once."""

    initial_delay_s: float = Field(default=5.0, gt=0)
    max_delay_s: float = Field(default=600.0, gt=0)
    retry_window_h: float = Field(default=72.0, gt=0)  # a weekend PACS outage
    max_attempts: int | None = Field(default=None, ge=1)
    probe_interval_s: float = Field(default=30.0, gt=0)
    calling_ae_title: AETitle | None = None
    timeout_s: float = Field(default=30.0, gt=0)

    @property
    def retry_window_s(self) -> float:
        """The retry window in seconds."""
        return self.retry_window_h * HOUR_S


class WorkerSettings(_Model):
    """Pipeline workers: how many threads take jobs from the queue."""

    threads: int = Field(default=1, ge=1, le=16)
    # A job that meets a full disk is kept and retried (back-off up to a minute) for this
    # long; only then does it fail, with an "analysis not performed" notice to PACS.
    disk_full_retry_s: float = Field(default=3600.0, ge=0)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class HttpSettings(_Model):
    """The HTTP endpoint: ``/health``, ``/metrics`` and the status page (``/``); loopback
    by default. Bound to any other address, the status page and its actions need
    ``token`` (sent as ``Authorization: Bearer <token>`` or ``?token=``)."""

    host: str = "127.0.0.1"
    port: Port = 8080
    token: SecretStr | None = Field(default=None, min_length=16)
    # Turnaround (last instance received to last result delivered) whose 90th percentile
    # turns the status page's alarm on.
    turnaround_alarm_s: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _token_off_loopback(self) -> HttpSettings:
        """Refuse a status page reachable from other hosts without a token."""
        if self.host not in LOOPBACK_HOSTS and self.token is None:
            raise ValueError(
                f"http.host {self.host!r} is not loopback: set http.token "
                "(at least 16 characters) to protect the status page"
            )
        return self


class CelerySettings(_Model):
    """Scale-out: with ``[celery]``, the node hands every job to Celery workers
    (``dicomnode worker`` on any host that reaches the broker) instead of running it in its
    own threads. The series travels in the task message and the results come back in the
    task result: workers need no shared disk. A job whose worker dies is delivered again
    to another worker (late acknowledgement) once ``visibility_timeout_s`` has passed."""

    broker_url: str = Field(min_length=1)  # e.g. redis://gpu-queue.example.org:6379/0
    result_backend: str | None = None  # default: the broker
    queue: str = Field(default="dicomnode", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    visibility_timeout_s: float = Field(default=3600.0, gt=0)
    job_timeout_s: float = Field(default=3600.0, gt=0)  # the node gives up waiting after it
    worker_concurrency: int = Field(default=1, ge=1, le=64)  # jobs at once per worker process


class LimitsSettings(_Model):
    """Caps on what one received instance may cost in memory, checked before Success.

    ``max_inflated_bytes`` bounds a Deflated Explicit VR Little Endian dataset once
    inflated (checked while inflating, so a deflate bomb never fills memory);
    ``max_decoded_bytes`` bounds Rows x Columns x Samples x Frames x bytes per sample.
    """

    max_inflated_bytes: int = Field(default=1 << 29, ge=1 << 16)
    max_decoded_bytes: int = Field(default=1 << 30, ge=1 << 16)
    # Free-space watermark of the spool and state file systems: below min_free_bytes new
    # associations are rejected (A-ASSOCIATE-RJ transient) and C-STORE answers 0xA700;
    # below warn_free_bytes /health says "degraded".
    min_free_bytes: int = Field(default=GIB, ge=0)
    warn_free_bytes: int = Field(default=2 * GIB, ge=0)


class RetentionSettings(_Model):
    """What the serving process deletes, every ``interval_s``, once it is delivered.

    Ages are hours since a series' last instance (spool), since a job finished
    (results folder) and since both (state rows); ``None`` keeps that data forever.
    Nothing whose results wait to be sent (pending or dead letter) is ever removed.
    """

    enabled: bool = True
    interval_s: float = Field(default=3600.0, gt=0)
    spool_age_h: float | None = Field(default=168.0, ge=0)
    results_age_h: float | None = Field(default=168.0, ge=0)
    state_age_h: float | None = Field(default=2160.0, ge=0)


class HealthSettings(_Model):
    """When ``/health`` says "degraded": failed jobs count for ``failed_job_window_h``
    after they failed (until retried); dead letters, refused models and low disk always."""

    failed_job_window_h: float = Field(default=24.0, gt=0)


class NodeConfig(_Model):
    """Everything the node needs, validated once and passed explicitly."""

    node: NodeSettings = NodeSettings()
    allowed_callers: list[AllowedCaller] = Field(min_length=1)
    destinations: dict[str, Destination] = {}
    routes: list[RouteRule] = []
    stable_age_s: float = Field(default=30.0, gt=0)
    completeness: CompletenessSettings = CompletenessSettings()  # before the stable age
    poll_interval_s: float = Field(default=0.5, gt=0)
    spool_dir: Path
    state_dir: Path
    outbox: OutboxSettings = OutboxSettings()
    worker: WorkerSettings = WorkerSettings()
    http: HttpSettings | None = None
    limits: LimitsSettings = LimitsSettings()
    retention: RetentionSettings = RetentionSettings()
    health: HealthSettings = HealthSettings()
    default_pipeline: str = "hyperdense_regions"  # used when a rule's pipeline is unavailable
    pipelines: PipelinesSettings = PipelinesSettings()  # [pipelines.<name>] settings
    celery: CelerySettings | None = None  # jobs run by Celery workers instead of in-process
    retraining: RetrainingSettings | None = None  # [retraining]: read by `dicomnode retrain`
    case_store: CaseStoreSettings | None = None  # [case_store]: what retraining needs, per study

    @model_validator(mode="after")
    def _check_references(self) -> NodeConfig:
        """Every route names destinations that exist and rule names are unique."""
        problems: list[str] = []
        seen: set[str] = set()
        for index, rule in enumerate(self.routes):
            if rule.name in seen:
                problems.append(f"routes.{index}.name: duplicate rule name {rule.name!r}")
            seen.add(rule.name)
            problems.extend(
                f"routes.{index}.destinations: unknown destination {name!r}"
                for name in rule.destinations
                if name not in self.destinations
            )
        if self.outbox.max_delay_s < self.outbox.initial_delay_s:
            problems.append("outbox.max_delay_s: must not be less than initial_delay_s")
        if problems:
            raise ConfigError("(cross-references)", problems)
        return self


def _describe(error: ValidationError) -> list[str]:
    """One ``dotted.path: reason`` line per pydantic error."""
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"{path}: {item['msg']}")
    return lines


def load_config(path: Path) -> NodeConfig:
    """Read and validate a TOML config file; raise :class:`ConfigError` listing problems."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), [f"(file): cannot read: {exc.strerror}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"(file): invalid TOML: {exc}"]) from exc
    base = path.resolve().parent
    for key in ("spool_dir", "state_dir"):
        if isinstance(raw.get(key), str):
            raw[key] = str(base / raw[key])
    try:
        return NodeConfig.model_validate(raw, context={"base_dir": base})
    except ValidationError as exc:
        raise ConfigError(str(path), _describe(exc)) from exc
    except ConfigError as exc:
        raise ConfigError(str(path), exc.problems) from exc


def default_config(base_dir: Path, port: int) -> NodeConfig:
    """A demo config: node on loopback ``port``, spool and state under ``base_dir``.

    DCMTK's and pynetdicom's default calling AE titles may connect; series of head CT
    (CT, body part HEAD or BRAIN) go to the ``ht_after_mt`` pipeline (hyperdense regions
    and the bundled risk model) and results to the
    destination ``PACS`` (AE ``PACS`` on loopback port ``port + 1``).
    """
    return NodeConfig(
        node=NodeSettings(ae_title="DICOMNODE", host="127.0.0.1", port=port),
        allowed_callers=[
            AllowedCaller(ae_title=title, host="127.0.0.1")
            for title in ("STORESCU", "ECHOSCU", "PYNETDICOM", "FINDSCU")
        ],
        destinations={"PACS": Destination(ae_title="PACS", host="127.0.0.1", port=port + 1)},
        routes=[
            RouteRule(
                name="head-ct",
                match=RouteMatch(modality=["CT"], body_part_examined=["HEAD", "BRAIN"]),
                pipeline="ht_after_mt",
                destinations=["PACS"],
            )
        ],
        stable_age_s=5.0,
        spool_dir=base_dir / "spool",
        state_dir=base_dir / "state",
    )
