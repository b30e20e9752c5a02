"""What one pipeline run shares between its parts, and what it builds only when asked.

- **Per-run cache.** A risk model asks its segmenter for regions and, apart, for
  calcifications; the segmenter computes both once and keeps them for the rest of the
  run (:func:`per_run`). The cache lives inside :func:`run_scope`, which the job runner
  opens around ``pipeline.run`` (and a pipeline's own ``run`` when nobody did): when the
  outermost scope closes, every cached array is released, before the output writers
  run. Outside a scope nothing is cached.
- **Case records.** ``PipelineResult.case_record`` (an int16 copy of the volume, the
  regions and the model inputs, about 240 MB on a 300-slice series) is built only inside
  :func:`keeping_cases`, which the job runner opens when a case store keeps it.

Both are context variables, as ``pipelines.stages``: each thread's job has its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar, cast

T = TypeVar("T")

_Entries = dict[tuple[int, int], tuple[object, object, object]]
_CACHE: ContextVar[_Entries | None] = ContextVar("dicomnode_run_cache", default=None)
_KEEP_CASES: ContextVar[bool] = ContextVar("dicomnode_keep_cases", default=False)


@contextmanager
def run_scope() -> Iterator[None]:
    """Cache :func:`per_run` values inside the block; a nested scope shares the outer
    one, and the outermost releases every value when it closes."""
    if _CACHE.get() is not None:
        yield
        return
    entries: _Entries = {}
    token = _CACHE.set(entries)
    try:
        yield
    finally:
        _CACHE.reset(token)
        entries.clear()


def per_run(owner: object, series: object, compute: Callable[[], T]) -> T:
    """``compute()`` once per ``owner`` and ``series`` inside the open :func:`run_scope`
    (the scope holds both, so neither id is reused while it lives); outside a scope,
    ``compute()`` every time."""
    entries = _CACHE.get()
    if entries is None:
        return compute()
    key = (id(owner), id(series))
    found = entries.get(key)
    if found is not None and found[0] is owner and found[1] is series:
        return cast(T, found[2])
    value = compute()
    entries[key] = (owner, series, value)
    return value


@contextmanager
def keeping_cases(keep: bool = True) -> Iterator[None]:
    """Inside the block, pipelines build ``PipelineResult.case_record`` when ``keep``."""
    token = _KEEP_CASES.set(keep)
    try:
        yield
    finally:
        _KEEP_CASES.reset(token)


def cases_kept() -> bool:
    """Whether the running job keeps case records (:func:`keeping_cases`)."""
    return _KEEP_CASES.get()
