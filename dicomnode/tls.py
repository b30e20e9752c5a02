"""DICOM TLS (PS3.15 Annex B.9, BCP 195): settings checked at load and SSL contexts.

The node's SCP is configured by ``[node.tls]`` and each destination by
``[destinations.NAME.tls]``. Relative file paths are taken relative to the config file
(the ``base_dir`` in pydantic's validation context), like ``spool_dir``. Every file is
read into an :class:`ssl.SSLContext` while the configuration is validated, so a missing,
unreadable or malformed certificate or key is a configuration error naming its field,
never a traceback when the node starts or first sends.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, model_validator

MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2  # BCP 195: TLS 1.2 or later


def _resolve_readable(value: Path, info: ValidationInfo) -> Path:
    """Resolve a relative path against the config file's folder; require a readable file."""
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    path = value if value.is_absolute() or base is None else Path(base) / value
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
    return path


def _check_certificates(value: Path, info: ValidationInfo) -> Path:
    """A readable PEM file holding at least one certificate that parses."""
    path = _resolve_readable(value, info)
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"no PEM certificate can be read from {path}: {_ssl_reason(exc)}") from exc
    return path


def _ssl_reason(exc: Exception) -> str:
    """The short reason of an SSL error (OpenSSL's ``reason`` when it has one)."""
    reason = getattr(exc, "reason", None)
    return str(reason).lower().replace("_", " ") if reason else str(exc)


ReadableFile = Annotated[Path, AfterValidator(_resolve_readable)]
CertificateFile = Annotated[Path, AfterValidator(_check_certificates)]


class _TlsModel(BaseModel):
    """Base of the TLS settings: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class ServerTls(_TlsModel):
    """TLS for the node's SCP: its certificate and key, and how callers are verified.

    With ``ca_certificates`` given, a client certificate is verified against them when
    sent; with ``require_client_certificate`` a caller without a valid one is refused
    during the handshake.
    """

    certificate: CertificateFile
    private_key: ReadableFile
    ca_certificates: CertificateFile | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _check_loadable(self) -> ServerTls:
        """The key matches the certificate and client verification has its CAs."""
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates")
        server_context(self)
        return self


class ClientTls(_TlsModel):
    """TLS towards a destination: which CAs to trust, an optional client certificate.

    Without ``ca_certificates`` the system's trusted CAs are used. The destination's
    certificate must name ``server_hostname`` (default: the destination's ``host``)
    unless ``check_hostname`` is false; its chain is always verified.
    """

    ca_certificates: CertificateFile | None = None
    certificate: CertificateFile | None = None
    private_key: ReadableFile | None = None
    check_hostname: bool = True
    server_hostname: str | None = None

    @model_validator(mode="after")
    def _check_loadable(self) -> ClientTls:
        """A client certificate comes with its key, and both load together."""
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key must be given together")
        client_context(self)
        return self


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path) -> None:
    """Load a certificate and its key, naming the key when they do not load together."""
    try:
        context.load_cert_chain(certfile=str(certificate), keyfile=str(private_key))
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(
            f"private_key {private_key} does not load with certificate {certificate}: "
            f"{_ssl_reason(exc)}"
        ) from exc


def server_context(settings: ServerTls) -> ssl.SSLContext:
    """The SSL context the SCP wraps accepted connections in."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_TLS_VERSION
    _load_chain(context, settings.certificate, settings.private_key)
    if settings.ca_certificates is not None:
        context.load_verify_locations(cafile=str(settings.ca_certificates))
        context.verify_mode = (
            ssl.CERT_REQUIRED if settings.require_client_certificate else ssl.CERT_OPTIONAL
        )
    return context


def client_context(settings: ClientTls) -> ssl.SSLContext:
    """The SSL context the SCU connects to a destination with."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=None if settings.ca_certificates is None else str(settings.ca_certificates),
    )
    context.minimum_version = MINIMUM_TLS_VERSION
    context.check_hostname = settings.check_hostname
    if settings.certificate is not None and settings.private_key is not None:
        _load_chain(context, settings.certificate, settings.private_key)
    return context
