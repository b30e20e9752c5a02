"""The pipeline contract: settings per pipeline validated with the node config and reaching
the pipelines, output profiles (titles, writers) per pipeline, interchangeable segmenters,
and a model trained into another store served from ``[pipelines.ht_after_mt]``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import (
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from dicomnode.cli import main
from dicomnode.config import ConfigError, Destination, load_config
from dicomnode.demo import demo_config
from dicomnode.processing import run_pipeline
from dicomnode.sender import send_files
from model_store.registry import STORE_ROOT
from pipelines.base import PipelineUnavailable
from pipelines.blast_ct.pipeline import BLAST_CT_PROFILE, BlastCtPipeline
from pipelines.blast_ct.weights import DEFAULT_DIR, member_file
from pipelines.cohort import generate_cohort
from pipelines.contract import OutputProfile, Writer
from pipelines.ht_after_mt import HtAfterMtPipeline
from pipelines.hyperdense import HYPERDENSE_PROFILE, HyperdenseThresholdPipeline
from pipelines.outputs import build_outputs
from pipelines.registry import (
    get_pipeline,
    get_segmenter,
    pipeline_factory,
    pipeline_names,
    segmenter_names,
    settings_verifier,
)
from pipelines.settings import BlastCtSettings, HtAfterMtSettings, PipelinesSettings
from pipelines.synthetic import synthetic_head_ct, write_series
from pipelines.volume import load_datasets, load_series
from tests.support import REPO_ROOT, free_port

COHORT_CASES = 24
"""Small enough for a test (24 cases of 16 frames: generation and training ~45 s on one core)."""

BASE_CONFIG = """spool_dir = "spool"
state_dir = "state"
stable_age_s = 0.5
poll_interval_s = 0.1

[node]
ae_title = "DICOMNODE"
host = "127.0.0.1"
port = {port}

[[allowed_callers]]
ae_title = "STORESCU"
host = "127.0.0.1"

[[routes]]
name = "head-ct"
pipeline = "ht_after_mt"

[routes.match]
modality = ["CT"]
"""


def write_config(folder: Path, pipelines: str, port: int = 11112, extra: str = "") -> Path:
    """A node config routing CT to ``ht_after_mt``, with ``pipelines`` TOML appended."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "node.toml"
    path.write_text(BASE_CONFIG.format(port=port) + extra + "\n" + pipelines, encoding="utf-8")
    return path


def problems(folder: Path, pipelines: str) -> list[str]:
    """The problems ``load_config`` lists for a config with ``pipelines`` TOML."""
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(folder, pipelines))
    return caught.value.problems


# --- settings validated with the config ----------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[pipelines.unknown_one]\nversion = '1.0.0'\n", "pipelines.unknown_one: Extra inputs"),
        ("[pipelines.blast_ct]\nweights = 'x'\n", "pipelines.blast_ct.weights: Extra inputs"),
        ("[pipelines.blast_ct]\ndevice = 'gpu'\n", "pipelines.blast_ct.device: Input should be"),
        ("[pipelines.blast_ct]\nmembers = [0, 13]\n", "pipelines.blast_ct.members: Value error, "),
        ("[pipelines.blast_ct]\nmembers = []\n", "pipelines.blast_ct.members: Value error, give"),
        ("[pipelines.blast_ct]\nmembers = [1, 1]\n", "pipelines.blast_ct.members: Value error, "),
        ("[pipelines.blast_ct]\nweights_dir = 'absent'\n", "pipelines.blast_ct.weights_dir: "),
        (
            "[pipelines.ht_after_mt]\nmodel_store_dir = 'nowhere'\n",
            "pipelines.ht_after_mt.model_store_dir: Value error, folder does not exist",
        ),
        ("[pipelines.ht_after_mt]\nversion = 'latest'\n", "pipelines.ht_after_mt.version: "),
        ("[pipelines.ht_after_mt]\nsegmenter = 'magic'\n", "pipelines.ht_after_mt.segmenter: "),
        ("[pipelines.hyperdense_unet]\ndevice = 'gpu'\n", "pipelines.hyperdense_unet.device: "),
    ],
)
def test_invalid_pipeline_settings_are_named_by_field_path(
    tmp_path: Path, toml: str, expected: str
) -> None:
    found = problems(tmp_path, toml)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_relative_paths_resolve_beside_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "conf" / "store").mkdir(parents=True)
    (tmp_path / "conf" / "weights").mkdir()
    config = load_config(
        write_config(
            tmp_path / "conf",
            "[pipelines.ht_after_mt]\nmodel_store_dir = 'store'\nclinical_table = 'c.csv'\n"
            "segmenter = 'hyperdense_unet'\n[pipelines.blast_ct]\nweights_dir = 'weights'\n"
            "device = 'cpu'\nmembers = [3]\n",
        )
    )
    ht = config.pipelines.ht_after_mt
    assert ht.model_store_dir == tmp_path / "conf" / "store"
    assert ht.clinical_table == tmp_path / "conf" / "c.csv"  # a table may appear later
    assert ht.segmenter == "hyperdense_unet" and ht.store_root == tmp_path / "conf" / "store"
    assert config.pipelines.blast_ct == BlastCtSettings(
        weights_dir=tmp_path / "conf" / "weights", device="cpu", members=(3,)
    )
    defaults = load_config(write_config(tmp_path / "plain", "")).pipelines
    assert defaults == PipelinesSettings() and defaults.ht_after_mt.store_root == STORE_ROOT


