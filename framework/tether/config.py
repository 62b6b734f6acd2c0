"""Typed, immutable service configuration: a YAML file overridden by ``TETHER_*`` variables."""

from __future__ import annotations

import contextlib
import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from tether.config_policies import (
    AdmissionConfig,
    BreakerConfig,
    MethodPattern,
    PolicyResolver,
    RetryConfig,
    ServicePolicy,
    StatusNames,
    first_problem,
    split_names,
    upper_status_names,
)
from tether.config_problems import (
    DNS_LABEL,
    ENV_DELIMITER,
    ENV_PREFIX,
    problem_from_settings,
    problems_from,
    relevant_env,
    show,
)
from tether.config_tls import (
    ClientTlsConfig,
    ServerTlsConfig,
    merge_client_tls,
)
from tether.errors import ConfigError, ConfigProblem

__all__ = [
    "ClientConfig",
    "ClientTlsConfig",
    "LoggingConfig",
    "MetricsConfig",
    "RegistryConfig",
    "RetryConfig",
    "ServerConfig",
    "ServerTlsConfig",
    "ServiceConfig",
    "TetherConfig",
    "TlsConfig",
    "TracingConfig",
    "load_config",
    "render_config",
]

# Names the YAML file; read by load_config itself, never a settings field.
_CONFIG_PATH_VAR = "TETHER_CONFIG"
_DEFAULT_CONFIG_FILE = "tether.yaml"


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split ``host:port`` (IPv6 as ``[::1]:2379``) into its host and port, or raise ValueError."""
    if "://" in endpoint:
        raise ValueError("must be host:port without a scheme, e.g. 127.0.0.1:2379")
    if "@" in endpoint:
        raise ValueError(
            "must be host:port without credentials; set registry.username and registry.password"
        )
    if endpoint.startswith("["):
        host, sep, port = endpoint[1:].partition("]:")
    else:
        host, sep, port = endpoint.rpartition(":")
        if ":" in host:
            raise ValueError("an IPv6 host must be in brackets, e.g. [::1]:2379")
    if not sep:
        raise ValueError("must be host:port; the port is missing")
    if not host or any(c.isspace() or c in "/[]" for c in host):
        raise ValueError("must be host:port with a non-empty host")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError("port must be an integer from 1 to 65535")
    return host, int(port)


def _check_endpoint(endpoint: str) -> str:
    _parse_endpoint(endpoint)
    return endpoint


_Endpoint = Annotated[str, AfterValidator(_check_endpoint)]

#: Where a service runs; it decides the defaults of logging.format and server.reflection.
_Environment = Literal["development", "production"]
#: How log lines are written: one JSON object per line, or for people.
_LogFormat = Literal["json", "console"]


class ServiceConfig(BaseModel):
    """Who this service is: the name it registers under and what it says about itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        pattern=DNS_LABEL,
        description="Service name, a lowercase DNS label; clients discover the service by it.",
    )
    version: str = Field(default="0.0.0", description="Version published to the registry.")
    instance_id: str | None = Field(
        default=None,
        description="Unique id of this instance in the registry; None lets the App generate one.",
    )
    zone: str = Field(default="", description="Zone or region, for zone-aware balancing.")
    weight: int = Field(
        default=100, ge=1, le=10_000, description="Relative share of traffic for this instance."
    )
    metadata: dict[str, str] = Field(
        default_factory=dict, description="Free-form labels published with the instance."
    )
    environment: _Environment = Field(
        default="production",
        description=(
            "development or production: what logging.format and server.reflection follow when "
            "left unset (console logs and reflection on in development; JSON logs and "
            "reflection off in production). `tether dev` runs its command in development."
        ),
    )

    @field_validator("environment", mode="before")
    @classmethod
    def _lower_environment(cls, value: object) -> object:
        # Only a known name is lowered, so a refused one is shown as it was written.
        if isinstance(value, str) and value.lower() in get_args(_Environment):
            return value.lower()
        return value


