"""The bench harnesses (``bench/kill9.py``, ``bench/fuzz.py``) in a tiny configuration,
so that they cannot rot: each runs against the real node process, DCMTK and Orthanc;
``bench/gradcam_placement.py`` runs each pipeline's lesion finding on two generated cases;
``bench/journal_sync.py`` and ``bench/ingest_profile.py`` measure on a few appends and
one series."""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom import _config

from bench import fuzz, gradcam_placement, ingest_profile, journal_sync, kill9, peers
from pipelines.synthetic import synthetic_head_ct, write_series
from tests.scp import storage_scp
from tests.support import free_port, require_tool


def test_kill9_two_kill_points_lose_nothing(tmp_path: Path) -> None:
    """Kill -9 once during ingest and once during processing: nothing acknowledged is
    lost and Orthanc holds each result once."""
    require_tool("storescu", "dcmtk")
    require_tool("Orthanc", "orthanc")
    settings = kill9.Settings(
        kills=2, seed=3, rows=96, slices=8, stable_age_s=4.0,
        work=tmp_path / "work", results_dir=tmp_path / "results",
    )  # fmt: skip
    summary = kill9.run(settings)
    points = summary["kill_points"]
    assert [p["phase"] for p in points] == ["ingest", "processing"]
    instances = summary["instances"]
    assert instances["acknowledged"] == 16, instances
    assert instances["lost"] == 0 and instances["changed"] == 0, instances
    results = summary["results"]
    assert results["results_sent"] > 0, results
    assert results["missing_in_pacs"] == 0, results
    assert results["orphans_in_pacs"] == 0, results
    assert results["duplicate_series"] == 0, results
    assert summary["node_starts"] == 3
    assert summary["still_busy_at_end"] == {}, kill9.table(summary)
    written = kill9.write_results(summary, settings.results_dir, "kill9")
    assert written.read_text().startswith("{")
    assert "lost: 0" in kill9.table(summary)


def test_fuzz_small_run_records_statuses_and_node_still_serves(tmp_path: Path) -> None:
    """200 mutated datasets and 12 mutated PDUs: every case has an outcome, the node
    process survives, and afterwards it answers C-ECHO and stores a valid series."""
    require_tool("storescu", "dcmtk")
    settings = fuzz.Settings(
        datasets=200, pdus=12, seed=5, time_limit_s=120.0, pdu_wait_budget_s=0.0,
        recovery_timeout_s=60.0, work=tmp_path / "work", results_dir=tmp_path / "results",
    )  # fmt: skip
    summary = fuzz.run(settings)
    assert summary["datasets_sent"] == 200
    assert sum(summary["status_histogram"].values()) == 200
    assert "0x0000" in summary["status_histogram"]
    assert len(summary["status_by_mutation"]) >= 8
    assert summary["pdus_sent"] == 12
    assert sum(summary["pdu_replies"].values()) == 12
    assert summary["node_died_at"] is None
    assert summary["node_alive_after"] is True
    assert summary["seconds_until_echo_after"] is not None
    assert summary["valid_series_stored_after"] is True
    assert summary["valid_series_recorded"] == "8/8"
    assert isinstance(summary["node_peak_rss_mb"], float)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x08\x00\x60\x00CS\x02\x00CT", [(0, b"CS", 8, 2)]),
        (b"\xe0\x7f\x10\x00OW\x00\x00\x04\x00\x00\x00\x01\x02\x03\x04", [(0, b"OW", 12, 4)]),
        (b"\x08\x00\x60\x00CS\x02", []),
    ],
)
def test_element_walk(data: bytes, expected: list[tuple[int, bytes, int, int]]) -> None:
    """The fuzz harness finds top-level elements of short and long VRs, and stops at a cut."""
    found = [(e.offset, e.vr, e.header, e.length) for e in fuzz.elements(data)]
    assert found == expected


def test_storescu_output_is_parsed_per_file(tmp_path: Path) -> None:
    """Only files answered Success count as acknowledged; an unanswered one does not."""
    lines = [
        "I: Sending file: a.dcm",
        "I: Received Store Response (Success)",
        "I: Sending file: b.dcm",
        "I: Received Store Response (Failure: Out of Resources)",
        "I: Sending file: c.dcm",
        "F: Store Failed, file: c.dcm:",
    ]
    parsed = peers.parse_storescu(lines, tmp_path)
    assert parsed == {
        (tmp_path / "a.dcm").resolve(): "Success",
        (tmp_path / "b.dcm").resolve(): "Failure",
    }


def test_fuzz_sender_leaves_pynetdicom_settings_as_it_found_them(tmp_path: Path) -> None:
    """The fuzz sender switches pynetdicom's process-wide chunked sending on only while it
    sends: other senders in the same process (a node's outbox) must not inherit it."""
    (path,) = write_series(synthetic_head_ct(seed=2, n_slices=1, rows=32), tmp_path / "one")
    port = free_port()
    with storage_scp(port) as pacs:
        sender = fuzz.DatasetSender(port, per_association=1)
        assert sender.send(path) == "0x0000"
        sender.close()
    assert len(pacs.received) == 1
    assert _config.STORE_SEND_CHUNKED_DATASET is False


@pytest.mark.parametrize("pipeline", sorted(gradcam_placement.METHODS))
def test_gradcam_placement_two_cases_every_method(pipeline: str, tmp_path: Path) -> None:
    """Two generated cases through each pipeline's lesion finding: every raw map measured
    for every method, the summary table written (with the CNN's own AUC for
    ``ht_after_mt``)."""
    rows = 96 if pipeline == "ht_after_mt" else gradcam_placement.ROWS[pipeline]
    placements, extra = gradcam_placement.measure(pipeline, 2, 9301, rows, tmp_path / "cohort")
    methods = list(gradcam_placement.METHODS[pipeline])
    assert {p.method for p in placements} == set(methods)
    missed = extra["cases_without_lesion"]
    assert isinstance(missed, list)
    for method in methods:
        maps = [p for p in placements if p.method == method]
        assert sum(p.frame_offset == 0 for p in maps) == 2 - len(missed)
    assert all(0.0 <= p.near_share <= 1.0 and p.peak_mm >= 0.0 for p in placements)
    summaries = gradcam_placement.summarise(pipeline, placements)
    assert [(s.method, s.maps) for s in summaries][:2] == [
        (methods[0], "all"),
        (methods[0], "key frame"),
    ]
    text = gradcam_placement.table(summaries, extra)
    assert f"{pipeline} model" in text
    assert ("CNN's own AUC" in text) == (pipeline == "ht_after_mt")


def test_journal_sync_measures_every_method(tmp_path: Path) -> None:
    """Each way of making an append durable gets a positive median latency."""
    medians = journal_sync.run(tmp_path, count=6, record_kib=8)
    assert set(medians) == {
        "fdatasync_fallocated", "fdatasync_prewritten", "o_dsync_prewritten",
        "rwf_dsync_prewritten", "sync_file_range_prewritten",
    }  # fmt: skip
    assert all(ms > 0 for ms in medians.values())
    assert not list(tmp_path.iterdir())  # its files are removed


def test_ingest_profile_reports_the_receivers_functions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One series over two associations under the profiler: the C-STORE handler is among
    the functions reported, with CPU per instance."""
    require_tool("storescu", "dcmtk")
    assert ingest_profile.main(["--series", "1", "--associations", "2", "--top", "400"]) == 0
    out = capsys.readouterr().out
    assert "28 instances" in out and "profiled CPU" in out
    assert "receiver.py" in out and "(_on_store)" in out