def test_example_config_names_every_pipelines_settings() -> None:
    text = (REPO_ROOT / "deploy" / "dicomnode.example.toml").read_text(encoding="utf-8")
    for name in pipeline_names():
        assert f"[pipelines.{name}]" in text, name
        fields = type(getattr(PipelinesSettings(), name)).model_fields
        for field in fields:
            assert f"{field} =" in text, f"{name}.{field}"


# --- settings reach the pipelines ----------------------------------------------------------


def test_blast_ct_weights_folder_comes_from_the_settings(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    settings = load_config(
        write_config(tmp_path, f"[pipelines.blast_ct]\nweights_dir = '{empty}'\ndevice = 'cpu'\n")
    ).pipelines
    pipeline = get_pipeline("blast_ct", settings)
    assert isinstance(pipeline, BlastCtPipeline)
    assert pipeline.parameters.weights_dir == empty and pipeline.device.type == "cpu"
    with pytest.raises(PipelineUnavailable) as caught:
        settings_verifier(settings)("blast_ct")
    reason = str(caught.value)
    assert str(empty / member_file(1)) in reason
    assert "[pipelines.blast_ct] weights_dir" in reason

    if not (DEFAULT_DIR / member_file(1)).is_file():
        pytest.skip(f"BLAST-CT v1 weights absent: {DEFAULT_DIR}")
    shared = load_config(
        write_config(
            tmp_path / "shared",
            f"[pipelines.blast_ct]\nweights_dir = '{DEFAULT_DIR}'\ndevice = 'cpu'\nmembers = [2]\n",
        )
    ).pipelines
    verified = settings_verifier(shared)("blast_ct")
    assert isinstance(verified, BlastCtPipeline)
    assert verified.members == (2,) and len(verified.models()) == 1
    assert "1 member)" in verified.algorithm.name


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_a_gpu_is_an_unavailability_not_a_crash() -> None:
    settings = PipelinesSettings(blast_ct=BlastCtSettings(device="cuda"))
    with pytest.raises(PipelineUnavailable, match=r"device is cuda, but torch sees no CUDA"):
        settings_verifier(settings)("blast_ct")


def test_risk_model_settings_reach_the_pipeline_and_its_segmenter(tmp_path: Path) -> None:
    table = tmp_path / "clinical.csv"
    settings = PipelinesSettings(
        ht_after_mt=HtAfterMtSettings(clinical_table=table, segmenter="hyperdense_unet")
    )
    pipeline = get_pipeline("ht_after_mt", settings)
    assert isinstance(pipeline, HtAfterMtPipeline)
    assert pipeline.clinical_table == table
    assert pipeline.segmenter is get_segmenter("hyperdense_unet", settings)
    assert "lesion segmenter hyperdense_unet" in pipeline.algorithm.provenance
    assert pipeline.profile.segments[0].label == "Scored lesion by hyperdense_unet"
    default = get_pipeline("ht_after_mt")
    assert isinstance(default, HtAfterMtPipeline)
    assert default.segmenter.name == "hyperdense_unet" and default.clinical_table is None
    assert segmenter_names() == ["blast_ct", "hyperdense_regions", "hyperdense_unet"]
    with pytest.raises(KeyError, match="unknown segmenter 'ht_after_mt'"):
        get_segmenter("ht_after_mt")


# --- segmenters and output profiles ----------------------------------------------------------


@pytest.fixture(scope="module")
def lesion_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small synthetic head CT with a 70 HU sphere painted into the brain."""
    datasets = synthetic_head_ct(seed=11, n_slices=16, rows=96)
    series = load_datasets(datasets)
    centre = np.array(series.frame_hu.shape) // 2
    zz, yy, xx = np.indices(series.frame_hu.shape)
    rows_mm = float(series.stack.pixel_spacing[0])
    sphere = ((zz - centre[0]) * 5.0) ** 2 + ((yy - centre[1]) * rows_mm) ** 2 + (
        (xx - centre[2] - 8) * rows_mm
    ) ** 2 <= 12.0**2
    by_uid = {f.sop_instance_uid: k for k, f in enumerate(series.frames)}
    for ds in datasets:
        frame = sphere[by_uid[str(ds.SOPInstanceUID)]]
        pixels = ds.pixel_array.astype(np.int32)
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        pixels[frame] = round((70.0 - intercept) / slope)
        ds.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
    return write_series(datasets, tmp_path_factory.mktemp("lesion"))


def test_segmenters_are_interchangeable(lesion_series: list[Path]) -> None:
    series = load_series(lesion_series)
    found = {}
    for name in ("hyperdense_regions", "hyperdense_unet"):
        segmenter = get_segmenter(name)
        labels, count = segmenter.segment(series)
        assert labels.shape == series.volume.hu.shape and labels.dtype == np.int32
        assert count >= 1 and labels.max() == count, name
        found[name] = labels == 1  # the largest region
    both = found["hyperdense_regions"] & found["hyperdense_unet"]
    assert both.sum() > 0.5 * found["hyperdense_regions"].sum()


def test_output_titles_and_writers_follow_the_profile(
    lesion_series: list[Path], tmp_path: Path
) -> None:
    written = run_pipeline(lesion_series, "hyperdense_regions", tmp_path / "out")
    titles = [pydicom.dcmread(p).SeriesDescription for p in written]
    assert titles == [
        "HYPERDENSE SEG (baseline)",
        "HYPERDENSE SUMMARY (baseline)",
        "HYPERDENSE REPORT (baseline)",
    ]
    assert not any("HYPERDENSE" in t for t in (
        BLAST_CT_PROFILE.seg_title, BLAST_CT_PROFILE.sc_title, BLAST_CT_PROFILE.sr_title
    ))  # fmt: skip
    assert BLAST_CT_PROFILE.sr_title == "HAEMORRHAGE REPORT BLAST-CT"
    assert len(BLAST_CT_PROFILE.segments) == 4

    series = load_series(lesion_series)
    result = HyperdenseThresholdPipeline().run(series)
    seg_only = OutputProfile("LESION MASK", "X", "Y", "Z", (), frozenset({Writer.SEG}))
    [seg] = build_outputs(series, result, pipeline_name="hyperdense_regions", profile=seg_only)
    assert seg.Modality == "SEG" and seg.SeriesDescription == "LESION MASK (baseline)"
    full = build_outputs(
        series, result, pipeline_name="hyperdense_regions", profile=HYPERDENSE_PROFILE
    )
    assert [ds.SOPClassUID for ds in full] == [
        SegmentationStorage,
        SecondaryCaptureImageStorage,
        Comprehensive3DSRStorage,
    ]  # no saliency writer in the profile
    with pytest.raises(ValueError, match="the SR references the SEG"):
        OutputProfile("A", "B", "C", "D", (), frozenset({Writer.SR}))
    with pytest.raises(ValueError, match="1-64 ASCII"):
        OutputProfile("A \u2014 B", "B", "C", "D", ())


def _texts(item: pydicom.Dataset) -> list[str]:
    """TEXT values of an SR content tree, depth first."""
    found = [str(item.TextValue)] if "TextValue" in item else []
    for child in item.get("ContentSequence", []):
        found += _texts(child)
    return found


def test_the_risk_model_scores_the_configured_segmenters_lesion(
    lesion_series: list[Path], tmp_path: Path
) -> None:
    settings = PipelinesSettings(ht_after_mt=HtAfterMtSettings(segmenter="hyperdense_unet"))
    pipeline = pipeline_factory(settings)("ht_after_mt")
    series = load_series(lesion_series)
    result = pipeline.run(series)
    assert result.risk is not None
    assert result.risk.scored_reason.startswith("largest hyperdense region (")
    assert "found by hyperdense_unet" in result.risk.scored_reason
    outputs = build_outputs(series, result, pipeline_name="ht_after_mt", profile=pipeline.profile)
    by_modality = {ds.Modality: ds for ds in outputs}
    seg, sr = by_modality["SEG"], by_modality["SR"]
    assert seg.SeriesDescription.startswith("HT RISK LESION SEG")
    assert sr.SeriesDescription.startswith("HT RISK REPORT")
    assert seg.SegmentSequence[0].SegmentLabel == "Scored lesion by hyperdense_unet 1"
    saliency = [ds for ds in outputs if ds.SeriesDescription.startswith("SALIENCY GRAD-CAM")]
    assert saliency and len(saliency) == len(outputs) - 3
    texts = _texts(sr)  # the SR names the segmenter in the provenance and region label
    assert any("lesion segmenter hyperdense_unet (dicomnode hyperdense U-Net 3" in t for t in texts)
    assert any(t.startswith("Scored region: Scored lesion by hyperdense_unet 1") for t in texts), (
        texts
    )


# --- train into another store, then serve from it --------------------------------------------


def _get(port: int, path: str) -> tuple[int, bytes]:
    """Status and body of a GET on loopback."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _health(port: int, node: subprocess.Popen[str], deadline: float) -> dict[str, Any]:
    """The node's ``/health`` once it answers."""
    while time.monotonic() < deadline and node.poll() is None:
        try:
            status, body = _get(port, "/health")
        except urllib.error.URLError:
            time.sleep(0.2)
            continue
        assert status == 200
        health: dict[str, Any] = json.loads(body)
        return health
    raise AssertionError("the node did not answer /health")


def test_a_model_trained_into_a_store_is_served_from_it(tmp_path: Path) -> None:
    """``train --root DIR --version V --promote``, then ``serve`` with
    ``[pipelines.ht_after_mt] model_store_dir = DIR``: the jobs use version V.

    (Before the settings, the node read one store for every model, the bundled one or
    ``$DICOMNODE_MODEL_STORE``: pointed at DIR, the threshold baseline, the default
    pipeline and ht_after_mt's own segmenter found no parameters there, so nothing could
    run; a store now belongs to one pipeline's settings.)"""
    cohort = generate_cohort(tmp_path / "cohort", COHORT_CASES, 3, rows=96, n_slices=16)
    store = tmp_path / "store"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(
            ["train", str(cohort.root), "--version", "7.1.0", "--seed", "3", "--epochs", "1",
             "--root", str(store), "--promote"]
        )  # fmt: skip
    assert status == 0, out.getvalue()
    assert "promoted ht_after_mt 7.1.0" in out.getvalue()

    port, http_port = free_port(), free_port()
    config = write_config(
        tmp_path / "node",
        f"[pipelines.ht_after_mt]\nmodel_store_dir = '{store}'\n",
        port,
        f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n',
    )
    node = subprocess.Popen(
        [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    results = tmp_path / "node" / "state" / "results"
    try:
        deadline = time.monotonic() + 150
        health = _health(http_port, node, deadline)
        statuses = {p["name"]: p for p in health["pipelines"]}
        assert statuses["ht_after_mt"]["status"] == "available", statuses
        files = sorted(cohort.cases[0].folder.rglob("*.dcm"))
        target = Destination(ae_title="DICOMNODE", host="127.0.0.1", port=port)
        assert all(r.status == 0 for r in send_files(target, files, "STORESCU").values())
        metrics = ""
        while time.monotonic() < deadline and 'dicomnode_jobs{state="done"} 1.0' not in metrics:
            assert 'dicomnode_jobs{state="failed"}' not in metrics, metrics
            time.sleep(0.3)
            metrics = _get(http_port, "/metrics")[1].decode()
        assert 'dicomnode_jobs{state="done"} 1.0' in metrics
    finally:
        node.send_signal(signal.SIGTERM)
        _, stderr = node.communicate(timeout=60)
    finished = [
        json.loads(line) for line in stderr.splitlines()
        if line.startswith("{") and '"pipeline finished"' in line
    ]  # fmt: skip
    assert [(e["pipeline"], e["algorithm_version"]) for e in finished] == [("ht_after_mt", "7.1.0")]
    outputs = [pydicom.dcmread(p) for p in results.rglob("*.dcm")]
    assert outputs and {ds.SoftwareVersions for ds in outputs} == {"7.1.0"}
    titles = {ds.Modality: str(ds.SeriesDescription) for ds in outputs}
    assert titles["SEG"].startswith("HT RISK LESION SEG")
    assert titles["SR"].startswith("HT RISK REPORT")


def test_demo_takes_the_config_files_pipeline_settings(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    path = tmp_path / "node.toml"
    path.write_text(
        'default_pipeline = "hyperdense_unet"\n'
        + BASE_CONFIG.format(port=11112)
        + "[pipelines.ht_after_mt]\nmodel_store_dir = 'store'\nsegmenter = 'blast_ct'\n",
        encoding="utf-8",
    )
    settings = load_config(path)
    config = demo_config(tmp_path / "demo", free_port(), free_port(), settings)
    assert config.pipelines == settings.pipelines
    assert config.pipelines.ht_after_mt.model_store_dir == tmp_path / "store"
    assert config.default_pipeline == "hyperdense_unet"
    assert demo_config(tmp_path / "demo", 11112, 11113).pipelines == PipelinesSettings()
