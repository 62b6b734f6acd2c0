"""The etcd registry over TLS with client certificates, against a real etcd serving https."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.config import RegistryConfig
from tether.errors import RegistryUnavailable
from tether.registry import EtcdRegistry, Instance
from tether.testing import EtcdServer
from tether.testing.etcd import _free_ports


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(name: str, usage: str, cwd: Path) -> None:
    """A P-256 key and a certificate for 127.0.0.1 signed by the test CA."""
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd,
    )  # fmt: skip
    (cwd / f"{name}.ext").write_text(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext",
        cwd=cwd,
    )  # fmt: skip


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A throw-away CA, a server certificate and a client certificate, made with openssl."""
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=tether-test-ca",
        cwd=tmp_path,
    )  # fmt: skip
    _issue("server", "serverAuth", tmp_path)
    _issue("client", "clientAuth", tmp_path)
    return tmp_path


@pytest.fixture
def tls_etcd(pki: Path) -> Iterator[tuple[EtcdServer, str]]:
    """etcd with its usual plain client port (for health checks) plus an https one that
    demands a client certificate signed by the test CA."""
    client, peer, secure = _free_ports(3, taken=set())
    server = EtcdServer(
        client_port=client,
        peer_port=peer,
        extra_args=[
            f"--listen-client-urls=http://127.0.0.1:{client},https://127.0.0.1:{secure}",
            f"--cert-file={pki / 'server.crt'}",
            f"--key-file={pki / 'server.key'}",
            f"--trusted-ca-file={pki / 'ca.crt'}",
            "--client-cert-auth",
        ],
    )
    with server:
        yield server, f"127.0.0.1:{secure}"


async def test_registers_over_tls_with_a_client_certificate(
    pki: Path, tls_etcd: tuple[EtcdServer, str]
) -> None:
    """ca_file, cert_file and key_file are used: the instance registers and is listed."""
    _, endpoint = tls_etcd
    tls = {
        "ca_file": pki / "ca.crt",
        "cert_file": pki / "client.crt",
        "key_file": pki / "client.key",
    }
    registry = EtcdRegistry(RegistryConfig(endpoints=(endpoint,), tls=tls))  # type: ignore[arg-type]
    instance = Instance(id="users-1", service="users", address="127.0.0.1:6001", started_at=1.8e9)
    try:
        await registry.register(instance)
        assert await registry.get("users") == [instance]
    finally:
        await registry.close()


async def test_without_the_client_certificate_etcd_refuses(
    pki: Path, tls_etcd: tuple[EtcdServer, str]
) -> None:
    """The same endpoint without a client certificate does not answer: the settings matter."""
    _, endpoint = tls_etcd
    registry = EtcdRegistry(
        RegistryConfig(endpoints=(endpoint,), tls={"ca_file": pki / "ca.crt"})  # type: ignore[arg-type]
    )
    try:
        with pytest.raises(RegistryUnavailable, match="etcd unreachable"):
            await registry.get("users")
    finally:
        await registry.close()