class ServerConfig(BaseModel):
    """The gRPC server: where it listens and how it stops."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(default="0.0.0.0", description="Address the gRPC server binds to.")
    port: int = Field(
        default=50051, ge=0, le=65535, description="gRPC port; 0 picks a free (ephemeral) port."
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Processes serving the port, for more than one core: App.run() starts this many "
            "workers sharing the port (SO_REUSEPORT; needs a fixed port, not 0). Worker k logs "
            "as <instance_id>-w<k> and serves metrics on metrics.port + k; worker 0 registers "
            "one instance for the port. A number, not 'auto': the CPU count a process sees is "
            "the machine's, not its container's CPU limit."
        ),
    )
    advertise_host: str | None = Field(
        default=None,
        description=(
            "Host peers dial, published to the registry (in Kubernetes, the pod IP); None uses "
            "host, or this machine's address when host is a wildcard such as 0.0.0.0."
        ),
    )
    reflection: bool | None = Field(
        default=None,
        description=(
            "Serve the gRPC reflection service (grpcurl lists and describes the services); "
            "null follows service.environment: on in development, off in production."
        ),
    )
    drain_seconds: float = Field(
        default=2.0,
        ge=0,
        description=(
            "Delay between reporting NOT_SERVING / deregistering and stopping the server, "
            "so clients stop picking this instance."
        ),
    )
    grace_seconds: float = Field(
        default=10.0, ge=0, description="How long in-flight calls may run once stopping begins."
    )
    max_concurrent_rpcs: int | None = Field(
        default=None, ge=1, description="Upper bound on concurrent RPCs; None means unbounded."
    )
    max_message_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Largest message accepted or sent, in bytes.",
    )
    admission: AdmissionConfig = Field(
        default_factory=AdmissionConfig,
        description=(
            "Admission control per method: concurrent calls and calls per second, refused "
            "with RESOURCE_EXHAUSTED and a retry delay; no limits by default."
        ),
    )
    tls: ServerTlsConfig = Field(
        default_factory=ServerTlsConfig,
        description=(
            "TLS of the port (health and reflection included); mutual TLS with client_auth: "
            "require. Plaintext by default."
        ),
    )

    @field_validator("advertise_host")
    @classmethod
    def _check_advertise_host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if ":" in value and not value.startswith("["):
            with contextlib.suppress(ValueError):
                value = f"[{ipaddress.IPv6Address(value)}]"  # published as [v6]:port
        try:
            host, _ = _parse_endpoint(f"{value}:1")
        except ValueError:
            raise ValueError("must be a host name or IP address, without port or scheme") from None
        if host in ("0.0.0.0", "::"):
            raise ValueError("must be an address peers can reach, not a wildcard")
        return value


class TlsConfig(BaseModel):
    """TLS material for a client connection; cert and key go together."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca_file: Path | None = Field(
        default=None, description="CA bundle (PEM) that signs the server certificate."
    )
    cert_file: Path | None = Field(default=None, description="Client certificate (PEM).")
    key_file: Path | None = Field(default=None, description="Private key of cert_file (PEM).")

    @model_validator(mode="after")
    def _check_pair(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together, or neither")
        return self


class RegistryConfig(BaseModel):
    """Service registry: which backend, where it is, and how this instance registers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["etcd", "memory", "none"] = Field(
        default="etcd",
        description="etcd; memory (one process, tests); none (no registration or discovery).",
    )
    endpoints: Annotated[tuple[_Endpoint, ...], NoDecode] = Field(
        default=("127.0.0.1:2379",),
        min_length=1,
        description=(
            "etcd endpoints as host:port, IPv6 as [::1]:2379; in the environment a "
            "comma-separated list or a JSON array."
        ),
    )
    prefix: str = Field(
        default="/tether/services", description="Key prefix under which instances register."
    )
    ttl_seconds: int = Field(
        default=10, ge=2, description="Lease TTL; an instance that stops renewing expires after it."
    )
    required: bool = Field(
        default=False,
        description="Refuse to start when the registry is unreachable (else start and retry).",
    )
    username: str | None = Field(default=None, description="etcd user name.")
    password: SecretStr | None = Field(default=None, description="etcd password; needs username.")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS towards etcd.")

    @field_validator("endpoints", mode="before")
    @classmethod
    def _split_endpoints(cls, value: object) -> object:
        return split_names(value)

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        if value.endswith("/"):
            raise ValueError("must not end with '/'")
        return value

    @model_validator(mode="after")
    def _check_credentials(self) -> Self:
        if self.password is not None and self.username is None:
            raise ValueError("password is set without username; give both or neither")
        return self

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        """The endpoints as ``(host, port)`` pairs, IPv6 hosts without brackets."""
        return tuple(_parse_endpoint(endpoint) for endpoint in self.endpoints)


class ClientConfig(BaseModel):
    """Outbound calls made through tether clients."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout_seconds: float = Field(
        default=5.0, gt=0, description="Default deadline of an outbound call, in seconds."
    )
    balancer: Literal["round_robin", "p2c"] = Field(
        default="round_robin",
        description=(
            "How a call picks an instance: round_robin (in turn, each as often as its weight "
            "says), or p2c (the less loaded of two picked at random, by in-flight calls per "
            "weight)."
        ),
    )
    retry: RetryConfig = Field(
        default_factory=RetryConfig, description="Retries of idempotent or unsent calls."
    )
    idempotent_methods: Annotated[tuple[MethodPattern, ...], NoDecode] = Field(
        default=(),
        description=(
            "Methods safe to retry besides those the proto marks idempotent: "
            "'package.Service/Method' or 'package.Service/*'."
        ),
    )

    deadline_margin_seconds: float = Field(
        default=0.05,
        ge=0,
        le=10,
        description=(
            "Taken off the remaining inbound deadline when a handler calls out, so the "
            "answer can still travel back in time."
        ),
    )
    breaker: BreakerConfig = Field(
        default_factory=BreakerConfig, description="Circuit breaker per (service, method)."
    )
    fallback_codes: StatusNames = Field(
        default=("UNAVAILABLE", "DEADLINE_EXCEEDED"),
        description=(
            "Status names on which a method's declared fallback answers; an open breaker "
            "and a limiter's refusal always use it."
        ),
    )
    services: dict[str, ServicePolicy] = Field(
        default_factory=dict,
        description=(
            "Overrides per dependency, keyed by the name it is dialled with: the service of "
            "discovery:///name, or dial(..., service=name) for a fixed address."
        ),
    )
    tls: ClientTlsConfig = Field(
        default_factory=ClientTlsConfig,
        description=(
            "TLS of outbound calls (client.services.<name>.tls overrides it per dependency); "
            "plaintext by default."
        ),
    )

    @field_validator("idempotent_methods", mode="before")
    @classmethod
    def _split_methods(cls, value: object) -> object:
        return split_names(value)

    @field_validator("fallback_codes", mode="before")
    @classmethod
    def _upper_codes(cls, value: object) -> object:
        return upper_status_names(value)

    @model_validator(mode="after")
    def _check_overrides(self) -> Self:
        # A service or method override is merged over the defaults; check every merge now,
        # so a combination that breaks a rule fails at start-up, not on the first call.
        for name in self.services:
            try:
                self.resolver(name).check()
                self.tls_for(name)
            except ValidationError as exc:
                raise ValueError(f"services.{name}: {first_problem(exc)}") from None
        return self

    def tls_for(self, service: str | None) -> ClientTlsConfig:
        """The TLS settings of calls to dependency ``service``: ``tls`` with its overrides.

        Raises:
            pydantic.ValidationError: the merged settings break a rule (checked at load).
        """
        policy = self.services.get(service) if service else None
        return merge_client_tls(self.tls, policy.tls if policy is not None else None)

    def resolver(self, service: str | None) -> PolicyResolver:
        """The policies of the methods of dependency ``service`` (its overrides applied; the
        client defaults alone when ``service`` is None or has no overrides)."""
        return PolicyResolver(
            timeout_seconds=self.timeout_seconds,
            retry=self.retry,
            breaker=self.breaker,
            fallback_codes=self.fallback_codes,
            service=self.services.get(service) if service else None,
        )


