"""The ``dicomnode`` command: run (offline), echo, demo, and config errors."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom import uid

from dicomnode.cli import main
from dicomnode.config import default_config
from dicomnode.node import Node
from dicomnode.processing import processor
from pipelines.lesions import insert_lesion
from pipelines.registry import pipeline_names
from pipelines.synthetic import synthetic_head_ct, write_series
from tests.support import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]

OUTPUT_CLASSES = {
    uid.SegmentationStorage,
    uid.SecondaryCaptureImageStorage,
    uid.Comprehensive3DSRStorage,
}


def test_run_processes_a_folder_like_the_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    datasets = synthetic_head_ct(seed=5, n_slices=24, rows=192)
    insert_lesion(datasets, center_mm=None, radius_mm=12.0, hu=72.0, seed=5)
    folder = tmp_path / "in"
    write_series(datasets, folder)
    (folder / "README.txt").write_text("not DICOM")
    assert main(["run", str(folder), "--out", str(tmp_path / "out")]) == 0
    said = capsys.readouterr().out
    assert "processed" in said
    assert "README.txt (not a DICOM instance)" in said
    outputs = sorted((tmp_path / "out").rglob("*.dcm"))
    assert {pydicom.dcmread(p).SOPClassUID for p in outputs} == OUTPUT_CLASSES


def test_run_reports_an_unloadable_series(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    datasets = synthetic_head_ct(seed=6, n_slices=4, rows=64)
    datasets[1].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    write_series(datasets, tmp_path / "in")
    assert main(["run", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 1
    assert "series cannot be loaded: frames have more than one orientation" in (
        capsys.readouterr().out
    )


def test_invalid_config_is_refused_with_the_field_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('spool_dir = "s"\nstate_dir = "t"\n[node]\nport = 70000\n')
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "node.port" in err
    assert "allowed_callers" in err


def test_unknown_pipeline_is_refused_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "pipe.toml"
    config.write_text(
        'spool_dir = "s"\nstate_dir = "t"\n[[allowed_callers]]\nae_title = "A"\n'
        '[[routes]]\nname = "r"\npipeline = "nonesuch"\n'
    )
    assert main(["serve", "--config", str(config)]) == 2
    assert "unknown pipeline(s) nonesuch" in capsys.readouterr().err


def test_echo_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    config = default_config(tmp_path, port)
    with Node(config, processor(config)):
        assert main(["echo", "--port", str(port), "--aet", "DICOMNODE"]) == 0
        assert main(["echo", "--port", str(port), "--calling-aet", "INTRUDER"]) == 1
    said = capsys.readouterr().out
    assert "as INTRUDER: FAILED: DICOMNODE@127.0.0.1:" in said
    assert "rejected the association" in said and "calling AE 'INTRUDER'" in said
    assert main(["echo", "--port", str(port), "--aet", "DICOMNODE"]) == 1  # node stopped
    assert "nothing listens there" in capsys.readouterr().out


def test_demo_returns_seg_sc_sr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    said = capsys.readouterr().out
    results = sorted((tmp_path / "demo" / "pacs").glob("*.dcm"))
    assert {pydicom.dcmread(p).SOPClassUID for p in results} == OUTPUT_CLASSES
    assert all(str(p) in said for p in results)


def test_demo_pipeline_option_routes_there_and_keeps_other_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--pipeline`` sends the case to that pipeline; a re-run replaces only the demo's own
    folders under ``--out``."""
    out = tmp_path / "demo"
    out.mkdir()
    keep = out / "notes.txt"
    keep.write_text("mine")
    stale = out / "pacs" / "stale.dcm"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    assert main(["demo", "--out", str(out), "--pipeline", "hyperdense_regions"]) == 0
    assert keep.read_text() == "mine"
    assert not stale.exists()
    results = [pydicom.dcmread(p) for p in sorted((out / "pacs").glob("*.dcm"))]
    descriptions = {str(ds.SeriesDescription) for ds in results}
    assert any("HYPERDENSE" in d.upper() for d in descriptions), descriptions
    assert "risk" not in capsys.readouterr().out.lower()


def test_demo_refuses_an_unknown_pipeline(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--pipeline", "no_such_pipeline"])
    assert "no_such_pipeline" in capsys.readouterr().err


STUDY_DEMOS = sorted(
    name for name in pipeline_names() if (REPO_ROOT / "pipelines" / name / "demo.py").is_file()
)


@pytest.mark.parametrize("pipeline", STUDY_DEMOS)
def test_demo_of_each_pipeline_with_its_own_case(
    pipeline: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``demo --pipeline NAME`` sends that pipeline's generated case (no ../shared needed)
    and gets its SEG, SR and Secondary Capture back."""
    assert main(["demo", "--out", str(tmp_path), "--pipeline", pipeline]) == 0
    said = capsys.readouterr().out
    assert f"case generated by pipelines.{pipeline}.demo" in said
    modalities = {pydicom.dcmread(p).Modality for p in (tmp_path / "pacs").glob("*.dcm")}
    assert {"SEG", "SR"} <= modalities and len(modalities) >= 3, modalities
