"""The certificates the TLS tests share: one CA that everyone trusts and one that nobody does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.testing.tls import CertFiles, CertificateAuthority


@dataclass(frozen=True)
class Pki:
    """Files of a throwaway PKI, written into one directory.

    Attributes:
        ca_file: the CA every server and client here trusts.
        server: a server certificate from it, for 127.0.0.1, ::1 and localhost.
        client: a client certificate from it.
        other_ca_file: an unrelated CA.
        rogue: a client certificate from the unrelated CA.
    """

    ca: CertificateAuthority
    ca_file: Path
    server: CertFiles
    client: CertFiles
    other_ca_file: Path
    rogue: CertFiles

    def server_tls(self, *, mutual: bool = False) -> dict[str, Any]:
        """A ``server.tls`` section: TLS, or mutual TLS trusting :attr:`ca_file`."""
        section: dict[str, Any] = {
            "cert_file": str(self.server.cert_file),
            "key_file": str(self.server.key_file),
        }
        if mutual:
            section.update(client_ca_file=str(self.ca_file), client_auth="require")
        return section

    def client_tls(self, *, certificate: bool = True) -> dict[str, Any]:
        """A ``client.tls`` section trusting :attr:`ca_file`, with the client certificate."""
        section: dict[str, Any] = {"enabled": True, "ca_file": str(self.ca_file)}
        if certificate:
            section.update(cert_file=str(self.client.cert_file), key_file=str(self.client.key_file))
        return section


def make_pki(directory: Path) -> Pki:
    """Make the CAs and certificates and write them into ``directory``."""
    ca = CertificateAuthority("test-ca")
    other = CertificateAuthority("other-ca")
    return Pki(
        ca=ca,
        ca_file=ca.write(directory),
        server=ca.issue("server", client=False).write(directory),
        client=ca.issue("client", server=False).write(directory),
        other_ca_file=other.write(directory),
        rogue=other.issue("rogue", server=False).write(directory),
    )
