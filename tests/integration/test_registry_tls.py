"""The etcd registry over TLS with client certificates, against a real etcd serving https."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.tls import Pki, make_pki

from tether.config import RegistryConfig
from tether.errors import ConfigError, RegistryUnavailable
from tether.registry import EtcdRegistry, Instance
from tether.testing import EtcdServer
from tether.testing.etcd import _free_ports


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A throwaway CA with a server certificate and a client certificate (tether.testing.tls)."""
    return make_pki(tmp_path)


@pytest.fixture
def tls_etcd(pki: Pki) -> Iterator[tuple[EtcdServer, str]]:
    """etcd with its usual plain client port (for health checks) plus an https one that
    demands a client certificate signed by the test CA."""
    client, peer, secure = _free_ports(3, taken=set())
    server = EtcdServer(
        client_port=client,
        peer_port=peer,
        extra_args=[
            f"--listen-client-urls=http://127.0.0.1:{client},https://127.0.0.1:{secure}",
            f"--cert-file={pki.server.cert_file}",
            f"--key-file={pki.server.key_file}",
            f"--trusted-ca-file={pki.ca_file}",
            "--client-cert-auth",
        ],
    )
    with server:
        yield server, f"127.0.0.1:{secure}"


async def test_registers_over_tls_with_a_client_certificate(
    pki: Pki, tls_etcd: tuple[EtcdServer, str]
) -> None:
    """ca_file, cert_file and key_file are used: the instance registers and is listed."""
    _, endpoint = tls_etcd
    tls = {
        "ca_file": pki.ca_file,
        "cert_file": pki.client.cert_file,
        "key_file": pki.client.key_file,
    }
    registry = EtcdRegistry(RegistryConfig(endpoints=(endpoint,), tls=tls))  # type: ignore[arg-type]
    instance = Instance(id="users-1", service="users", address="127.0.0.1:6001", started_at=1.8e9)
    try:
        await registry.register(instance)
        assert await registry.get("users") == [instance]
    finally:
        await registry.close()


async def test_without_the_client_certificate_etcd_refuses(
    pki: Pki, tls_etcd: tuple[EtcdServer, str]
) -> None:
    """The same endpoint without a client certificate does not answer: the settings matter."""
    _, endpoint = tls_etcd
    registry = EtcdRegistry(
        RegistryConfig(endpoints=(endpoint,), tls={"ca_file": pki.ca_file})  # type: ignore[arg-type]
    )
    try:
        with pytest.raises(RegistryUnavailable, match="etcd unreachable"):
            await registry.get("users")
    finally:
        await registry.close()


async def test_a_client_certificate_from_another_ca_is_refused(
    pki: Pki, tls_etcd: tuple[EtcdServer, str]
) -> None:
    """etcd checks the client certificate's CA: one from an unrelated CA does not get in."""
    _, endpoint = tls_etcd
    tls = {
        "ca_file": pki.ca_file,
        "cert_file": pki.rogue.cert_file,
        "key_file": pki.rogue.key_file,
    }
    registry = EtcdRegistry(RegistryConfig(endpoints=(endpoint,), tls=tls))  # type: ignore[arg-type]
    try:
        with pytest.raises(RegistryUnavailable, match="etcd unreachable"):
            await registry.get("users")
    finally:
        await registry.close()


def test_an_unreadable_tls_file_is_refused_with_its_field(tmp_path: Path, pki: Pki) -> None:
    """registry.tls files are checked when the registry is made: the field, the path, why."""
    missing = tmp_path / "nope.crt"
    config = RegistryConfig(tls={"ca_file": missing})  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as refused:
        EtcdRegistry(config)
    [problem] = refused.value.problems
    assert (problem.field, problem.value, problem.rule) == (
        "registry.tls.ca_file",
        repr(str(missing)),
        "cannot be read: No such file or directory",
    )
