"""DICOM TLS against DCMTK: storescu into the node, the node's outbox into storescp.

Certificates are made in the test with ``openssl``: a CA, a server certificate for
``localhost`` / 127.0.0.1, a client certificate from the same CA, and a self-signed
client certificate the node must not trust.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from dicomnode.config import (
    ConfigError,
    Destination,
    NodeConfig,
    RouteMatch,
    RouteRule,
    load_config,
)
from dicomnode.node import Node
from dicomnode.records import OutboxState
from dicomnode.sender import send_files
from dicomnode.status import Status
from dicomnode.tls import ClientTls, ServerTls
from pipelines.synthetic import synthetic_head_ct, write_series
from tests.support import REPO_ROOT, free_port, require_tool
from tests.test_door import _config
from tests.test_receiver import copy_first

SLICES = 3
CLOSED_EARLY = "connection closed without association request"


@dataclass(frozen=True)
class Pki:
    """The files of the test's public key infrastructure."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # self-signed, unknown to the node
    rogue_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    """Run one openssl command, failing the test with its output if it fails."""
    tool = require_tool("openssl", "openssl")
    done = subprocess.run(
        [tool, *map(str, args)], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def _issue(folder: Path, name: str, subject: str, extensions: str) -> None:
    """A key and a certificate signed by the test CA in ``folder``."""
    (folder / f"{name}.ext").write_text(extensions, encoding="ascii")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=folder)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.pem",
             "-extfile", f"{name}.ext", cwd=folder)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """CA, server, client and rogue certificates made with openssl."""
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", "2", "-subj", "/CN=dicomnode test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)  # fmt: skip
    _issue(folder, "server", "/CN=localhost",
           "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")  # fmt: skip
    _issue(folder, "client", "/CN=STORESCU", "extendedKeyUsage=clientAuth\n")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key",
             "-out", "rogue.pem", "-days", "2", "-subj", "/CN=rogue", cwd=folder)  # fmt: skip
    return Pki(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        rogue_cert=folder / "rogue.pem",
        rogue_key=folder / "rogue.key",
    )


def _series(tmp_path: Path) -> Path:
    """A small generated head CT series; its folder."""
    folder = tmp_path / "series"
    write_series(synthetic_head_ct(seed=4, n_slices=SLICES, rows=64), folder)
    return folder


def _storescu(port: int, folder: Path, *tls: str | Path) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu sending ``folder`` to the node with the TLS options ``tls``."""
    tool = require_tool("storescu", "dcmtk")
    return subprocess.run(
        [tool, *map(str, tls), "-aec", "DICOMNODE", "+sd", "127.0.0.1", str(port), str(folder)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _tls_node_config(tmp_path: Path, pki: Pki) -> NodeConfig:
    """A node that speaks only TLS and requires a client certificate from the test CA."""
    config = _config(tmp_path, request_timeout_s=2.0)
    config.node.tls = ServerTls(
        certificate=pki.server_cert,
        private_key=pki.server_key,
        ca_certificates=pki.ca,
        require_client_certificate=True,
    )
    return config


def test_storescu_stores_over_tls_and_others_are_refused(tmp_path: Path, pki: Pki) -> None:
    """storescu with a client certificate from the CA stores (while silent sockets wait
    for their handshake); plain DICOM and an untrusted certificate are refused, logged."""
    config = _tls_node_config(tmp_path, pki)
    folder = _series(tmp_path)
    with structlog.testing.capture_logs() as logs, Node(config, copy_first) as node:
        port = config.node.port
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        started = time.monotonic()
        good = _storescu(port, folder, "+tls", pki.client_key, pki.client_cert, "+cf", pki.ca)
        elapsed = time.monotonic() - started
        plain = _storescu(port, folder)
        rogue = _storescu(port, folder, "+tls", pki.rogue_key, pki.rogue_cert, "+cf", pki.ca)
        for sock in silent:
            sock.close()
        assert node.store is not None
        stored = sum(series.instance_count for series in node.store.all_series())
    assert good.returncode == 0, good.stderr
    assert elapsed < 5.0
    assert stored == SLICES
    assert plain.returncode != 0 and rogue.returncode != 0
    failures = [e["reason"] for e in logs if e["event"] == CLOSED_EARLY]
    handshakes = [reason for reason in failures if reason.startswith("TLS handshake failed")]
    assert len(handshakes) >= 2, failures  # the plain and the rogue sender
    assert any("certificate" in reason for reason in handshakes), handshakes
    assert all(e["peer_host"] == "127.0.0.1" for e in logs if e["event"] == CLOSED_EARLY)


@contextmanager
def _storescp_tls(pki: Pki, port: int, out: Path) -> Iterator[subprocess.Popen[bytes]]:
    """DCMTK storescp over TLS on ``port``, requiring a client certificate from the CA."""
    tool = require_tool("storescp", "dcmtk")
    out.mkdir()
    process = subprocess.Popen(
        [tool, "+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca),
         "-rc", "-aet", "PACS", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


def _pacs(port: int, pki: Pki, **tls: object) -> Destination:
    """The storescp destination, over TLS with the client certificate."""
    settings = {"ca_certificates": pki.ca, "certificate": pki.client_cert,
                "private_key": pki.client_key, **tls}  # fmt: skip
    return Destination(ae_title="PACS", host="127.0.0.1", port=port,
                       tls=ClientTls.model_validate(settings))  # fmt: skip


def test_outbox_delivers_over_tls_to_storescp(tmp_path: Path, pki: Pki) -> None:
    """A routed series' result goes out over TLS to DCMTK storescp, which requires and
    verifies the node's client certificate."""
    config = _config(tmp_path)
    pacs_port = free_port()
    config.destinations = {"PACS": _pacs(pacs_port, pki)}
    config.routes = [
        RouteRule(name="head", match=RouteMatch(modality=["CT"]), pipeline="copy",
                  destinations=["PACS"])
    ]  # fmt: skip
    config.stable_age_s = 0.5
    config.poll_interval_s = 0.1
    folder = _series(tmp_path)
    received = tmp_path / "received"
    with _storescp_tls(pki, pacs_port, received), Node(config, copy_first) as node:
        assert _storescu(config.node.port, folder).returncode == 0
        assert node.wait_idle(timeout=20)
        (item,) = node.outbox.items()
    assert item.state is OutboxState.SENT
    assert len(list(received.iterdir())) == 1


