"""The identifier scrubber (``dicomnode.phi``) and the log pipeline that applies it."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicomnode import phi
from dicomnode.cli import main
from dicomnode.logs import (
    STDERR_EVENT,
    UNCAUGHT_EVENT,
    WARNING_EVENT,
    JsonStderr,
    configure_logging,
)
from pipelines.synthetic import synthetic_head_ct, write_series

R = phi.REDACTED


@pytest.fixture(autouse=True)
def fresh_registry() -> Iterator[None]:
    """Each test starts with an empty process registry, and leaves one."""
    phi.REGISTRY.clear()
    yield
    phi.REGISTRY.clear()


def _slice(**values: Any) -> Dataset:
    """One small synthetic CT slice with ``values`` set."""
    ds = synthetic_head_ct(seed=2, n_slices=1, rows=16)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some values are malformed on purpose
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return ds


def _encoded(ds: Dataset) -> bytes:
    """``ds`` encoded as a C-STORE carries it: Explicit VR Little Endian, no meta."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def test_person_name_gives_value_groups_components_and_spaced_form() -> None:
    forms = phi.value_forms("PatientName", "DOE^JOHN^^DR=ドウ^ジョン")
    assert {"DOE^JOHN^^DR=ドウ^ジョン", "DOE^JOHN^^DR", "DOE", "JOHN", "ジョン"} <= forms
    assert "DOE JOHN DR" in forms
    assert "DR" not in forms  # shorter than MIN_VALUE_LENGTH: not remembered


def test_multi_values_and_control_characters_are_split() -> None:
    forms = phi.value_forms("OtherPatientIDs", "ID-ONE\\ID-TWO\x07X")
    assert {"ID-ONE", "ID-TWO", "ID-TWO\\x07X"} <= forms
    assert "ID-ONE\\ID-TWO\x07X" in forms


def test_birth_date_reformatted_forms() -> None:
    forms = phi.date_forms("19450317")
    assert {"19450317", "1945-03-17", "17/03/1945", "03/17/1945", "17.03.1945"} <= forms
    assert "1945, 3, 17" in forms  # datetime.date(1945, 3, 17)
    assert phi.date_forms("1945.03.17") >= {"19450317", "1945-03-17"}
    assert phi.date_forms("1945") == {"1945"}


def test_long_values_anywhere_short_ones_as_whole_words_case_insensitive() -> None:
    registry = phi.IdentifierRegistry()
    registry.add(["SMITHSON", "123", "AB"])
    assert registry.scrub("patient smithson, id 123.") == f"patient {R}, id {R}."
    assert registry.scrub("xxSMITHSONyy") == f"xx{R}yy"
    assert registry.scrub("51234 and A123") == "51234 and A123"  # not a whole word
    assert registry.scrub("AB stays") == "AB stays"  # too short to be remembered


def test_longest_value_wins_and_uids_stay_readable() -> None:
    registry = phi.IdentifierRegistry()
    registry.add(["DOE^JOHN", "DOE", "JOHN"])
    assert registry.scrub("name DOE^JOHN") == f"name {R}"
    uid = "1.2.826.0.1.3680043.8.498.55512345678901"
    assert registry.scrub(f"series_uid={uid}") == f"series_uid={uid}"


def test_raw_bytes_and_hex_dumps_are_removed() -> None:
    registry = phi.IdentifierRegistry()
    text = (
        "Invalid element b'\\x10\\x00\\x10\\x00PN\\x08\\x00SECRET^X' then "
        'b"quoted" and \\x01\\x02\\x03\\x04\\x05 and 02 00 00 00 0a 00 00 00 53 45 43 52 done'
    )
    scrubbed = registry.scrub(text)
    assert "SECRET" not in scrubbed and "quoted" not in scrubbed and "53 45" not in scrubbed
    assert scrubbed.count(phi.BYTES_REDACTED) == 4
    assert scrubbed.endswith(" done")


def test_registry_is_bounded_dropping_the_least_recently_seen() -> None:
    registry = phi.IdentifierRegistry(max_values=2)
    registry.add(["FIRSTVALUE", "SECONDVALUE"])
    registry.add(["FIRSTVALUE"])  # seen again: now the most recent
    registry.add(["THIRDVALUE"])
    assert len(registry) == 2
    assert registry.scrub("FIRSTVALUE SECONDVALUE THIRDVALUE") == f"{R} SECONDVALUE {R}"


def test_registry_is_thread_safe() -> None:
    registry = phi.IdentifierRegistry(max_values=10_000)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(50):
                registry.add([f"VALUE{n:02d}X{i:04d}"])
                registry.scrub(f"line with VALUE{n:02d}X{i:04d}")
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(registry) == 400
    assert registry.scrub("VALUE07X0049 VALUE00X0000") == f"{R} {R}"


