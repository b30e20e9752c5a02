"""Pipelines by name, as routing rules name them; each is imported and built on first use
(the learned ones import torch, MONAI and pyradiomics, which a node need not pay for at
start-up)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache

from model_store.registry import ModelStoreError
from pipelines.base import Pipeline, PipelineError, PipelineUnavailable

_FACTORIES: dict[str, str] = {
    "hyperdense_regions": "pipelines.hyperdense:HyperdenseThresholdPipeline",
    "blast_ct": "pipelines.blast_ct:BlastCtPipeline",
    "hyperdense_unet": "pipelines.unet:UNetPipeline",
    "ht_after_mt": "pipelines.ht_after_mt:HtAfterMtPipeline",
}


def pipeline_names() -> list[str]:
    """Names a routing rule may give as its pipeline."""
    return sorted(_FACTORIES)


@cache
def get_pipeline(name: str) -> Pipeline:
    """The pipeline registered as ``name``, built once per process."""
    try:
        module_name, class_name = _FACTORIES[name].split(":")
    except KeyError:
        raise KeyError(f"unknown pipeline {name!r}; known: {', '.join(pipeline_names())}") from None
    factory = getattr(importlib.import_module(module_name), class_name)
    pipeline: Pipeline = factory()
    return pipeline


def verified_pipeline(name: str, build: Callable[[str], Pipeline] = get_pipeline) -> Pipeline:
    """The pipeline ``name``, built (by ``build``, default: the registry's shared
    instance) and its artefacts checked (``Pipeline.check``).

    Raises ``PipelineUnavailable`` with a readable reason when it is not registered, cannot
    be built (a changed manifest, missing parameters) or its artefacts fail their checks.
    """
    try:
        pipeline = build(name)
        pipeline.check()
    except PipelineUnavailable:
        raise
    except (
        ModelStoreError,
        PipelineError,
        OSError,
        ValueError,
        KeyError,
        ImportError,
        RuntimeError,
    ) as exc:
        raise PipelineUnavailable(f"pipeline {name} failed its start-up check: {exc}") from exc
    return pipeline
