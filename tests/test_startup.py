"""Start-up faults are one-line errors an admin can act on, never tracebacks."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dicomnode.cli import main
from tests.support import free_port


def _config(tmp_path: Path, port: int, spool: str = "spool", http_port: int | None = None) -> Path:
    """A minimal config file for a node on loopback ``port``."""
    text = f"""
spool_dir = "{spool}"
state_dir = "state"
[node]
host = "127.0.0.1"
port = {port}
[[allowed_callers]]
ae_title = "STORESCU"
"""
    if http_port is not None:
        text += f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n'
    path = tmp_path / "node.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The command's stderr, asserted to be exactly one line without a traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("{")]  # JSON log lines
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_port_in_use_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--config", str(_config(tmp_path, port))]) == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"dicomnode: cannot listen for DICOM on 127.0.0.1:{port}: ")
    assert "in use" in line


def test_http_port_in_use_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        http_port = busy.getsockname()[1]
        config = _config(tmp_path, free_port(), http_port=http_port)
        assert main(["serve", "--config", str(config)]) == 2
    assert f"cannot listen for HTTP on 127.0.0.1:{http_port}" in _one_line_error(capsys)


def test_unwritable_spool_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    config = _config(tmp_path, free_port(), spool="a-file/spool")
    assert main(["serve", "--config", str(config)]) == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"dicomnode: spool_dir {tmp_path / 'a-file' / 'spool'} is not writable")
    assert "Not a directory" in line


def test_free_ports_are_never_handed_out_twice() -> None:
    """Two calls in a row may get the same port from the kernel; a node given it for
    DICOM and HTTP would not start (the demo and the tests ask for two at once)."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
