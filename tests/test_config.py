"""Config: the example file loads, invalid files are refused naming each field."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.config import ConfigError, NodeConfig, default_config, load_config
from tests.support import REPO_ROOT

EXAMPLE = REPO_ROOT / "deploy" / "dicomnode.example.toml"

MINIMAL = """
spool_dir = "spool"
state_dir = "state"
[[allowed_callers]]
ae_title = "STORESCU"
[destinations.PACS]
ae_title = "PACS"
host = "127.0.0.1"
port = 104
[[routes]]
name = "head"
pipeline = "hyperdense_regions"
destinations = ["PACS"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    """Write a config file and return its path."""
    path = tmp_path / "node.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_file_loads() -> None:
    """The shipped example is valid and routes head CT to PACS."""
    config = load_config(EXAMPLE)
    assert config.node.ae_title == "DICOMNODE"
    assert config.routes[0].destinations == ["PACS"]
    assert "PACS" in config.destinations


def test_relative_dirs_resolve_beside_the_file(tmp_path: Path) -> None:
    """Relative spool and state folders are taken relative to the config file."""
    config = load_config(_write(tmp_path, MINIMAL))
    assert config.spool_dir == tmp_path / "spool"
    assert config.state_dir == tmp_path / "state"
    assert config.node.port == 11112


def test_unknown_destination_is_named_by_path(tmp_path: Path) -> None:
    """A route naming a destination that does not exist is refused with its path."""
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, MINIMAL.replace('["PACS"]', '["PACS", "PACS2"]')))
    assert "routes.0.destinations: unknown destination 'PACS2'" in str(caught.value)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("port = 104", "port = 70000", "destinations.PACS.port:"),
        ('name = "head"', 'name = "head"\ncolour = "red"', "routes.0.colour: Extra inputs"),
        ('ae_title = "STORESCU"', 'ae_title = "A_TITLE_LONGER_THAN_16"', "allowed_callers.0"),
        (
            'destinations = ["PACS"]',
            'destinations = ["PACS"]\nmatch = { series_description = "([" }',
            "routes.0.match.series_description: Value error, invalid regular expression",
        ),
    ],
)
def test_invalid_fields_are_listed(tmp_path: Path, old: str, new: str, expected: str) -> None:
    """Each invalid field is reported as a dotted path with the reason."""
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, MINIMAL.replace(old, new, 1)))
    assert expected in str(caught.value)


def test_several_problems_are_all_listed(tmp_path: Path) -> None:
    """All invalid fields are listed at once, not only the first."""
    text = MINIMAL.replace("port = 104", "port = 0").replace('"STORESCU"', '"A\\\\B"')
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text))
    assert len(caught.value.problems) == 2


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    """Unreadable or malformed files raise ConfigError too."""
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(_write(tmp_path, "node = [unclosed"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_default_config_is_valid(tmp_path: Path) -> None:
    """The demo config validates and puts everything under the base folder."""
    config = default_config(tmp_path, 11112)
    NodeConfig.model_validate(config.model_dump())
    assert config.spool_dir == tmp_path / "spool"
    assert config.destinations["PACS"].port == 11113
