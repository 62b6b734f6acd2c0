"""Tests for tether.config_tls: server.tls, client.tls and per-dependency overrides, refused at
load with the section and what is allowed (the files themselves are checked at start-up)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tether.config import TetherConfig, load_config
from tether.config_tls import ClientTlsConfig
from tether.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("TETHER_"):
            monkeypatch.delenv(name)


def load(tmp_path: Path, **sections: Any) -> TetherConfig:
    path = tmp_path / "tether.yaml"
    path.write_text(json.dumps({"service": {"name": "orders"}, **sections}))
    return load_config(path)


def refusal(tmp_path: Path, **sections: Any) -> str:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, **sections)
    [problem] = refused.value.problems
    return f"{problem.field}: {problem.rule}"


def test_tls_is_off_by_default(tmp_path: Path) -> None:
    """No tls sections: the server and every client call are plaintext."""
    config = load(tmp_path)
    assert not config.server.tls.enabled
    assert config.server.tls.client_auth == "none"
    assert not config.client.tls.enabled
    assert config.client.tls_for("users") == ClientTlsConfig()


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({"cert_file": "s.crt"}, "server.tls: cert_file and key_file must be given together"),
        ({"key_file": "s.key"}, "server.tls: cert_file and key_file must be given together"),
        (
            {"cert_file": "s.crt", "key_file": "s.key", "client_auth": "require"},
            "server.tls: client_auth 'require' needs client_ca_file",
        ),
        (
            {"cert_file": "s.crt", "key_file": "s.key", "client_ca_file": "ca.crt"},
            "server.tls: client_ca_file is set but client_auth is 'none'",
        ),
        (
            {"client_ca_file": "ca.crt", "client_auth": "require"},
            "server.tls: client_ca_file and client_auth: require need TLS",
        ),
        (
            {"cert_file": "s.crt", "key_file": "s.key", "client_auth": "optional"},
            "server.tls.client_auth: must be one of: 'none', 'require'",
        ),
        ({"certfile": "s.crt"}, "server.tls.certfile: unknown field; allowed: cert_file"),
    ],
)
def test_server_tls_combinations_are_refused(
    tmp_path: Path, tls: dict[str, str], message: str
) -> None:
    """Half a key pair, mTLS without a CA, a CA that would be ignored, mTLS without TLS."""
    assert refusal(tmp_path, server={"tls": tls}).startswith(message)


def test_server_mtls_is_accepted(tmp_path: Path) -> None:
    """cert, key, client CA and client_auth: require load as mutual TLS."""
    tls = {"cert_file": "s.crt", "key_file": "s.key", "client_ca_file": "ca.crt"}
    config = load(tmp_path, server={"tls": {**tls, "client_auth": "require"}})
    assert config.server.tls.enabled
    assert config.server.tls.client_ca_file == Path("ca.crt")


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        (
            {"ca_file": "ca.crt"},
            "client: ca_file takes effect only with enabled: true",
        ),
        (
            {"enabled": True, "cert_file": "c.crt"},
            "client: cert_file and key_file must be given together",
        ),
        (
            {"enabled": True, "server_name": "https://users:443"},
            "client.tls.server_name: must be a host name or IP address",
        ),
    ],
)
def test_client_tls_combinations_are_refused(
    tmp_path: Path, tls: dict[str, object], message: str
) -> None:
    """Files without enabled: true (plaintext in disguise), half a key pair, a URL as a name."""
    got = refusal(tmp_path, client={"tls": tls})
    assert message.split(": ", 1)[1] in got, got


def test_a_dependency_override_replaces_only_the_fields_it_gives(tmp_path: Path) -> None:
    """services.<name>.tls: a server_name alone keeps client.tls's CA and certificate;
    enabled: false is plaintext whatever client.tls says; others get client.tls."""
    base = {"enabled": True, "ca_file": "ca.crt", "cert_file": "c.crt", "key_file": "c.key"}
    config = load(
        tmp_path,
        client={
            "tls": base,
            "services": {
                "users": {"tls": {"server_name": "users.internal"}},
                "legacy": {"tls": {"enabled": False}},
                "partner": {"tls": {"ca_file": "partner-ca.crt"}},
            },
        },
    )
    users = config.client.tls_for("users")
    assert (users.server_name, users.ca_file, users.cert_file) == (
        "users.internal",
        Path("ca.crt"),
        Path("c.crt"),
    )
    assert config.client.tls_for("legacy") == ClientTlsConfig()
    assert config.client.tls_for("partner").ca_file == Path("partner-ca.crt")
    assert config.client.tls_for("orders") == config.client.tls


def test_a_dependency_override_is_checked_merged(tmp_path: Path) -> None:
    """An override that enables nothing, over a client.tls that is off, is refused at load."""
    got = refusal(tmp_path, client={"services": {"users": {"tls": {"ca_file": "ca.crt"}}}})
    assert got.startswith("client: services.users:"), got
    assert "takes effect only with enabled: true" in got


def test_tls_settings_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TETHER_SERVER__TLS__CERT_FILE and friends set the paths, as for every field."""
    monkeypatch.setenv("TETHER_SERVER__TLS__CERT_FILE", "/etc/tls/tls.crt")
    monkeypatch.setenv("TETHER_SERVER__TLS__KEY_FILE", "/etc/tls/tls.key")
    monkeypatch.setenv("TETHER_CLIENT__TLS__ENABLED", "true")
    config = load(tmp_path)
    assert config.server.tls.cert_file == Path("/etc/tls/tls.crt")
    assert config.client.tls.enabled
