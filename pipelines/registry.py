"""Pipelines by name, as routing rules name them; each is built on first use."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from pipelines.base import Pipeline
from pipelines.blast_ct import BlastCtPipeline
from pipelines.hyperdense import HyperdenseThresholdPipeline

_FACTORIES: dict[str, Callable[[], Pipeline]] = {
    "hyperdense_regions": HyperdenseThresholdPipeline,
    "blast_ct": BlastCtPipeline,
}


def pipeline_names() -> list[str]:
    """Names a routing rule may give as its pipeline."""
    return sorted(_FACTORIES)


@cache
def get_pipeline(name: str) -> Pipeline:
    """The pipeline registered as ``name``, built once per process."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise KeyError(f"unknown pipeline {name!r}; known: {', '.join(pipeline_names())}") from None
    return factory()
