"""Regression: datasets with very long identifying values must not silence the node.

The fuzz run found it: its "value" mutation sets a 5000-character PatientName, and a
mutated length field makes a PatientName swallow the bytes that follow it; such a value is
remembered for scrubbing (``dicomnode.phi``), and building the scrubbing
pattern then raised ``RecursionError`` in every later log call. Raised inside the
C-STORE handler and again in the thread's exception hook, it ended the association's
thread silently, leaving its DUL thread up: the sender got no response until its DIMSE
timeout, on that association and every later one. The node runs here as the command
line does (``serve``, stderr guarded), over real associations.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import uid
from pydicom.dataset import Dataset

from bench.fuzz import Case, DatasetSender, encode, part10_file
from bench.peers import NodeProcess, node_config_toml
from dicomnode import logs, phi
from dicomnode.status import Status
from pipelines.synthetic import synthetic_head_ct
from tests.support import free_port

DIMSE_TIMEOUT_S = 8.0  # the old failure: no response at all within this time
PROMPT_S = 3.0  # a valid instance afterwards is answered within this time
PATIENT_NAME_TAG = struct.pack("<HH", 0x0010, 0x0010)
LONG = 3000


def _case(kind: str, ds: Dataset, data: bytes | None = None) -> Case:
    """A case sent on the CT context in Explicit VR Little Endian."""
    return Case(
        kind, encode(ds) if data is None else data, uid.CTImageStorage,
        str(ds.SOPInstanceUID), uid.ExplicitVRLittleEndian,
    )  # fmt: skip


def _swallowing_name(ds: Dataset) -> bytes:
    """``ds`` with its PatientName's length field rewritten to take in what follows."""
    data = bytearray(encode(ds))
    offset = data.index(PATIENT_NAME_TAG + b"PN")
    struct.pack_into("<H", data, offset + 6, min(LONG, len(data) - offset - 8))
    return bytes(data)


def _long_values_cases(series: list[Dataset]) -> list[Case]:
    """Instances whose identifying values run to thousands of characters."""
    no_study = copy.deepcopy(series[0])
    no_study.PatientName = "LONGNAME^" + "X" * LONG
    del no_study.StudyInstanceUID  # refused, so the refusal is logged with the value known
    long_id = copy.deepcopy(series[1])
    long_id.PatientID = "".join(chr(ord("A") + i % 26) for i in range(LONG))
    del long_id.StudyInstanceUID
    return [
        _case("long_patient_name", no_study),
        _case("long_patient_id", long_id),
        _case("length_field_patient_name", series[2], _swallowing_name(series[2])),
    ]


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A node started from the command line on a free port (stopped after the test)."""
    port = free_port()
    config = node_config_toml(tmp_path, port, None, stable_age_s=60.0, route=False)
    process = NodeProcess(config, port, tmp_path / "node.log")
    process.start()
    yield process
    process.stop()


def test_long_identifying_values_keep_the_node_answering(node: NodeProcess, tmp_path: Path) -> None:
    """Each long-valued instance gets a response, then a valid one gets Success promptly,
    on the same association and on a new one; the log stays JSON with no traceback."""
    series = synthetic_head_ct(seed=3, n_slices=5, rows=32)
    sender = DatasetSender(node.port, per_association=100)
    sender.ae.dimse_timeout = DIMSE_TIMEOUT_S
    path = tmp_path / "case.dcm"
    try:
        for case in _long_values_cases(series):
            status = sender.send(part10_file(case, path))
            assert status.startswith("0x"), f"{case.kind}: {status}"
        for fresh_association, ds in ((False, series[3]), (True, series[4])):
            if fresh_association:
                sender.close()
            began = time.monotonic()
            status = sender.send(part10_file(_case("valid", ds), path))
            took = time.monotonic() - began
            assert status == f"0x{Status.SUCCESS:04X}", status
            assert took < PROMPT_S, f"valid instance answered after {took:.1f} s"
    finally:
        sender.close()
    assert node.alive()
    lines = node.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert not [r for r in records if r.get("event") == "uncaught exception"]
    assert not [r for r in records if "Traceback" in json.dumps(r)]
    assert "LONGNAME" not in "\n".join(lines)


def test_scrub_pattern_of_long_values_builds_deep_in_a_stack() -> None:
    """Values of thousands of characters, and long chains of prefixes, still compile to
    a pattern (from a deep call stack, as a log call inside pynetdicom is) and scrub."""
    registry = phi.IdentifierRegistry()
    registry.add(["A" * n for n in range(6, phi.TRIE_VALUE_LENGTH + 1)])
    registry.add(["LONGNAME^" + "X" * LONG, "".join(chr(65 + i % 26) for i in range(LONG))])

    def deep(depth: int) -> str:
        if depth:
            return deep(depth - 1)
        return registry.scrub(f"name LONGNAME^{'X' * LONG} id {'a' * 70} end")

    scrubbed = deep(sys.getrecursionlimit() - 200)
    assert "LONGNAME" not in scrubbed and "XXX" not in scrubbed and "aaa" not in scrubbed
    assert scrubbed.startswith("name ") and scrubbed.endswith(" end")


def test_unformattable_record_becomes_a_fixed_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A record the formatter cannot scrub is replaced by a fixed JSON line, and the
    logging call does not raise into its caller."""

    def broken(text: str) -> str:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(phi, "scrub", broken)
    stream = io.StringIO()
    handler = logs.JsonLineHandler(stream)
    handler.setFormatter(logs._formatter())
    record = logging.LogRecord(
        "dicomnode.x", logging.WARNING, __file__, 1, "SECRET %s", ("v",), None
    )
    handler.emit(record)
    line = json.loads(stream.getvalue())
    assert line["event"] == logs.UNFORMATTABLE_EVENT
    assert line["error"] == "RecursionError" and line["logger"] == "dicomnode.x"
    assert "SECRET" not in stream.getvalue()


def test_new_values_are_scrubbed_before_the_trie_is_rebuilt() -> None:
    """A new value is scrubbed at once, without rebuilding the trie (a rebuild costs
    about 0.1 s with many values: one per new dataset would slow the receiver down)."""
    registry = phi.IdentifierRegistry()
    registry.add([f"PATIENT{i:04d}" for i in range(phi.PENDING_VALUES)])
    built = registry.pattern()
    assert built is not None
    registry.add([f"NEWCOMER{i:03d}" for i in range(phi.PENDING_VALUES - 1)])
    assert registry.pattern() is built
    assert registry.scrub("a NEWCOMER007 and newcomer062 and PATIENT0001") == (
        f"a {phi.REDACTED} and {phi.REDACTED} and {phi.REDACTED}"
    )
    registry.add(["NEWCOMER999"])
    assert registry.pattern() is not built
    assert registry.scrub("NEWCOMER999 NEWCOMER001") == f"{phi.REDACTED} {phi.REDACTED}"
