"""Throwaway certificate authorities for TLS and mTLS tests, made in memory with ``cryptography``.

Example::

    ca = CertificateAuthority()
    server = ca.issue("echo").write(tmp_path)        # server.cert_file, server.key_file
    config = loopback_config("echo", server={"tls": {
        "cert_file": server.cert_file, "key_file": server.key_file,
        "client_ca_file": ca.write(tmp_path), "client_auth": "require"}})

``cryptography`` comes with ``tether[test]``; it is imported only when a CA is made, so the
rest of the test kit works without it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CertFiles", "CertificateAuthority", "IssuedCertificate"]

#: Names every certificate is valid for unless told otherwise: loopback, as tests dial it.
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
_VALID_FOR = datetime.timedelta(days=1)
# Issued a little in the past, so a clock a few seconds behind does not refuse it.
_BACKDATE = datetime.timedelta(minutes=5)


def _require_cryptography() -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "tether.testing.tls needs the cryptography package: pip install cryptography "
            "(it comes with tether[test])"
        ) from exc


@dataclass(frozen=True)
class CertFiles:
    """Where :meth:`IssuedCertificate.write` put a certificate and its key."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate (PEM) and its unencrypted private key (PEM), issued by a test CA.

    Attributes:
        name: the subject's common name, also the files' stem.
        cert_pem: the certificate.
        key_pem: its private key (PKCS#8).
    """

    name: str
    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path) -> CertFiles:
        """Write ``<name>.crt`` and ``<name>.key`` (mode 0600) into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_file = directory / f"{self.name}.crt"
        key_file = directory / f"{self.name}.key"
        cert_file.write_bytes(self.cert_pem)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(self.key_pem)
        key_file.chmod(0o600)  # also when the file was there before
        return CertFiles(cert_file, key_file)


class CertificateAuthority:
    """A self-signed CA made in memory (P-256 keys), valid for a day; it issues leaf certificates.

    Two instances are two unrelated CAs: a certificate from one is refused by a peer that
    trusts only the other.

    Args:
        name: the CA's common name (and the stem of the file :meth:`write` makes).

    Raises:
        RuntimeError: the ``cryptography`` package is not installed.
    """

    def __init__(self, name: str = "tether-test-ca") -> None:
        _require_cryptography()
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(self._subject)
            .issuer_name(self._subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        #: The CA certificate, PEM: what a peer trusts (a ``ca_file`` or ``client_ca_file``).
        self.cert_pem: bytes = cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path) -> Path:
        """Write the CA certificate as ``<name>.crt`` into ``directory``; return its path."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.crt"
        path.write_bytes(self.cert_pem)
        return path

    def issue(
        self,
        name: str,
        *,
        hosts: Sequence[str] = LOOPBACK_HOSTS,
        server: bool = True,
        client: bool = True,
    ) -> IssuedCertificate:
        """Issue a leaf certificate.

        Args:
            name: the common name (a client certificate's identity) and the files' stem.
            hosts: DNS names and IP addresses the certificate is valid for (its SANs).
            server: usable by a TLS server (extended key usage serverAuth).
            client: usable as a TLS client certificate (clientAuth).

        Returns:
            The certificate and its private key, in PEM.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        usages = [
            *([ExtendedKeyUsageOID.SERVER_AUTH] if server else []),
            *([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []),
        ]
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return IssuedCertificate(
            name=name,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