class TracingConfig(BaseModel):
    """OpenTelemetry tracing and its OTLP exporter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        default=False,
        description="Record and export spans; when false the trace context still passes through.",
    )
    sample_ratio: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Share of new traces sampled, from 0 to 1; calls with a parent follow it.",
    )
    endpoint: str = Field(
        default="http://127.0.0.1:4317",
        description="OTLP gRPC collector URL: http:// plaintext, https:// TLS.",
    )
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="Headers sent to the collector, e.g. auth tokens."
    )
    timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="Deadline of each export, and the longest shutdown waits for the last spans.",
    )

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        if "@" in value.partition("://")[2].partition("/")[0]:
            # The endpoint is printed (tether config) and logged; headers are kept secret.
            raise ValueError(
                "must not hold credentials (user:password@host): send them in "
                "tracing.headers, which are kept secret"
            )
        return value


_LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class LoggingConfig(BaseModel):
    """Structured logging."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    level: _LogLevel = Field(
        default="info", description="Lowest level logged; any case is accepted."
    )
    format: _LogFormat | None = Field(
        default=None,
        description=(
            "json (one object per line) for machines, console for people; null follows "
            "service.environment: console in development, json in production."
        ),
    )
    access_log: bool = Field(
        default=False,
        description="Log every served call once it ends: method, code, duration, peer.",
    )
    slow_call_seconds: float | None = Field(
        default=1.0,
        gt=0,
        description="Warn about a served call that took longer than this; null turns it off.",
    )

    @field_validator("level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        # Only a known level is lowered, so a refused one is shown as it was written.
        if isinstance(value, str) and value.lower() in get_args(_LogLevel):
            return value.lower()
        return value


class MetricsConfig(BaseModel):
    """The Prometheus metrics endpoint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(default=True, description="Serve Prometheus metrics.")
    host: str = Field(default="0.0.0.0", description="Address the metrics endpoint binds to.")
    port: int = Field(
        default=9464, ge=0, le=65535, description="Metrics port; 0 picks a free port."
    )


class TetherConfig(BaseSettings):
    """Everything a tether service is configured with; environment variables beat the file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER, frozen=True, extra="forbid"
    )

    service: ServiceConfig = Field(description="Identity of this service.")
    server: ServerConfig = Field(default_factory=ServerConfig, description="The gRPC server.")
    registry: RegistryConfig = Field(
        default_factory=RegistryConfig, description="Service registry."
    )
    client: ClientConfig = Field(default_factory=ClientConfig, description="Outbound calls.")
    tracing: TracingConfig = Field(default_factory=TracingConfig, description="Tracing.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Metrics.")

    @property
    def development(self) -> bool:
        """Whether ``service.environment`` is development."""
        return self.service.environment == "development"

    @property
    def log_format(self) -> _LogFormat:
        """``logging.format``, or when unset the environment's: console in development, json
        in production."""
        if self.logging.format is not None:
            return self.logging.format
        return "console" if self.development else "json"

    @property
    def serves_reflection(self) -> bool:
        """``server.reflection``, or when unset the environment's: on in development, off in
        production."""
        if self.server.reflection is not None:
            return self.server.reflection
        return self.development

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: the environment beats init kwargs (the YAML file); no dotenv, no secrets dir.
        return env_settings, init_settings


