"""TLS and mutual TLS from configuration: real servers on loopback, a throwaway CA, real
handshakes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.echo_service import build_app
from support.tls import Pki, make_pki

import tether
from tether.config import ClientConfig
from tether.errors import ConfigError
from tether.registry import MemoryRegistry
from tether.testing import CertFiles, loopback_config, running

WAIT = 5.0  # bound on every call; a handshake on loopback takes milliseconds


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def tls_echo(pki: Pki) -> AsyncIterator[tether.App]:
    """Echo serving TLS (no client certificate asked for)."""
    async with running(build_app(loopback_config("echo", server={"tls": pki.server_tls()}))) as app:
        yield app


@pytest.fixture
async def mtls_echo(pki: Pki) -> AsyncIterator[tether.App]:
    """Echo serving mutual TLS: a client certificate signed by the test CA is required."""
    config = loopback_config(
        "echo", server={"tls": pki.server_tls(mutual=True), "reflection": True}
    )
    async with running(build_app(config)) as app:
        yield app


def credentials(
    ca_file: Path, cert: CertFiles | None = None, *, root: Path | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials trusting ``ca_file``, with a client certificate if given."""
    return grpc.ssl_channel_credentials(
        root_certificates=(root or ca_file).read_bytes(),
        private_key=cert.key_file.read_bytes() if cert else None,
        certificate_chain=cert.cert_file.read_bytes() if cert else None,
    )


async def say(channel: grpc.aio.Channel, text: str = "hi") -> str:
    reply = await echo_pb2_grpc.EchoStub(channel).Say(echo_pb2.SayRequest(text=text), timeout=WAIT)
    return str(reply.text)