def test_sender_checks_the_destination_hostname(tmp_path: Path, pki: Pki) -> None:
    """The destination's certificate must name ``server_hostname``; with the check off,
    the chain alone is verified."""
    folder = _series(tmp_path)
    files = sorted(folder.iterdir())[:1]
    port = free_port()
    with _storescp_tls(pki, port, tmp_path / "received"):
        wrong = send_files(_pacs(port, pki, server_hostname="pacs.example.org"), files, "DICOMNODE")
        unchecked = _pacs(port, pki, server_hostname="pacs.example.org", check_hostname=False)
        right = send_files(unchecked, files, "DICOMNODE")
    (failed,) = wrong.values()
    assert failed.status is None and failed.error is not None
    assert "not established (refused or aborted) over TLS" in failed.error
    (sent,) = right.values()
    assert sent.status == Status.SUCCESS


BASE = """
spool_dir = "spool"
state_dir = "state"
[[allowed_callers]]
ae_title = "STORESCU"
"""


def _write(tmp_path: Path, text: str) -> Path:
    """A config file in ``tmp_path``."""
    path = tmp_path / "node.toml"
    path.write_text(BASE + text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ('certificate = "absent.pem"\nprivate_key = "server.key"',
         "node.tls.certificate: Value error, file not found: "),
        ('certificate = "garbage.pem"\nprivate_key = "server.key"',
         "node.tls.certificate: Value error, no PEM certificate can be read from "),
        ('certificate = "server.pem"\nprivate_key = "client.key"',
         "node.tls: Value error, private_key "),
        ('certificate = "server.pem"\nprivate_key = "server.key"\n'
         "require_client_certificate = true",
         "node.tls: Value error, require_client_certificate needs ca_certificates"),
    ],
)  # fmt: skip
def test_bad_tls_files_are_config_errors(tmp_path: Path, pki: Pki, tls: str, expected: str) -> None:
    """Missing, malformed or mismatched files are refused at load, naming the field."""
    for path in (pki.server_cert, pki.server_key, pki.client_key):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, "[node.tls]\n" + tls))
    (problem,) = caught.value.problems
    assert problem.startswith(expected), problem
    assert "\n" not in problem


def test_relative_tls_files_resolve_beside_the_config(tmp_path: Path, pki: Pki) -> None:
    """A config with relative TLS paths loads wherever the process runs."""
    for path in (pki.server_cert, pki.server_key, pki.ca):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    text = '[node.tls]\ncertificate = "server.pem"\nprivate_key = "server.key"\n'
    text += 'ca_certificates = "ca.pem"\n'
    text += '[destinations.PACS]\nae_title = "PACS"\nhost = "localhost"\nport = 2762\n'
    text += '[destinations.PACS.tls]\nca_certificates = "ca.pem"\n'
    config = load_config(_write(tmp_path, text))
    assert config.node.tls is not None and config.node.tls.certificate == tmp_path / "server.pem"
    tls = config.destinations["PACS"].tls
    assert tls is not None and tls.ca_certificates == tmp_path / "ca.pem"


def test_serve_with_a_bad_certificate_is_a_one_line_error(tmp_path: Path) -> None:
    """``dicomnode serve`` with an unreadable certificate exits 2 with no traceback."""
    path = _write(tmp_path, '[node.tls]\ncertificate = "absent.pem"\nprivate_key = "k.pem"\n')
    done = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "node.tls.certificate" in done.stderr and "file not found" in done.stderr
