"""TLS settings: the gRPC server's (``server.tls``) and outbound calls' (``client.tls``).

Only paths and names live here; :mod:`tether.tls` reads the files once, when the App starts,
checks them and makes gRPC credentials. The names follow what Prometheus' and Go's TLS settings
call them (``cert_file``, ``key_file``, ``ca_file``, ``client_ca_file``, ``server_name``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["ClientTlsConfig", "ClientTlsOverride", "ServerTlsConfig", "merge_client_tls"]

_HOST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


def _check_server_name(value: str | None) -> str | None:
    if value is not None and not _HOST_NAME.match(value):
        raise ValueError(
            "must be a host name or IP address as the server's certificate names it "
            "(no scheme, no port)"
        )
    return value


class ServerTlsConfig(BaseModel):
    """TLS of the gRPC server: off without ``cert_file``; mutual with ``client_auth: require``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cert_file: Path | None = Field(
        default=None,
        description=(
            "The server's certificate chain (PEM), leaf first; with key_file, the port serves "
            "TLS only (health and reflection included)."
        ),
    )
    key_file: Path | None = Field(
        default=None, description="The private key of cert_file (PEM, unencrypted)."
    )
    client_ca_file: Path | None = Field(
        default=None,
        description="CA bundle (PEM) that client certificates must chain to (mTLS).",
    )
    client_auth: Literal["none", "require"] = Field(
        default="none",
        description=(
            "none: no client certificate asked for; require: every client must present one "
            "signed by client_ca_file, or the handshake fails (mTLS)."
        ),
    )

    @property
    def enabled(self) -> bool:
        """Whether the server serves TLS."""
        return self.cert_file is not None

    @model_validator(mode="after")
    def _check_combination(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                "cert_file and key_file must be given together (TLS), or neither (plaintext)"
            )
        mutual = self.client_ca_file is not None or self.client_auth == "require"
        if mutual and self.cert_file is None:
            raise ValueError(
                "client_ca_file and client_auth: require need TLS: set cert_file and key_file"
            )
        if self.client_auth == "require" and self.client_ca_file is None:
            raise ValueError(
                "client_auth 'require' needs client_ca_file, the CA bundle that signs the "
                "client certificates"
            )
        if self.client_ca_file is not None and self.client_auth == "none":
            raise ValueError(
                "client_ca_file is set but client_auth is 'none', so client certificates "
                "would not be asked for: set client_auth: require, or remove client_ca_file"
            )
        return self


class ClientTlsConfig(BaseModel):
    """TLS of outbound calls: the CA that signs servers, and a client certificate for mTLS."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        default=False, description="Call dependencies over TLS; false: plaintext."
    )
    ca_file: Path | None = Field(
        default=None,
        description="CA bundle (PEM) that signs the servers' certificates; None: the system's.",
    )
    cert_file: Path | None = Field(
        default=None, description="Client certificate (PEM), for servers that require mTLS."
    )
    key_file: Path | None = Field(
        default=None, description="The private key of cert_file (PEM, unencrypted)."
    )
    server_name: str | None = Field(
        default=None,
        description=(
            "Name checked in the server's certificate instead of the dialled host: discovery "
            "dials instance IPs, so set the name the certificates carry (usually per "
            "dependency, under client.services.<name>.tls)."
        ),
    )

    _server_name = field_validator("server_name")(_check_server_name)

    @model_validator(mode="after")
    def _check_combination(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together, or neither")
        if not self.enabled:
            unused = [
                name
                for name in ("ca_file", "cert_file", "key_file", "server_name")
                if getattr(self, name) is not None
            ]
            if unused:
                verb, them = ("takes", "it") if len(unused) == 1 else ("take", "them")
                raise ValueError(
                    f"{', '.join(unused)} {verb} effect only with enabled: true (calls would "
                    f"be plaintext); set enabled: true, or remove {them}"
                )
        return self


class ClientTlsOverride(BaseModel):
    """``client.services.<name>.tls``: the fields given replace those of ``client.tls``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool | None = Field(
        default=None, description="false: plaintext to this dependency whatever client.tls says."
    )
    ca_file: Path | None = Field(default=None, description="CA bundle for this dependency.")
    cert_file: Path | None = Field(default=None, description="Client certificate for it.")
    key_file: Path | None = Field(default=None, description="The key of that certificate.")
    server_name: str | None = Field(
        default=None, description="Name its certificates carry, e.g. users.prod.internal."
    )

    _server_name = field_validator("server_name")(_check_server_name)


def merge_client_tls(base: ClientTlsConfig, override: ClientTlsOverride | None) -> ClientTlsConfig:
    """The TLS settings of one dependency: ``base`` with the fields ``override`` gives.

    ``enabled: false`` in the override means plaintext, whatever else ``base`` has.

    Raises:
        pydantic.ValidationError: the merged settings break a rule (e.g. cert without key).
    """
    if override is None:
        return base
    changes = override.model_dump(exclude_unset=True)
    if not changes:
        return base
    if changes.get("enabled") is False:
        return ClientTlsConfig()
    return ClientTlsConfig.model_validate({**base.model_dump(), **changes})
