"""Start-up check of the pipelines in service: every routed pipeline (and the default one)
is built and its artefacts verified (``Pipeline.check``: model manifest, file hashes,
weights) before the node accepts work, by ``serve`` and by the offline ``run`` alike.

A pipeline that fails is not used: its series go to ``default_pipeline`` instead, and
that is reported once at start (a warning log line naming the pipeline, the fallback and
the reason) and for as long as the node runs (``/health`` lists each pipeline's status).
If the default pipeline itself is unavailable, the series routed to an unavailable
pipeline have no fallback: their jobs fail with the pipeline's reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from dicomnode.config import NodeConfig
from pipelines.base import Pipeline, PipelineUnavailable
from pipelines.registry import settings_verifier, verified_pipeline

log = structlog.get_logger(__name__)

AVAILABLE = "available"
UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class PipelineStatus:
    """One pipeline in service: whether it passed its start-up check, and if not, why and
    what runs instead (``fallback`` None: nothing can)."""

    name: str
    available: bool
    reason: str | None = None
    fallback: str | None = None
    algorithm: str | None = None  # the method's name and version, when it was built
    version: str | None = None

    def to_json(self) -> dict[str, str | None]:
        """JSON-ready, for ``/health`` and the status page."""
        return {
            "name": self.name,
            "status": AVAILABLE if self.available else UNAVAILABLE,
            "algorithm": self.algorithm,
            "version": self.version,
            "reason": self.reason,
            "fallback": self.fallback,
        }


@dataclass(frozen=True)
class PipelinePlan:
    """Which pipeline actually runs for each pipeline a routing rule names."""

    statuses: Mapping[str, PipelineStatus]
    default: str

    def resolve(self, name: str) -> str:
        """``name`` when it passed its check (or was not checked), else its fallback (the
        default pipeline), else ``name`` itself, whose run then fails with its reason."""
        status = self.statuses.get(name)
        if status is None or status.available or status.fallback is None:
            return name
        return status.fallback

    def unavailable(self) -> list[PipelineStatus]:
        """The pipelines that failed their check, by name."""
        return [s for _, s in sorted(self.statuses.items()) if not s.available]

    def to_json(self) -> list[dict[str, str | None]]:
        """Every checked pipeline's status, by name (the ``pipelines`` of ``/health``)."""
        return [s.to_json() for _, s in sorted(self.statuses.items())]


def routed_pipelines(config: NodeConfig) -> list[str]:
    """The default pipeline and every pipeline a routing rule names, each once, in order."""
    names = [config.default_pipeline, *(rule.pipeline for rule in config.routes)]
    return list(dict.fromkeys(names))


def plan_pipelines(
    names: Iterable[str], default: str, verify: Callable[[str], Pipeline] = verified_pipeline
) -> PipelinePlan:
    """Check each pipeline of ``names`` with ``verify`` and plan the fallbacks (pure but
    for ``verify``, which builds the pipeline and reads its artefacts)."""
    reasons: dict[str, str | None] = {}
    identities: dict[str, tuple[str, str]] = {}
    for name in dict.fromkeys([default, *names]):
        try:
            pipeline = verify(name)
        except PipelineUnavailable as exc:
            reasons[name] = str(exc) or type(exc).__name__
        else:
            reasons[name] = None
            identities[name] = (pipeline.algorithm.name, pipeline.algorithm.version)
    default_ok = reasons[default] is None
    statuses = {
        name: PipelineStatus(
            name=name,
            available=reason is None,
            reason=reason,
            fallback=None if reason is None or not default_ok or name == default else default,
            algorithm=identities.get(name, (None, None))[0],
            version=identities.get(name, (None, None))[1],
        )
        for name, reason in reasons.items()
    }
    return PipelinePlan(statuses, default)


def check_pipelines_at_start(
    config: NodeConfig, verify: Callable[[str], Pipeline] | None = None
) -> PipelinePlan:
    """Check the pipelines ``config`` routes to and its default, each built from
    ``config.pipelines`` (unless ``verify`` is given); log each unavailable one
    once: a warning naming its fallback, an error when a routed pipeline has none (its
    jobs will fail), a warning when only the default is unavailable. Returns the plan."""
    check = settings_verifier(config.pipelines) if verify is None else verify
    plan = plan_pipelines(routed_pipelines(config), config.default_pipeline, check)
    routed = {rule.pipeline for rule in config.routes}
    for status in plan.unavailable():
        if status.fallback is not None:
            log.warning(
                "pipeline unavailable at start; its series go to the default pipeline",
                pipeline=status.name, fallback=status.fallback, reason=status.reason,
            )  # fmt: skip
        elif status.name in routed:
            log.error(
                "pipeline unavailable at start and no fallback can run; its jobs will fail",
                pipeline=status.name, reason=status.reason,
            )  # fmt: skip
        else:
            log.warning(
                "default pipeline unavailable at start; it cannot stand in for another",
                pipeline=status.name, reason=status.reason,
            )  # fmt: skip
    return plan
