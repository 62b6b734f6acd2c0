"""Secrets never leave: a running service with a registry password, an exporter token, a TLS key
and callers sending tokens writes none of them to its logs, its spans or its metrics, and
printed configuration masks them."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from dataclasses import asdict
from pathlib import Path

import grpc
import httpx
import pytest
from echo.v1 import echo_pb2, echo_pb2_grpc
from etcd3 import etcdrpc
from support.processes import json_lines, spawn_echo
from support.tls import Pki, make_pki

from tether import cli
from tether.testing import EtcdServer, OtlpSink, eventually

pytestmark = pytest.mark.slow

WAIT = 20.0
REGISTRY_PASSWORD = "reg-pw-5d1c9e7a"  # wrong on purpose: the refusal path logs too
ETCD_ROOT_PASSWORD = "etcd-root-pw-c2b4"
EXPORT_TOKEN = "otlp-token-8a2f7b31"
CALLER_TOKEN = "caller-token-41e0aa6d"
CALLER_KEY = "caller-api-key-93bd05"
# In the request of a call that fails: a traceback that showed its frames' variables would show
# the request, as a login's password would be.
REQUEST_SECRET = "request-pw-77c1e2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def key_material(pki: Pki) -> list[str]:
    """The base64 lines of the server's private key: none may appear anywhere."""
    lines = pki.server.key_file.read_text().splitlines()
    return [line for line in lines if line and not line.startswith("-----")]


def assert_no_secret(text: str, where: str, secrets: list[str]) -> None:
    leaked = [secret for secret in secrets if secret in text]
    assert not leaked, f"{where} holds {leaked}"


async def enable_auth(etcd: EtcdServer) -> None:
    async with grpc.aio.insecure_channel(etcd.endpoint) as channel:
        auth = etcdrpc.AuthStub(channel)
        await auth.UserAdd(etcdrpc.AuthUserAddRequest(name="root", password=ETCD_ROOT_PASSWORD))
        await auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user="root", role="root"))
        await auth.AuthEnable(etcdrpc.AuthEnableRequest())


async def test_a_running_service_leaks_no_secret(
    tmp_path: Path, etcd: EtcdServer, otlp_sink: OtlpSink
) -> None:
    """Start-up, a refused registry login, served calls carrying tokens, a handler failure with
    a traceback, span export and a metrics scrape: no password, token or key byte anywhere."""
    pki = make_pki(tmp_path / "pki")
    await enable_auth(etcd)
    metrics_port = free_port()
    config = tmp_path / "echo.yaml"
    config.write_text(
        json.dumps(
            {
                "service": {"name": "echo", "instance_id": "echo-secrets"},
                "server": {
                    "host": "127.0.0.1",
                    "port": 0,
                    "drain_seconds": 0,
                    "tls": pki.server_tls(),
                },
                "registry": {
                    "endpoints": [etcd.endpoint],
                    "username": "root",
                    "password": REGISTRY_PASSWORD,
                },
                "tracing": {
                    "enabled": True,
                    "endpoint": otlp_sink.endpoint,
                    "headers": {"authorization": f"Bearer {EXPORT_TOKEN}"},
                },
                "metrics": {"host": "127.0.0.1", "port": metrics_port},
                "logging": {"format": "json", "level": "debug", "access_log": True},
            }
        )
    )
    log_path = tmp_path / "echo.log"
    proc = await spawn_echo(config, log_path)
    try:

        def logged(event: str) -> dict[str, object] | None:
            return next((x for x in json_lines(log_path) if x.get("event") == event), None)

        serving = await eventually(
            lambda: logged("serving"), within=WAIT, message="the service logged 'serving'"
        )
        refused = await eventually(
            lambda: logged("registration refused by etcd; retrying"),
            within=WAIT,
            message="the wrong registry password was reported",
        )
        assert "authentication failed" in str(refused["reason"])
        metadata = (("authorization", f"Bearer {CALLER_TOKEN}"), ("x-api-key", CALLER_KEY))
        credentials = grpc.ssl_channel_credentials(pki.ca_file.read_bytes())
        async with grpc.aio.secure_channel(str(serving["address"]), credentials) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            await stub.Say(echo_pb2.SayRequest(text="hi"), metadata=metadata, timeout=WAIT)
            with pytest.raises(grpc.aio.AioRpcError):  # logged with its traceback
                await stub.Say(
                    echo_pb2.SayRequest(text=REQUEST_SECRET, fail="boom"),
                    metadata=metadata,
                    timeout=WAIT,
                )
        async with httpx.AsyncClient(timeout=WAIT) as http:
            exposition = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        assert "tether_server_calls_total" in exposition
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    await otlp_sink.wait_for(
        lambda spans: sum(s.name == "echo.v1.Echo/Say" for s in spans) == 2,
        message="the spans of both calls were exported",
    )
    log = log_path.read_text()
    assert '"exception"' in log, "the failing call's traceback was logged"
    secrets = [
        REGISTRY_PASSWORD,
        EXPORT_TOKEN,
        CALLER_TOKEN,
        CALLER_KEY,
        REQUEST_SECRET,
        *key_material(pki),
    ]
    assert_no_secret(log, "the service's output", secrets)
    assert_no_secret(exposition, "the metrics exposition", secrets)
    assert_no_secret(
        "\n".join(json.dumps(asdict(s), default=list) for s in otlp_sink.spans()),
        "the exported spans",
        secrets,
    )


