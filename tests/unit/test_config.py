"""Tests for tether.config: loading, precedence, validation messages and secret masking."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from tether.config import (
    RegistryConfig,
    ServiceConfig,
    TetherConfig,
    TlsConfig,
    load_config,
    render_config,
)
from tether.errors import ConfigError

SECRET = "hunter2-do-not-print"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Drop ambient TETHER_* variables and run in an empty directory (no stray ./tether.yaml)."""
    for name in list(os.environ):
        if name.upper().startswith("TETHER_"):
            monkeypatch.delenv(name)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


def write(tmp_path: Path, text: str, name: str = "tether.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refused(path: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def problem_lines(error: ConfigError) -> list[str]:
    return [str(problem) for problem in error.problems]


def test_defaults_load_with_only_service_name(tmp_path: Path) -> None:
    """A file naming only the service yields the documented defaults everywhere else."""
    config = load_config(write(tmp_path, "service: {name: orders}\n"))
    assert config == TetherConfig(service=ServiceConfig(name="orders"))
    assert config.server.port == 50051
    assert config.server.drain_seconds == 2.0
    assert config.registry.backend == "etcd"
    assert config.registry.endpoints == ("127.0.0.1:2379",)
    assert config.registry.ttl_seconds == 10
    assert config.client.timeout_seconds == 5.0
    assert config.tracing.enabled is False
    assert config.logging.level == "info"
    assert config.metrics.port == 9464


def test_service_name_is_required(tmp_path: Path) -> None:
    """With no file and no environment the missing service section is the one problem."""
    error = refused()
    assert problem_lines(error) == ["service=<missing>: is required"]
    assert error.source == "defaults"


def test_yaml_file_loads(tmp_path: Path) -> None:
    """Values from every section of the YAML file reach the config, converted to their types."""
    path = write(
        tmp_path,
        """
service: {name: orders, version: 1.2.3, zone: eu-1, metadata: {team: pay}}
server: {host: 127.0.0.1, port: 6000, max_concurrent_rpcs: 100}
registry:
  endpoints: ["etcd-0:2379", "etcd-1:2379"]
  tls: {ca_file: /etc/ca.pem}
client: {timeout_seconds: 1.5}
tracing: {enabled: true, sample_ratio: 1}
logging: {format: console}
metrics: {enabled: false}
""",
    )
    config = load_config(path)
    assert config.service.version == "1.2.3"
    assert config.service.metadata == {"team": "pay"}
    assert (config.server.host, config.server.port) == ("127.0.0.1", 6000)
    assert config.server.max_concurrent_rpcs == 100
    assert config.registry.endpoints == ("etcd-0:2379", "etcd-1:2379")
    assert config.registry.tls.ca_file == Path("/etc/ca.pem")
    assert config.client.timeout_seconds == 1.5
    assert config.tracing.sample_ratio == 1.0
    assert config.logging.format == "console"
    assert config.metrics.enabled is False


def test_env_overrides_yaml_nested_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TETHER_SERVER__PORT beats the file's port while the file's host survives the merge."""
    path = write(tmp_path, "service: {name: orders}\nserver: {port: 1, host: x}\n")
    monkeypatch.setenv("TETHER_SERVER__PORT", "2")
    config = load_config(path)
    assert config.server.port == 2
    assert config.server.host == "x"


def test_env_section_json_merges_with_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole section given as JSON in the environment merges key by key with the file."""
    path = write(tmp_path, "service: {name: orders, zone: eu-1}\n")
    monkeypatch.setenv("TETHER_SERVICE", '{"version": "2.0.0"}')
    config = load_config(path)
    assert (config.service.name, config.service.zone) == ("orders", "eu-1")
    assert config.service.version == "2.0.0"


def test_env_alone_configures_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without any file, the environment alone can supply the required service name."""
    monkeypatch.setenv("TETHER_SERVICE__NAME", "orders")
    assert load_config().service.name == "orders"


def test_tether_config_variable_picks_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TETHER_CONFIG names the file and is not mistaken for an (unknown) settings field."""
    path = write(tmp_path, "service: {name: from-env-path}\n", name="elsewhere.yaml")
    monkeypatch.setenv("TETHER_CONFIG", str(path))
    assert load_config().service.name == "from-env-path"


def test_explicit_path_beats_tether_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit path wins over the file named by TETHER_CONFIG."""
    monkeypatch.setenv("TETHER_CONFIG", str(write(tmp_path, "service: {name: env}\n", "a.yaml")))
    explicit = write(tmp_path, "service: {name: explicit}\n", "b.yaml")
    assert load_config(explicit).service.name == "explicit"


def test_tether_yaml_in_working_directory_is_used() -> None:
    """With no path and no TETHER_CONFIG, ./tether.yaml is read when present."""
    Path("tether.yaml").write_text("service: {name: local}\n", encoding="utf-8")
    assert load_config().service.name == "local"


def test_explicit_missing_file_refused(tmp_path: Path) -> None:
    """A named file that does not exist is refused as field config, with its path."""
    missing = tmp_path / "nope.yaml"
    error = refused(missing)
    assert problem_lines(error) == [f"config={str(missing)!r}: file not found"]
    assert error.source == str(missing)


def test_missing_file_from_variable_names_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing file named by TETHER_CONFIG says where the path came from."""
    monkeypatch.setenv("TETHER_CONFIG", str(tmp_path / "nope.yaml"))
    assert problem_lines(refused())[0].endswith("file not found (from TETHER_CONFIG)")


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    """Broken YAML is a ConfigError that points at the line and column."""
    path = write(tmp_path, "service:\n  name: orders\nserver: {port: 1\nlogging: {}\n")
    error = refused(path)
    (problem,) = error.problems
    assert problem.field == "config"
    assert "invalid YAML at line 4, column" in problem.rule


def test_top_level_list_refused(tmp_path: Path) -> None:
    """A YAML document that is not a mapping of sections is refused with that rule."""
    (problem,) = refused(write(tmp_path, "- service\n- server\n")).problems
    assert problem.rule == "must be a mapping of sections (service, server, ...)"


def test_empty_file_means_no_settings(tmp_path: Path) -> None:
    """An empty file is read as no settings, so only the required service is reported."""
    assert problem_lines(refused(write(tmp_path, ""))) == ["service=<missing>: is required"]


def test_negative_ttl_refused_with_exact_message(tmp_path: Path) -> None:
    """A ttl of -1 reads exactly as field=value: rule."""
    error = refused(write(tmp_path, "service: {name: a}\nregistry: {ttl_seconds: -1}\n"))
    assert "registry.ttl_seconds=-1: must be >= 2" in str(error)


def test_several_bad_values_reported_together(tmp_path: Path) -> None:
    """Every refused value is listed, not only the first one found."""
    path = write(
        tmp_path,
        """
service: {name: a}
server: {port: 70000, drain_seconds: -1, reflection: maybe, max_message_bytes: x}
client: {timeout_seconds: 0}
tracing: {sample_ratio: 1.5, timeout_seconds: 0, endpoint: "127.0.0.1:4317"}
""",
    )
    assert sorted(problem_lines(refused(path))) == [
        "client.timeout_seconds=0: must be > 0",
        "server.drain_seconds=-1: must be >= 0",
        "server.max_message_bytes='x': must be an integer",
        "server.port=70000: must be <= 65535",
        "server.reflection='maybe': must be true or false",
        "tracing.endpoint='127.0.0.1:4317': must start with http:// or https://",
        "tracing.sample_ratio=1.5: must be <= 1",
        "tracing.timeout_seconds=0: must be > 0",
    ]


def test_non_numeric_float_refused(tmp_path: Path) -> None:
    """A float field given text says it must be a number."""
    error = refused(write(tmp_path, "service: {name: a}\nserver: {grace_seconds: soon}\n"))
    assert problem_lines(error) == ["server.grace_seconds='soon': must be a number"]


def test_unknown_key_refused_naming_allowed_keys(tmp_path: Path) -> None:
    """A misspelt key is refused and the rule lists the keys that section allows."""
    error = refused(write(tmp_path, "service: {name: a}\nserver: {prot: 1}\n"))
    (problem,) = error.problems
    assert problem.field == "server.prot"
    assert problem.rule == (
        "unknown field; allowed: admission, advertise_host, drain_seconds, grace_seconds, "
        "host, max_concurrent_rpcs, max_message_bytes, port, reflection, tls, workers"
    )


def test_unknown_section_refused_naming_sections(tmp_path: Path) -> None:
    """A misspelt section is refused and the rule lists the sections."""
    (problem,) = refused(write(tmp_path, "service: {name: a}\nservr: {}\n")).problems
    assert problem.field == "servr"
    assert problem.rule == (
        "unknown field; allowed: client, logging, metrics, registry, server, service, tracing"
    )


def test_unknown_key_value_is_withheld(tmp_path: Path) -> None:
    """A misspelt secret key (pasword) is refused without echoing its value."""
    error = refused(write(tmp_path, f"service: {{name: a}}\nregistry: {{pasword: {SECRET}}}\n"))
    assert SECRET not in str(error)
    assert error.problems[0].value == "'**********'"


def test_bad_service_name_refused_with_sentence(tmp_path: Path) -> None:
    """A service name that is not a DNS label is explained in words, not as a regex."""
    error = refused(write(tmp_path, "service: {name: Orders_Service}\n"))
    assert problem_lines(error) == [
        "service.name='Orders_Service': must be a lowercase DNS label: a-z, 0-9 and '-', "
        "starting with a letter, at most 63 characters"
    ]


@pytest.mark.parametrize("name", ["a", "orders", "orders-v2", "a" * 63])
def test_good_service_names_accepted(name: str) -> None:
    """Valid DNS labels, including the 63-character maximum, are accepted."""
    assert ServiceConfig(name=name).name == name


@pytest.mark.parametrize("name", ["", "2orders", "orders-", "a" * 64, "or.ders"])
def test_bad_service_names_refused(name: str) -> None:
    """Empty, digit-first, dash-last, over-long and dotted names are refused."""
    with pytest.raises(ValidationError):
        ServiceConfig(name=name)


def test_bad_log_level_lists_allowed_values(tmp_path: Path) -> None:
    """An unknown level is refused, shown as written, with the allowed levels listed."""
    error = refused(write(tmp_path, "service: {name: a}\nlogging: {level: LOUD}\n"))
    assert problem_lines(error) == [
        "logging.level='LOUD': must be one of: 'debug', 'info', 'warning', 'error', 'critical'"
    ]


def test_bad_log_format_lists_allowed_values(tmp_path: Path) -> None:
    """An unknown log format is refused with the allowed formats listed."""
    error = refused(write(tmp_path, "service: {name: a}\nlogging: {format: xml}\n"))
    assert problem_lines(error) == ["logging.format='xml': must be one of: 'json', 'console'"]


def test_uppercase_log_level_accepted(tmp_path: Path) -> None:
    """INFO is accepted and normalised to info."""
    config = load_config(write(tmp_path, "service: {name: a}\nlogging: {level: INFO}\n"))
    assert config.logging.level == "info"


def test_environment_defaults_to_production(tmp_path: Path) -> None:
    """Unset, the environment is production: JSON logs and no reflection, the safe choices;
    logging.format and server.reflection stay unset (null) so they keep following it."""
    config = load_config(write(tmp_path, "service: {name: a}\n"))
    assert config.service.environment == "production"
    assert (config.logging.format, config.server.reflection) == (None, None)
    assert (config.development, config.log_format, config.serves_reflection) == (
        False,
        "json",
        False,
    )


def test_development_means_console_logs_and_reflection(tmp_path: Path) -> None:
    """In development the unset format and reflection become console and on."""
    config = load_config(write(tmp_path, "service: {name: a, environment: development}\n"))
    assert (config.development, config.log_format, config.serves_reflection) == (
        True,
        "console",
        True,
    )


@pytest.mark.parametrize(
    ("environment", "fmt", "reflection"),
    [("development", "json", False), ("production", "console", True)],
)
def test_explicit_format_and_reflection_beat_the_environment(
    tmp_path: Path, environment: str, fmt: str, reflection: bool
) -> None:
    """logging.format and server.reflection, when written, win over the environment's default."""
    text = (
        f"service: {{name: a, environment: {environment}}}\n"
        f"server: {{reflection: {str(reflection).lower()}}}\n"
        f"logging: {{format: {fmt}}}\n"
    )
    config = load_config(write(tmp_path, text))
    assert (config.log_format, config.serves_reflection) == (fmt, reflection)


def test_environment_variable_beats_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TETHER_SERVICE__ENVIRONMENT (what `tether dev` and the image set) beats tether.yaml."""
    monkeypatch.setenv("TETHER_SERVICE__ENVIRONMENT", "production")
    config = load_config(write(tmp_path, "service: {name: a, environment: development}\n"))
    assert (config.service.environment, config.log_format, config.serves_reflection) == (
        "production",
        "json",
        False,
    )


def test_uppercase_environment_accepted(tmp_path: Path) -> None:
    """Development is accepted and normalised to development."""
    config = load_config(write(tmp_path, "service: {name: a, environment: Development}\n"))
    assert config.service.environment == "development"


def test_bad_environment_lists_allowed_values(tmp_path: Path) -> None:
    """An unknown environment (go-zero's `dev`, a `staging`) is refused, shown as written, with
    the allowed names listed."""
    error = refused(write(tmp_path, "service: {name: a, environment: dev}\n"))
    assert problem_lines(error) == [
        "service.environment='dev': must be one of: 'development', 'production'"
    ]


def test_bad_environment_variable_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused environment from the variable names the variable."""
    monkeypatch.setenv("TETHER_SERVICE__ENVIRONMENT", "staging")
    error = refused(write(tmp_path, "service: {name: a}\n"))
    assert problem_lines(error) == [
        "service.environment='staging': must be one of: 'development', 'production' "
        "(from TETHER_SERVICE__ENVIRONMENT)"
    ]


def test_password_not_in_config_error(tmp_path: Path) -> None:
    """A refused registry section masks its password in the error text."""
    error = refused(write(tmp_path, f"service: {{name: a}}\nregistry: {{password: {SECRET}}}\n"))
    assert SECRET not in str(error)
    assert "'password': '**********'" in str(error)


def test_password_not_in_error_traceback(tmp_path: Path) -> None:
    """The pydantic error, which echoes input, is not chained into the printed traceback."""
    error = refused(write(tmp_path, f"service: {{name: a}}\nregistry: {{password: {SECRET}}}\n"))
    printed = "".join(traceback.format_exception(error))
    assert SECRET not in printed


def test_secret_header_not_in_config_error(tmp_path: Path) -> None:
    """A refused tracing header value is masked: the dict-of-secrets type marks it secret."""
    text = f"service: {{name: a}}\ntracing: {{headers: {{authorization: [{SECRET}]}}}}\n"
    path = write(tmp_path, text)
    error = refused(path)
    assert problem_lines(error) == ["tracing.headers.authorization='**********': must be a string"]


def test_secrets_not_in_rendered_config(tmp_path: Path) -> None:
    """render_config masks the registry password and the tracing headers."""
    path = write(
        tmp_path,
        f"service: {{name: a}}\nregistry: {{username: u, password: {SECRET}}}\n"
        f"tracing: {{headers: {{authorization: {SECRET}}}}}\n",
    )
    config = load_config(path)
    assert config.registry.password is not None
    assert config.registry.password.get_secret_value() == SECRET
    rendered = render_config(config)
    assert SECRET not in rendered
    assert "password: '**********'" in rendered
    assert "authorization: '**********'" in rendered


def test_secret_not_in_repr(tmp_path: Path) -> None:
    """repr() of a loaded config does not reveal the password."""
    path = write(tmp_path, f"service: {{name: a}}\nregistry: {{username: u, password: {SECRET}}}\n")
    assert SECRET not in repr(load_config(path))


def test_tls_cert_without_key_refused(tmp_path: Path) -> None:
    """A client certificate without its key is refused with the validator's message."""
    error = refused(write(tmp_path, "service: {name: a}\nregistry: {tls: {cert_file: c.pem}}\n"))
    assert problem_lines(error) == [
        "registry.tls={'cert_file': 'c.pem'}: cert_file and key_file must be given together, "
        "or neither"
    ]


def test_tls_key_without_cert_refused() -> None:
    """A key without its certificate is refused as well."""
    with pytest.raises(ValidationError, match="cert_file and key_file must be given together"):
        TlsConfig(key_file=Path("k.pem"))


def test_tls_cert_with_key_accepted() -> None:
    """Certificate and key given together are accepted."""
    tls = TlsConfig(cert_file=Path("c.pem"), key_file=Path("k.pem"))
    assert (tls.cert_file, tls.key_file) == (Path("c.pem"), Path("k.pem"))


def test_password_without_username_refused(tmp_path: Path) -> None:
    """A registry password without a username is refused."""
    error = refused(write(tmp_path, "service: {name: a}\nregistry: {password: pw}\n"))
    (problem,) = error.problems
    assert problem.field == "registry"
    assert problem.rule == "password is set without username; give both or neither"


def test_password_with_username_accepted() -> None:
    """Username and password together are accepted."""
    registry = RegistryConfig(username="u", password=SecretStr("pw"))
    assert registry.username == "u"


@pytest.mark.parametrize(
    ("endpoint", "rule"),
    [
        ("etcd:0", "port must be an integer from 1 to 65535"),
        ("etcd:65536", "port must be an integer from 1 to 65535"),
        ("etcd:http", "port must be an integer from 1 to 65535"),
        ("etcd", "must be host:port; the port is missing"),
        (":2379", "must be host:port with a non-empty host"),
        ("::1:2379", "an IPv6 host must be in brackets, e.g. [::1]:2379"),
        ("[::1]", "must be host:port; the port is missing"),
        ("http://etcd:2379", "must be host:port without a scheme, e.g. 127.0.0.1:2379"),
    ],
)
def test_bad_endpoint_refused(tmp_path: Path, endpoint: str, rule: str) -> None:
    """Each malformed endpoint is refused at its index with a rule saying what is wrong."""
    path = write(tmp_path, f"service: {{name: a}}\nregistry: {{endpoints: ['ok:1', '{endpoint}']}}")
    assert problem_lines(refused(path)) == [f"registry.endpoints[1]={endpoint!r}: {rule}"]


def test_ipv6_endpoint_accepted() -> None:
    """A bracketed IPv6 endpoint is accepted and splits into host and port."""
    registry = RegistryConfig(endpoints=("[::1]:2379", "etcd-0:2380"))
    assert registry.addresses == (("::1", 2379), ("etcd-0", 2380))


def test_no_endpoint_refused(tmp_path: Path) -> None:
    """An empty endpoint list is refused."""
    error = refused(write(tmp_path, "service: {name: a}\nregistry: {endpoints: []}\n"))
    assert problem_lines(error) == ["registry.endpoints=[]: must not be empty"]


def test_endpoints_from_env_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    """TETHER_REGISTRY__ENDPOINTS accepts the comma-separated form operators write by hand."""
    monkeypatch.setenv("TETHER_SERVICE__NAME", "a")
    monkeypatch.setenv("TETHER_REGISTRY__ENDPOINTS", "etcd-0:2379, [::1]:2379")
    assert load_config().registry.endpoints == ("etcd-0:2379", "[::1]:2379")


def test_endpoints_from_env_json_array(monkeypatch: pytest.MonkeyPatch) -> None:
    """TETHER_REGISTRY__ENDPOINTS also accepts a JSON array."""
    monkeypatch.setenv("TETHER_SERVICE__NAME", "a")
    monkeypatch.setenv("TETHER_REGISTRY__ENDPOINTS", '["etcd-0:2379", "etcd-1:2379"]')
    assert load_config().registry.endpoints == ("etcd-0:2379", "etcd-1:2379")


@pytest.mark.parametrize(
    ("prefix", "rule"),
    [("tether", "must start with '/'"), ("/tether/", "must not end with '/'")],
)
def test_bad_registry_prefix_refused(tmp_path: Path, prefix: str, rule: str) -> None:
    """The key prefix must start with a slash and must not end with one."""
    path = write(tmp_path, f"service: {{name: a}}\nregistry: {{prefix: '{prefix}'}}\n")
    assert problem_lines(refused(path)) == [f"registry.prefix={prefix!r}: {rule}"]


def test_tracing_endpoint_needs_http_scheme(tmp_path: Path) -> None:
    """The OTLP endpoint must be an http(s) URL."""
    path = write(tmp_path, "service: {name: a}\ntracing: {endpoint: 'collector:4317'}\n")
    assert problem_lines(refused(path)) == [
        "tracing.endpoint='collector:4317': must start with http:// or https://"
    ]


def test_config_is_immutable(tmp_path: Path) -> None:
    """Assigning to the config or to one of its sections raises."""
    config = load_config(write(tmp_path, "service: {name: a}\n"))
    with pytest.raises(ValidationError, match="frozen"):
        config.server = config.server  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        config.server.port = 1  # type: ignore[misc]


def test_long_bad_value_truncated(tmp_path: Path) -> None:
    """An over-long bad value is cut to 80 characters ending in '...'."""
    long_name = "X" * 500
    (problem,) = refused(write(tmp_path, f"service: {{name: {long_name}}}\n")).problems
    assert len(problem.value) == 80
    assert problem.value == "'" + "X" * 76 + "..."


def test_env_problem_names_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad value from the environment names the variable it came from."""
    monkeypatch.setenv("TETHER_SERVER__PORT", "abc")
    error = refused(write(tmp_path, "service: {name: a}\n"))
    assert problem_lines(error) == [
        "server.port='abc': must be an integer (from TETHER_SERVER__PORT)"
    ]


def test_env_non_json_section_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A structured value in the environment that is not JSON is a ConfigError, not a crash."""
    monkeypatch.setenv("TETHER_SERVICE__NAME", "a")
    monkeypatch.setenv("TETHER_SERVICE__METADATA", "team=pay")
    error = refused()
    assert problem_lines(error) == [
        "service.metadata='team=pay': must be JSON (from TETHER_SERVICE__METADATA)"
    ]
    assert error.source == "environment"


def test_rendered_config_says_what_unset_settings_follow(tmp_path: Path) -> None:
    """Unset reflection and format render as null, with the environment's answer in a comment."""
    config = load_config(write(tmp_path, "service: {name: a, environment: development}\n"))
    lines = render_config(config).splitlines()
    assert "  reflection: null  # development: on" in lines
    assert "  format: null  # development: console" in lines
    assert (
        "  format: null  # production: json"
        in render_config(TetherConfig(service=ServiceConfig(name="a"))).splitlines()
    )


def test_render_load_round_trip_defaults(tmp_path: Path) -> None:
    """Rendering a default config and loading the text back gives an equal config."""
    config = TetherConfig(service=ServiceConfig(name="orders"))
    assert load_config(write(tmp_path, render_config(config))) == config


def test_render_load_round_trip_custom_values(tmp_path: Path) -> None:
    """Non-default values, paths and tuples survive the render/load round trip too."""
    path = write(
        tmp_path,
        """
service: {name: orders, instance_id: i-1, metadata: {team: pay}}
server: {port: 0, max_concurrent_rpcs: 8, drain_seconds: 0.5}
registry: {endpoints: ["[::1]:2379", "b:1"], username: u, tls: {ca_file: /ca.pem}}
logging: {level: WARNING, format: console}
""",
        name="in.yaml",
    )
    config = load_config(path)
    assert load_config(write(tmp_path, render_config(config), name="out.yaml")) == config
