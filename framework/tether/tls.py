"""TLS credentials from configuration: PEM files read once, checked, made into gRPC credentials.

gRPC reads nothing itself: it is handed bytes, and a bad file would surface as a handshake
failure on the first connection, far from its cause. Each file is read here once, when the App
starts (a changed certificate takes a restart), and checked with the standard library's
``ssl`` (a PEM that parses, a key that belongs to its certificate), so a mistake is refused at
start-up with the field, the path and what is wrong. No error says what a file contains.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from tether.config_problems import show
from tether.config_tls import ClientTlsConfig, ServerTlsConfig
from tether.errors import ConfigError, ConfigProblem

__all__ = ["ClientTls", "channel_credentials", "client_tls", "server_credentials"]

_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = b"PRIVATE KEY-----"


@dataclass(frozen=True)
class ClientTls:
    """What a channel needs to call one dependency over TLS.

    Attributes:
        credentials: the CA to trust and, for mTLS, the client certificate and key.
        server_name: the name to check in the server's certificate instead of the host.
    """

    credentials: grpc.ChannelCredentials
    server_name: str | None = None

    @property
    def options(self) -> tuple[tuple[str, str], ...]:
        """gRPC channel options that go with the credentials."""
        if self.server_name is None:
            return ()
        return (("grpc.ssl_target_name_override", self.server_name),)


def server_credentials(
    config: ServerTlsConfig, *, field: str = "server.tls"
) -> grpc.ServerCredentials | None:
    """The server's TLS credentials, or None for plaintext.

    Args:
        config: the ``server.tls`` section.
        field: the section's name in errors.

    Raises:
        ConfigError: a file cannot be read, is not PEM, or the key is not the certificate's.
    """
    if config.cert_file is None or config.key_file is None:
        return None
    cert, key = _read_pair(config.cert_file, config.key_file, field)
    client_ca = (
        None
        if config.client_ca_file is None
        else _read_ca(config.client_ca_file, f"{field}.client_ca_file")
    )
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=config.client_auth == "require",
    )


def client_tls(config: ClientTlsConfig, *, field: str = "client.tls") -> ClientTls | None:
    """The TLS of calls to one dependency, or None for plaintext.

    Args:
        config: ``client.tls``, or the merge for one dependency (``ClientConfig.tls_for``).
        field: the section's name in errors.

    Raises:
        ConfigError: as :func:`channel_credentials`.
    """
    if not config.enabled:
        return None
    credentials = channel_credentials(
        ca_file=config.ca_file, cert_file=config.cert_file, key_file=config.key_file, field=field
    )
    return ClientTls(credentials, config.server_name)


def channel_credentials(
    *,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    field: str,
) -> grpc.ChannelCredentials:
    """Channel credentials from PEM files: ``ca_file`` (None: the system's CAs) and, for mTLS,
    ``cert_file`` with ``key_file``.

    Args:
        ca_file: the CA bundle that signs the server's certificate.
        cert_file: the client certificate; goes with ``key_file``.
        key_file: its private key.
        field: the configuration section they come from, for errors (``registry.tls``).

    Raises:
        ConfigError: a file cannot be read, is not PEM, or the key is not the certificate's.
    """
    ca = None if ca_file is None else _read_ca(ca_file, f"{field}.ca_file")
    cert = key = None
    if cert_file is not None and key_file is not None:
        cert, key = _read_pair(cert_file, key_file, field)
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def _refuse(field: str, path: Path, rule: str) -> ConfigError:
    return ConfigError([ConfigProblem(field, show(str(path)), rule)])


def _read(path: Path, field: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _refuse(
            field, path, f"cannot be read: {exc.strerror or type(exc).__name__}"
        ) from None
    if not data.strip():
        raise _refuse(field, path, "is empty; a PEM file is expected")
    return data


def _read_ca(path: Path, field: str) -> bytes:
    data = _read(path, field)
    if _CERTIFICATE not in data:
        raise _refuse(field, path, "is not a PEM certificate bundle (no BEGIN CERTIFICATE)")
    try:
        ssl.create_default_context(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise _refuse(field, path, f"holds no usable CA certificate ({_reason(exc)})") from None
    return data


def _read_pair(cert_file: Path, key_file: Path, field: str) -> tuple[bytes, bytes]:
    cert_field, key_field = f"{field}.cert_file", f"{field}.key_file"
    cert = _read(cert_file, cert_field)
    key = _read(key_file, key_field)
    if _CERTIFICATE not in cert:
        raise _refuse(cert_field, cert_file, "is not a PEM certificate (no BEGIN CERTIFICATE)")
    if _PRIVATE_KEY not in key:
        raise _refuse(key_field, key_file, "is not a PEM private key (no BEGIN ... PRIVATE KEY)")
    if b"ENCRYPTED" in key:
        raise _refuse(
            key_field,
            key_file,
            "is encrypted, and gRPC takes no passphrase: use an unencrypted key and protect "
            "the file instead (mode 0400, a Kubernetes Secret volume)",
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # The files again, in the same moment: ssl takes paths, and the pair check needs it.
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise _refuse(
                key_field, key_file, f"is not the private key of {field}.cert_file {cert_file}"
            ) from None
        raise _refuse(cert_field, cert_file, f"cannot be loaded: {_reason(exc)}") from None
    except OSError as exc:
        raise _refuse(cert_field, cert_file, f"cannot be read: {_reason(exc)}") from None
    return cert, key


def _no_passphrase() -> bytes:
    # Without a callback, OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    return b""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
