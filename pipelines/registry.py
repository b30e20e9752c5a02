"""Pipelines by name, as routing rules name them; each is imported and built on first use
(the learned ones import torch, MONAI and pyradiomics, which a node need not pay for at
start-up), from its settings (``pipelines.settings``), which the caller passes.

Every registered class builds itself with ``from_settings(settings)``, where
``settings`` holds all pipelines' settings (a risk model builds its segmenter from them).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import lru_cache, partial
from typing import cast, get_args

from model_store.lifecycle import service_stamp
from model_store.registry import ModelStoreError
from pipelines.base import Pipeline, PipelineError, PipelineUnavailable
from pipelines.contract import Segmenter
from pipelines.settings import PipelinesSettings, SegmenterName, StoredModelSettings

_FACTORIES: dict[str, str] = {
    "hyperdense_regions": "pipelines.hyperdense:HyperdenseThresholdPipeline",
    "blast_ct": "pipelines.blast_ct:BlastCtPipeline",
    "hyperdense_unet": "pipelines.unet:UNetPipeline",
    "ht_after_mt": "pipelines.ht_after_mt:HtAfterMtPipeline",
    "iph_vs_contrast": "pipelines.iph_vs_contrast:IphVsContrastPipeline",
    "ich_expansion": "pipelines.ich_expansion.pipeline:IchExpansionPipeline",
    "ich_expansion_hybrid": "pipelines.ich_expansion_hybrid.pipeline:IchExpansionHybridPipeline",
    "ais_prognosis_mri": "pipelines.ais_prognosis_mri.pipeline:AisPrognosisMriPipeline",
}

DEFAULT_SETTINGS = PipelinesSettings()
"""Every pipeline's defaults (bundled model store, default weights folder)."""

PIPELINE_CACHE_SIZE = 64
"""Built pipelines kept (per name, settings and version in service)."""

PipelineFactory = Callable[[str], Pipeline]


def pipeline_names() -> list[str]:
    """Names a routing rule may give as its pipeline."""
    return sorted(_FACTORIES)


def segmenter_names() -> list[str]:
    """Names a risk model's ``segmenter`` setting may give."""
    return sorted(get_args(SegmenterName))


def promotion_stamp(name: str, settings: PipelinesSettings = DEFAULT_SETTINGS) -> object:
    """What identifies the model version in service for pipeline ``name``: the stamp of
    its ``promoted.json`` (``model_store.lifecycle.service_stamp``) when its settings
    leave the version to the promotion, else None. A promotion, rollback or shadow
    change replaces that file, so the stamp changes and the next job builds anew."""
    own = getattr(settings, name, None)
    if not isinstance(own, StoredModelSettings) or own.version is not None:
        return None
    return service_stamp(name, own.store_root)


def get_pipeline(name: str, settings: PipelinesSettings = DEFAULT_SETTINGS) -> Pipeline:
    """The pipeline registered as ``name``, built from ``settings`` once per process (and
    per distinct settings), and built again when the version in service of its model
    changes (:func:`promotion_stamp`): the running node picks up a promotion or a
    rollback at its next job, without a restart."""
    return _build_pipeline(name, settings, promotion_stamp(name, settings))


@lru_cache(maxsize=PIPELINE_CACHE_SIZE)
def _build_pipeline(name: str, settings: PipelinesSettings, stamp: object) -> Pipeline:
    """Build ``name`` (``stamp`` only keys the cache)."""
    try:
        module_name, class_name = _FACTORIES[name].split(":")
    except KeyError:
        raise KeyError(f"unknown pipeline {name!r}; known: {', '.join(pipeline_names())}") from None
    factory = getattr(importlib.import_module(module_name), class_name)
    pipeline: Pipeline = factory.from_settings(settings)
    return pipeline


get_pipeline.cache_clear = _build_pipeline.cache_clear  # type: ignore[attr-defined]


def get_segmenter(name: str, settings: PipelinesSettings = DEFAULT_SETTINGS) -> Segmenter:
    """The pipeline ``name`` in its role of lesion segmenter (``pipelines.contract``)."""
    if name not in segmenter_names():
        raise KeyError(f"unknown segmenter {name!r}; known: {', '.join(segmenter_names())}")
    return cast(Segmenter, get_pipeline(name, settings))


def pipeline_factory(settings: PipelinesSettings) -> PipelineFactory:
    """``get_pipeline`` bound to ``settings``: what the node and ``run`` build with."""
    return partial(get_pipeline, settings=settings)


def verified_pipeline(name: str, build: PipelineFactory = get_pipeline) -> Pipeline:
    """The pipeline ``name``, built (by ``build``, default: the registry's shared
    instance with default settings) and its artefacts checked (``Pipeline.check``).

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


def settings_verifier(settings: PipelinesSettings) -> Callable[[str], Pipeline]:
    """``verified_pipeline`` building with ``settings``: the start-up check of a config."""
    return partial(verified_pipeline, build=pipeline_factory(settings))
