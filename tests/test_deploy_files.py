"""deploy/ is complete for a systemd site: the unit's user and folders are created by the
sysusers.d and tmpfiles.d snippets, the example config writes only where the unit
allows, and the example config names every node setting."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from dicomnode.config import NodeConfig, load_config
from tests.support import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
EXAMPLE = DEPLOY / "dicomnode.example.toml"
# Sections whose keys are documented by their owners ([pipelines.*], [node.tls], ...).
OTHER_SECTIONS = {"pipelines", "tls", "connections", "allowed_callers", "destinations",
                  "routes"}  # fmt: skip


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "dicomnode.service")
    return unit


def _tmpfiles() -> dict[str, tuple[str, str, str]]:
    """Folder -> (mode, user, group) of the tmpfiles.d snippet's ``d`` lines."""
    folders = {}
    for line in (DEPLOY / "dicomnode.tmpfiles.conf").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == "d":
            folders[fields[1]] = (fields[2], fields[3], fields[4])
    return folders


def test_unit_user_and_folders_are_created_by_the_snippets() -> None:
    service = _unit()["Service"]
    sysusers = (DEPLOY / "dicomnode.sysusers.conf").read_text().splitlines()
    users = {line.split()[1] for line in sysusers if line.startswith("u ")}
    assert service["User"] in users and service["Group"] in users
    folders = _tmpfiles()
    writable = service["ReadWritePaths"].split()
    for path in writable:
        assert path in folders and folders[path][1] == service["User"], path
    assert service["WorkingDirectory"] in folders
    config_path = re.search(r"--config (\S+)", service["ExecStart"])
    assert config_path is not None
    assert str(Path(config_path.group(1)).parent) in folders


def test_example_config_writes_only_where_the_unit_allows() -> None:
    config = load_config(EXAMPLE)
    writable = [Path(p) for p in _unit()["Service"]["ReadWritePaths"].split()]
    for folder in (config.spool_dir, config.state_dir):
        assert any(folder.is_relative_to(root) for root in writable), folder
        assert str(folder) in _tmpfiles()


def _keys(model: type[BaseModel], prefix: str) -> list[tuple[str, str]]:
    """(section, key) of every setting, sections recursed, others' sections skipped."""
    found = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        nested = [a for a in getattr(annotation, "__args__", (annotation,)) if
                  isinstance(a, type) and issubclass(a, BaseModel)]  # fmt: skip
        if name in OTHER_SECTIONS:
            continue
        if nested:
            found += _keys(nested[0], f"{prefix}.{name}" if prefix else name)
        else:
            found.append((prefix, name))
    return found


def test_example_config_names_every_setting() -> None:
    text = EXAMPLE.read_text()
    tomllib.loads(text)
    missing = []
    for section, key in _keys(NodeConfig, ""):
        header = text.find(f"[{section}]") if section else 0
        if header < 0 or not re.search(rf"^#?\s*{key}\s*=", text[header:], re.MULTILINE):
            missing.append(f"{section}.{key}" if section else key)
    assert missing == []


def test_unit_verifies_where_systemd_is_installed() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(DEPLOY / "dicomnode.service")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    problems = [
        line for line in result.stderr.splitlines()
        if "dicomnode.service" in line and "Command /opt/dicomnode" not in line
    ]  # fmt: skip
    assert problems == []
