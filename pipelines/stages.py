"""Where a job's time goes: a stage timer that the job runner and pipelines report through.

The runner makes one :class:`StageTimer` per job and activates it with :func:`recording`;
code on the job's thread marks its work with ``with stage("segmentation"):``, a no-op when
no timer records (a pipeline run outside a job, a test). Time is charged exclusively to the
innermost open stage, so nested stages (a risk model's segmenter inside its features)
never count twice and the stages of a job add up to at most its wall time. Time inside the
pipeline that no stage claims is charged to ``other``.

A job run on a Celery worker (``dicomnode.distributed``) adds the node-side stages of
scale-out: ``dispatch`` (the node packs the series into the task message and publishes
it), ``broker`` (the node's wait for the result less the worker's own split: the queue
until a worker is free and the messages' transport), ``transfer`` (on the worker:
unpacking the series and packing the outputs) and ``result`` (the node verifies and
writes the returned objects and the case record).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal, ParamSpec, TypeVar, get_args

P = ParamSpec("P")
R = TypeVar("R")
Stage = Literal[
    "load", "segmentation", "features", "model", "writers", "other",
    "dispatch", "broker", "transfer", "result",
]  # fmt: skip
STAGES: tuple[Stage, ...] = get_args(Stage)
"""Every stage a job reports: the pipeline's, in the order a job passes them, then those
of a job run on a Celery worker."""
SCALE_OUT_STAGES: tuple[Stage, ...] = ("dispatch", "broker", "transfer", "result")
"""The stages only a job run on a Celery worker passes."""


class StageTimer:
    """Seconds per stage of one job, charged to the innermost open stage."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        """A timer with every stage at zero, reading ``clock`` (seconds)."""
        self._clock = clock
        self._seconds: dict[Stage, float] = dict.fromkeys(STAGES, 0.0)
        self._open: list[Stage] = []
        self._since = 0.0

    def _charge(self) -> float:
        """Charge the time since the last change to the innermost open stage; now."""
        now = self._clock()
        if self._open:
            self._seconds[self._open[-1]] += now - self._since
        self._since = now
        return now

    @contextmanager
    def stage(self, name: Stage) -> Iterator[None]:
        """Charge the time inside the block to ``name`` (minus any stage nested in it)."""
        if name not in self._seconds:
            raise ValueError(f"unknown stage {name!r}; known: {', '.join(STAGES)}")
        self._charge()
        self._open.append(name)
        try:
            yield
        finally:
            self._charge()
            self._open.pop()

    def add(self, seconds: Mapping[str, float]) -> None:
        """Add seconds per stage timed elsewhere (a job's run on a Celery worker)."""
        unknown = sorted(set(seconds) - set(self._seconds))
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
        added = {name: float(seconds.get(name, 0.0)) for name in STAGES}
        for name, value in added.items():
            if not value >= 0.0:  # also refuses NaN
                raise ValueError(f"stage {name}: {value!r} is not a duration")
        for name, value in added.items():
            self._seconds[name] += value

    def seconds(self) -> dict[str, float]:
        """Seconds per stage so far (every stage present, zero when not passed)."""
        return {name: value for name, value in self._seconds.items()}


_CURRENT: ContextVar[StageTimer | None] = ContextVar("dicomnode_stage_timer", default=None)


@contextmanager
def recording(timer: StageTimer) -> Iterator[StageTimer]:
    """Make ``timer`` the one :func:`stage` reports to inside the block (this thread)."""
    token = _CURRENT.set(timer)
    try:
        yield timer
    finally:
        _CURRENT.reset(token)


@contextmanager
def stage(name: Stage) -> Iterator[None]:
    """Charge the block to ``name`` on the recording timer; a no-op when none records."""
    timer = _CURRENT.get()
    if timer is None:
        yield
        return
    with timer.stage(name):
        yield


def charged_to(name: Stage) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function so that every call is charged to stage ``name``."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def charged(*args: P.args, **kwargs: P.kwargs) -> R:
            with stage(name):
                return function(*args, **kwargs)

        return charged

    return decorate