def test_identifying_values_read_raw_without_warnings(tmp_path: Path) -> None:
    """Malformed values are remembered as sent, and reading them warns about nothing."""
    ds = _slice(
        PatientName="SINGLECOMPONENT",
        PatientBirthDate="1945-03-17",
        AccessionNumber="ACCESSION-FAR-TOO-LONG-FOR-SH",
        InstitutionName="GENERAL HOSPITAL",
        OtherPatientIDs=["OTHERONE", "OTHERTWO"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = write_series([ds], tmp_path)[0]
    read = dcmread(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = phi.identifying_values(read)
    assert caught == []
    assert {"SINGLECOMPONENT", "1945-03-17", "19450317", "GENERAL HOSPITAL"} <= values
    assert {"ACCESSION-FAR-TOO-LONG-FOR-SH", "OTHERONE", "OTHERTWO"} <= values


def test_nested_ids_and_other_character_sets(tmp_path: Path) -> None:
    other = Dataset()
    other.PatientID = "NESTED-OTHER-ID"
    ds = _slice(SpecificCharacterSet="ISO_IR 144", PatientName="Иванов^Иван")
    ds.OtherPatientIDsSequence = [other]
    read = dcmread(write_series([ds], tmp_path)[0])
    values = phi.identifying_values(read)
    assert {"NESTED-OTHER-ID", "Иванов", "Иван"} <= values
    phi.REGISTRY.add(values)
    assert phi.scrub("The string Иванов^Иван") == f"The string {R}"


def test_salvage_reads_identifiers_before_the_break() -> None:
    data = _encoded(_slice(PatientName="TRUNCATED^PERSON", PatientID="PID-BEFORE-BREAK"))
    cut = data.index(b"PID-BEFORE-BREAK") + 20
    values = phi.salvage_identifying_values(data[:cut], implicit_vr=False, little_endian=True)
    assert {"TRUNCATED", "PERSON", "PID-BEFORE-BREAK"} <= values


def test_remember_encoded_inflates_a_deflated_dataset() -> None:
    data = _encoded(_slice(PatientID="DEFLATED-PID"))
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = compressor.compress(data) + compressor.flush()
    phi.remember_encoded(deflated[: len(deflated) // 2], DeflatedExplicitVRLittleEndian)
    assert phi.scrub("id DEFLATED-PID") == f"id {R}"
    phi.remember_encoded(b"\x00\x01garbage", ExplicitVRLittleEndian)  # never raises


def test_remember_files_skips_what_is_not_dicom(tmp_path: Path) -> None:
    path = write_series([_slice(PatientID="FILE-PID-1")], tmp_path / "s")[0]
    (tmp_path / "notes.txt").write_text("not DICOM")
    phi.remember_files([path, tmp_path / "notes.txt", tmp_path / "missing.dcm"])
    assert phi.scrub("FILE-PID-1") == R


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """configure_logging into a buffer; restore the process-wide hooks afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.excepthook, threading.excepthook)
    stream = io.StringIO()
    configure_logging(stream=stream)
    yield stream
    root.handlers[:], root.level = saved[0], saved[1]
    sys.excepthook, threading.excepthook = saved[2], saved[3]
    structlog.reset_defaults()


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line written so far, each parsed as JSON."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_source_is_one_scrubbed_json_line(log_stream: io.StringIO) -> None:
    phi.remember_identifiers(_slice(PatientName="MARKERONLY", PatientID="MARKER-PID"))
    log = structlog.get_logger("dicomnode.test")
    log.info("event MARKERONLY", reason=["MARKER-PID", {"k": "MARKERONLY"}], raw=b"\x00")
    logging.getLogger("highdicom.base").warning("copy of %s", "MARKERONLY")
    logging.getLogger("highdicom.base").info("INFO from a library is not written")
    warnings.warn('The string "MARKERONLY" is unlikely to represent a name', stacklevel=1)
    try:
        raise ValueError("cannot convert 'MARKER-PID'")
    except ValueError:
        log.exception("job failed")
    worker = threading.Thread(target=lambda: sys.exit(repr(b"MARKER-PID")), name="w")
    worker.start()
    worker.join()

    text = log_stream.getvalue()
    lines = _lines(log_stream)
    assert "MARKER" not in text
    assert [line["event"] for line in lines] == [
        f"event {R}",
        f"copy of {R}",
        WARNING_EVENT,
        "job failed",
        UNCAUGHT_EVENT,
    ]
    assert lines[0]["reason"] == [R, {"k": R}] and lines[0]["raw"] == phi.BYTES_REDACTED
    assert lines[1]["logger"] == "highdicom.base"
    assert lines[2]["warning"] == f'The string "{R}" is unlikely to represent a name'
    assert f"ValueError: cannot convert '{R}'" in lines[3]["exception"]
    assert lines[4]["thread"] == "w"


def test_identifying_keys_are_still_dropped(log_stream: io.StringIO) -> None:
    structlog.get_logger("dicomnode.test").warning("x", PatientName="A^B", accession_number="1")
    assert set(_lines(log_stream)[0]) == {"event", "level", "logger", "timestamp"}


def test_stderr_guard_turns_stray_text_into_json_lines() -> None:
    phi.remember_identifiers(_slice(PatientID="STRAY-PID"))
    target = io.StringIO()
    guard = JsonStderr(target)
    guard.write("radiomics: WARNING: no mask for STRAY-PID\nsecond ")
    guard.write("line\n\n")
    guard.write("partial")
    guard.flush()
    lines = [json.loads(line) for line in target.getvalue().splitlines()]
    assert [line["text"] for line in lines] == [
        f"radiomics: WARNING: no mask for {R}",
        "second line",
        "partial",
    ]
    assert {line["event"] for line in lines} == {STDERR_EVENT}


def test_serve_start_up_error_comes_out_as_json_lines(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    log_stream: io.StringIO,
) -> None:
    """Run as a command (no arguments given to ``main``), stderr carries only JSON."""
    config = tmp_path / "bad.toml"
    config.write_text('spool_dir = "s"\nstate_dir = "t"\n[node]\nport = 70000\n')
    monkeypatch.setattr(sys, "argv", ["dicomnode", "serve", "--config", str(config)])
    assert main() == 2
    sys.stderr.flush()
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert {r["event"] for r in records} == {STDERR_EVENT}
    assert any("node.port" in r["text"] for r in records)