async def refused(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
    """The error of a Say call that must fail before it reaches the servicer."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await say(channel)
    return failed.value


# --------------------------------------------------------------------------- server TLS


async def test_tls_server_refuses_a_plaintext_client(tls_echo: tether.App, pki: Pki) -> None:
    """A plaintext client cannot talk to a TLS port; a client trusting the CA can."""
    async with grpc.aio.insecure_channel(tls_echo.target) as plain:
        assert (await refused(plain)).code() is grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.secure_channel(tls_echo.target, credentials(pki.ca_file)) as secure:
        assert await say(secure) == "hi"


async def test_client_refuses_a_server_signed_by_another_ca(tls_echo: tether.App, pki: Pki) -> None:
    """The client checks the server too: a server whose CA it does not trust is refused."""
    wrong_root = credentials(pki.ca_file, root=pki.other_ca_file)
    async with grpc.aio.secure_channel(tls_echo.target, wrong_root) as channel:
        error = await refused(channel)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "handshake" in (error.details() or "").lower()


async def test_health_and_reflection_are_served_over_tls(mtls_echo: tether.App, pki: Pki) -> None:
    """Health and reflection share the port and its TLS (what a TLS-speaking probe calls)."""
    creds = credentials(pki.ca_file, pki.client)
    async with grpc.aio.secure_channel(mtls_echo.target, creds) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=WAIT
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=WAIT
        )
        services = {s.name async for r in stream for s in r.list_services_response.service}
    assert {"echo.v1.Echo", "grpc.health.v1.Health"} <= services
    async with grpc.aio.insecure_channel(mtls_echo.target) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await health_pb2_grpc.HealthStub(plain).Check(
                health_pb2.HealthCheckRequest(), timeout=WAIT
            )
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE


# --------------------------------------------------------------------------- mutual TLS


async def test_mtls_server_refuses_a_client_without_a_certificate(
    mtls_echo: tether.App, pki: Pki
) -> None:
    """client_auth: require: a client that trusts the server but shows no certificate fails."""
    async with grpc.aio.secure_channel(mtls_echo.target, credentials(pki.ca_file)) as channel:
        assert (await refused(channel)).code() is grpc.StatusCode.UNAVAILABLE


async def test_mtls_server_refuses_a_certificate_from_another_ca(
    mtls_echo: tether.App, pki: Pki
) -> None:
    """A client certificate signed by a CA other than client_ca_file is refused."""
    async with grpc.aio.secure_channel(
        mtls_echo.target, credentials(pki.ca_file, pki.rogue)
    ) as channel:
        assert (await refused(channel)).code() is grpc.StatusCode.UNAVAILABLE


async def test_mtls_server_accepts_the_right_certificate(mtls_echo: tether.App, pki: Pki) -> None:
    """A client certificate signed by client_ca_file is accepted, and the call is served."""
    async with grpc.aio.secure_channel(
        mtls_echo.target, credentials(pki.ca_file, pki.client)
    ) as channel:
        assert await say(channel, "over mtls") == "over mtls"


async def test_without_server_tls_the_port_stays_plaintext() -> None:
    """Without server.tls the port serves plaintext, as before."""
    async with (
        running(build_app(loopback_config("echo"))) as app,
        grpc.aio.insecure_channel(app.target) as channel,
    ):
        assert await say(channel) == "hi"


# --------------------------------------------------------------------------- governed client


async def test_an_app_calls_an_mtls_app_through_discovery(pki: Pki) -> None:
    """client.tls: the caller's governed client finds echo in the registry and calls it over
    mutual TLS; the same caller without client.tls is refused."""
    registry = MemoryRegistry()
    echo = build_app(
        loopback_config("echo", server={"tls": pki.server_tls(mutual=True)}), registry=registry
    )
    caller = tether.App(
        loopback_config("caller", client={"tls": pki.client_tls(), "timeout_seconds": WAIT}),
        registry=registry,
    )
    plain_caller = tether.App(
        loopback_config("plain", client={"timeout_seconds": 1, "retry": {"max_attempts": 1}}),
        registry=registry,
    )
    async with running(echo), running(caller), running(plain_caller):
        stub = caller.client("echo", echo_pb2_grpc.EchoStub)
        reply = await stub.Say(echo_pb2.SayRequest(text="found and trusted"))
        assert reply.text == "found and trusted"
        plain = plain_caller.client("echo", echo_pb2_grpc.EchoStub)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await plain.Say(echo_pb2.SayRequest(text="plaintext"))
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_server_name_checks_the_certificate_of_a_discovered_ip(
    tmp_path: Path, pki: Pki
) -> None:
    """Discovery dials an IP; a certificate naming only echo.internal is refused for it unless
    client.services.echo.tls.server_name says that is the name to check."""
    named = pki.ca.issue("echo-internal", hosts=["echo.internal"], client=False).write(tmp_path)
    registry = MemoryRegistry()
    echo = build_app(
        loopback_config(
            "echo", server={"tls": {"cert_file": named.cert_file, "key_file": named.key_file}}
        ),
        registry=registry,
    )
    strict = {"tls": pki.client_tls(certificate=False), "timeout_seconds": 1}
    strict["retry"] = {"max_attempts": 1}
    by_ip = tether.App(loopback_config("by-ip", client=strict), registry=registry)
    by_name = tether.App(
        loopback_config(
            "by-name",
            client={**strict, "services": {"echo": {"tls": {"server_name": "echo.internal"}}}},
        ),
        registry=registry,
    )
    async with running(echo), running(by_ip), running(by_name):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await by_ip.client("echo", echo_pb2_grpc.EchoStub).Say(echo_pb2.SayRequest(text="x"))
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        stub = by_name.client("echo", echo_pb2_grpc.EchoStub)
        assert (await stub.Say(echo_pb2.SayRequest(text="by name"))).text == "by name"


async def test_dial_takes_tls_from_the_client_config(mtls_echo: tether.App, pki: Pki) -> None:
    """tether.dial(target, config=...) uses client.tls for a fixed address too."""
    config = ClientConfig.model_validate({"tls": pki.client_tls()})
    async with tether.dial(mtls_echo.target, config=config) as channel:
        assert await say(channel, "dialled") == "dialled"


# --------------------------------------------------------------------------- refused at start-up


def _problem(error: ConfigError) -> tuple[str, str, str]:
    [problem] = error.problems
    return problem.field, problem.value, problem.rule


async def test_a_missing_certificate_is_refused_at_start(tmp_path: Path, pki: Pki) -> None:
    """A cert_file that does not exist stops start(): field, path, and why; nothing is bound."""
    missing = tmp_path / "nope.crt"
    tls = {**pki.server_tls(), "cert_file": str(missing)}
    app = build_app(loopback_config("echo", server={"tls": tls}))
    with pytest.raises(ConfigError) as refused_:
        await app.start()
    assert _problem(refused_.value) == (
        "server.tls.cert_file",
        repr(str(missing)),
        "cannot be read: No such file or directory",
    )
    with pytest.raises(RuntimeError, match="has not started"):
        _ = app.port


def pki_file(pki: Pki, tmp_path: Path, name: str) -> str:
    """A file of the test PKI by name, else ``name`` in ``tmp_path``."""
    known = {
        "client.key": pki.client.key_file,
        "server.key": pki.server.key_file,
        "server.crt": pki.server.cert_file,
    }
    return str(known.get(name, tmp_path / name))


@pytest.mark.parametrize(
    ("section", "change", "field", "rule"),
    [
        (
            "server",
            {"key_file": "client.key"},
            "server.tls.key_file",
            "is not the private key of server.tls.cert_file",
        ),
        ("server", {"cert_file": "server.key"}, "server.tls.cert_file", "is not a PEM certificate"),
        ("server", {"key_file": "server.crt"}, "server.tls.key_file", "is not a PEM private key"),
        (
            "server",
            {"client_ca_file": "empty.pem", "client_auth": "require"},
            "server.tls.client_ca_file",
            "is empty",
        ),
        ("server", {"key_file": "encrypted.key"}, "server.tls.key_file", "is encrypted"),
        ("client", {"ca_file": "server.key"}, "client.tls.ca_file", "is not a PEM certificate"),
        ("client", {"ca_file": "pki"}, "client.tls.ca_file", "cannot be read: Is a directory"),
    ],
)
async def test_unusable_tls_files_are_refused_at_start(
    tmp_path: Path,
    pki: Pki,
    section: str,
    change: dict[str, str],
    field: str,
    rule: str,
) -> None:
    """Each unusable file is named with its path and what is wrong; no key is ever quoted."""
    (tmp_path / "empty.pem").write_bytes(b"")
    (tmp_path / "encrypted.key").write_bytes(
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n"
    )
    changed = {
        key: pki_file(pki, tmp_path, value) if key.endswith("_file") else value
        for key, value in change.items()
    }
    sections: dict[str, Any] = {"server": {"tls": pki.server_tls()}}
    if section == "client":
        sections["client"] = {"tls": {**pki.client_tls(), **changed}}
    else:
        sections["server"] = {"tls": {**pki.server_tls(), **changed}}
    app = build_app(loopback_config("echo", **sections))
    with pytest.raises(ConfigError) as refused_:
        await app.start()
    got_field, value, got_rule = _problem(refused_.value)
    assert (got_field, got_rule[: len(rule)]) == (field, rule)
    assert value.strip("'") in changed.values()
    key_body = pki.server.key_file.read_bytes().splitlines()[1].decode()
    assert key_body not in str(refused_.value)


async def test_client_tls_is_checked_at_start_not_at_the_first_call(tmp_path: Path) -> None:
    """A bad client.services.<name>.tls file stops start(), before any call is made."""
    missing = tmp_path / "users-ca.pem"
    config = loopback_config(
        "caller",
        client={"services": {"users": {"tls": {"enabled": True, "ca_file": str(missing)}}}},
    )
    with pytest.raises(ConfigError) as refused_:
        await tether.App(config).start()
    field, _, rule = _problem(refused_.value)
    assert (field, rule) == (
        "client.services.users.tls.ca_file",
        "cannot be read: No such file or directory",
    )