def load_config(path: str | os.PathLike[str] | None = None) -> TetherConfig:
    """Load the configuration from a YAML file and ``TETHER_*`` environment variables.

    Args:
        path: the YAML file. When None, the file named by ``TETHER_CONFIG`` is used, else
            ``./tether.yaml`` if it exists, else no file (defaults and environment only).
            Environment variables such as ``TETHER_SERVER__PORT`` override the file.

    Returns:
        The validated, immutable configuration.

    Raises:
        ConfigError: the file is missing, unreadable or not YAML, or any value is refused;
            every refused value is listed, secrets masked.
    """
    file, origin = _locate_file(path)
    data = _read_file(file, origin) if file is not None else {}
    if file is not None:
        source = str(file)
    elif relevant_env(TetherConfig):
        source = "environment"
    else:
        source = "defaults"
    # `from None` throughout: pydantic's and PyYAML's messages echo input, secrets included.
    try:
        return TetherConfig(**data)
    except ValidationError as exc:
        raise ConfigError(problems_from(exc, TetherConfig), source=source) from None
    except SettingsError as exc:
        raise ConfigError([problem_from_settings(exc, TetherConfig)], source=source) from None


def render_config(config: TetherConfig) -> str:
    """Render the effective configuration as YAML that ``load_config`` reads back.

    Args:
        config: the configuration to show.

    Returns:
        YAML text, sections in declaration order, every secret replaced by ``**********``;
        an unset ``server.reflection`` or ``logging.format`` is shown as null with what the
        environment makes of it in a comment (``format: null  # production: json``).
    """
    # JSON mode turns SecretStr into its mask, Path into str and tuples into lists.
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    # Only the field lines of their own sections: a nested key or value may read the same.
    environment = config.service.environment
    resolved = {
        ("server", "  reflection: null"): "on" if config.serves_reflection else "off",
        ("logging", "  format: null"): config.log_format,
    }
    lines, section = [], ""
    for line in text.splitlines():
        if not line.startswith(" "):
            section = line.partition(":")[0]
        note = resolved.get((section, line))
        lines.append(f"{line}  # {environment}: {note}" if note else line)
    return "\n".join(lines) + "\n"


def _locate_file(path: str | os.PathLike[str] | None) -> tuple[Path | None, str | None]:
    """Return the YAML file to read, and the variable that named it (None if not one)."""
    if path is not None:
        return Path(path), None
    from_env = os.environ.get(_CONFIG_PATH_VAR)
    if from_env:
        return Path(from_env), _CONFIG_PATH_VAR
    default = Path(_DEFAULT_CONFIG_FILE)
    return (default, None) if default.is_file() else (None, None)


def _read_file(file: Path, origin: str | None) -> dict[str, Any]:
    """Parse the YAML file into init kwargs for TetherConfig, or raise ConfigError."""
    suffix = f" (from {origin})" if origin else ""

    def refuse(rule: str) -> ConfigError:
        problem = ConfigProblem("config", show(str(file)), rule + suffix)
        return ConfigError([problem], source=str(file))

    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise refuse("file not found") from None
    except OSError as exc:
        raise refuse(f"cannot be read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.MarkedYAMLError as exc:
        # Only the problem and its position: the snippet PyYAML quotes may hold a secret.
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise refuse(f"invalid YAML{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise refuse(f"invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise refuse("must be a mapping of sections (service, server, ...)")
    return {str(key): value for key, value in data.items()}
