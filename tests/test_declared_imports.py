"""pyproject.toml declares every third-party module the shipped packages import, and no
node setting is read from the environment."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from tests.support import REPO_ROOT

PACKAGES = ("dicomnode", "pipelines", "model_store")
# The one environment variable read: where the demo and the synthetic cohort find the
# optional real head CT data of the test suite (../shared); `dicomnode demo --shared`
# overrides it. It configures no part of a serving node.
ALLOWED_ENVIRONMENT = {("dicomnode/demo.py", "DICOMNODE_SHARED"),
                       ("pipelines/cohort.py", "DICOMNODE_SHARED")}  # fmt: skip


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py"))


def _imported_top_levels() -> set[str]:
    """Top-level names of every absolute import in the shipped packages."""
    found: set[str] = set()
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def _normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    """Every distribution pyproject.toml requires, extras included."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {_normalise(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}


def test_every_third_party_import_is_declared() -> None:
    distributions = packages_distributions()
    declared = _declared()
    missing = []
    for module in sorted(_imported_top_levels()):
        if module in sys.stdlib_module_names or module in PACKAGES or module == "__future__":
            continue
        owners = {_normalise(d) for d in distributions.get(module, [module])}
        if not owners & declared:
            missing.append(f"{module} (from {sorted(owners)})")
    assert missing == [], f"imported but not in pyproject.toml: {missing}"


def test_no_setting_comes_from_the_environment() -> None:
    reads = set()
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"os\.(?:environ(?:\.get)?|getenv)\(?\[?\s*\"([A-Z_]+)\"", text):
            reads.add((path.relative_to(REPO_ROOT).as_posix(), match.group(1)))
        assert "os.environ[" not in text or (path.name in {"demo.py", "cohort.py"}), path
    assert ("dicomnode/demo.py", "DICOMNODE_SHARED") in reads  # the scan sees a known read
    assert reads <= ALLOWED_ENVIRONMENT, reads - ALLOWED_ENVIRONMENT