def test_printed_config_masks_every_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tether config` shows the password and headers masked and TLS keys by path only."""
    pki = make_pki(tmp_path / "pki")
    config = tmp_path / "tether.yaml"
    config.write_text(
        json.dumps(
            {
                "service": {"name": "echo"},
                "server": {"tls": pki.server_tls(mutual=True)},
                "registry": {"username": "svc", "password": REGISTRY_PASSWORD},
                "client": {"tls": pki.client_tls()},
                "tracing": {"headers": {"authorization": f"Bearer {EXPORT_TOKEN}"}},
            }
        )
    )
    assert cli.main(["config", "--file", str(config)]) == 0
    out, err = capsys.readouterr()
    assert_no_secret(
        out + err, "tether config", [REGISTRY_PASSWORD, EXPORT_TOKEN, *key_material(pki)]
    )
    assert f"key_file: {pki.server.key_file}" in out
    assert "password: '**********'" in out and "authorization: '**********'" in out


@pytest.mark.parametrize(
    ("section", "shown"),
    [
        (
            {"registry": {"password": REGISTRY_PASSWORD, "ttl_seconds": 1}},
            "registry.ttl_seconds=1: must be >= 2",
        ),
        (
            {"tracing": {"headers": {"authorization": [EXPORT_TOKEN]}}},
            "tracing.headers.authorization='**********': must be a string",
        ),
        (
            {"tracing": {"endpoint": f"https://{EXPORT_TOKEN}@collector:4317"}},
            "tracing.endpoint='https://**********@collector:4317': must not hold credentials",
        ),
        (
            {"registry": {"endpoints": [f"root:{REGISTRY_PASSWORD}@10.0.0.1:2379"]}},
            "registry.endpoints[0]='**********@10.0.0.1:2379': must be host:port without "
            "credentials",
        ),
    ],
)
def test_refused_config_never_echoes_a_secret(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    section: dict[str, object],
    shown: str,
) -> None:
    """A refused configuration names the field and the rule, with every secret masked, even a
    token or password written where it does not belong (in an address)."""
    config = tmp_path / "tether.yaml"
    config.write_text(json.dumps({"service": {"name": "echo"}, **section}))
    assert cli.main(["config", "--file", str(config)]) == 2
    out, err = capsys.readouterr()
    assert shown in err
    assert_no_secret(out + err, "the refusal", [REGISTRY_PASSWORD, EXPORT_TOKEN])
