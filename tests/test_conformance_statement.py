"""docs/conformance-statement.md stays true: its tables equal the code's constants."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import highdicom as hd
from pydicom import uid

from dicomnode.conformance import CREATED_OBJECTS, SCU_SOP_CLASSES, SCU_TRANSFER_SYNTAXES
from dicomnode.door import (
    CALLED_AE_NOT_RECOGNISED,
    CALLING_AE_NOT_RECOGNISED,
    AssociationLimits,
    limit_rejection,
)
from dicomnode.receiver import STORAGE_CLASSES, TRANSFER_SYNTAXES, VERIFICATION_SOP_CLASS
from dicomnode.sender import _contexts
from dicomnode.status import status_table_markdown
from dicomnode.watermark import space_rejection
from tests.support import REPO_ROOT

STATEMENT = REPO_ROOT / "docs" / "conformance-statement.md"
OUTPUTS = REPO_ROOT / "pipelines" / "outputs"
_UID_CELL = re.compile(r"`(\d+(?:\.\d+)+)`")


def _table(name: str) -> list[str]:
    """The rows of the table after ``<!-- table: name -->`` (header and rule included)."""
    lines = STATEMENT.read_text(encoding="utf-8").splitlines()
    start = lines.index(f"<!-- table: {name} -->") + 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    assert rows, f"table {name} is empty"
    return rows


def _uids(name: str) -> list[str]:
    """The UID in each data row of a table, in order."""
    found = []
    for row in _table(name)[2:]:
        match = _UID_CELL.search(row)
        assert match is not None, row
        found.append(match.group(1))
    return found


def test_scp_sop_classes_and_transfer_syntaxes() -> None:
    assert _uids("scp-sop-classes") == [VERIFICATION_SOP_CLASS, *STORAGE_CLASSES]
    assert _uids("scp-transfer-syntaxes") == list(TRANSFER_SYNTAXES)


def test_scu_sop_classes_and_transfer_syntaxes() -> None:
    assert _uids("scu-sop-classes") == list(SCU_SOP_CLASSES)
    assert _uids("scu-transfer-syntaxes") == list(SCU_TRANSFER_SYNTAXES)
    offered = _contexts({Path("seg.dcm"): (uid.SegmentationStorage, uid.ExplicitVRLittleEndian)})
    assert offered[0].transfer_syntax == list(SCU_TRANSFER_SYNTAXES)


def test_every_status_is_stated() -> None:
    assert "\n".join(_table("statuses")) == status_table_markdown()


def test_association_rejections() -> None:
    rows = _table("association-rejections")[2:]
    numbers = [tuple(int(cell.split()[0]) for cell in row.split("|")[1:4]) for row in rows]
    limit = limit_rejection(32, 0, AssociationLimits())
    space = space_rejection(0, 1)
    assert limit is not None and space is not None
    expected = [
        (int(r.result), int(r.source), int(r.diagnostic))
        for r in (CALLED_AE_NOT_RECOGNISED, CALLING_AE_NOT_RECOGNISED, limit)
    ]
    assert numbers == expected
    assert (space.result, space.source, space.diagnostic) == (
        limit.result, limit.source, limit.diagnostic,
    )  # fmt: skip


def _iod_builders() -> set[str]:
    """Every highdicom IOD class ``pipelines/outputs`` constructs, as ``hd.mod.Class``."""
    found: set[str] = set()
    for path in OUTPUTS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Attribute):
                continue
            chain = ast.unparse(node).split(".")
            if chain[0] != "hd" or len(chain) < 3:
                continue
            target: object = hd
            for part in chain[1:3]:
                target = getattr(target, part, None)
            if isinstance(target, type) and issubclass(target, hd.SOPClass):
                found.add(".".join(chain[:3]))
    return found


def test_created_objects_are_what_the_writers_build() -> None:
    assert _uids("created-objects") == [o.sop_class_uid for o in CREATED_OBJECTS]
    assert {o.builder for o in CREATED_OBJECTS} == _iod_builders()
    text = STATEMENT.read_text(encoding="utf-8")
    assert "trained on synthetic data - not for clinical use" in text
