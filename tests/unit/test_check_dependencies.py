"""The dependency names `tether check --runtime` reads from the source (TTH205): every way the
source names a dependency, and what makes the set unknown."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tether.check.dependencies import dialed_in_paths, dialed_in_source


def names(source: str) -> tuple[set[str], int]:
    """The names ``source`` (dedented) calls, and how many calls name one by a value."""
    found = dialed_in_source(textwrap.dedent(source), "service.py")
    return found.names, len(found.unknown)


NAMED = {
    "app_client": ('users = app.client("users", pb_grpc.UsersStub)', "users"),
    "app_client_channel": ('channel = self.app.client("inventory")', "inventory"),
    "client_service_keyword": ('app.client(service="users")', "users"),
    "dial_discovery": ('tether.dial("discovery:///orders", discovery=found)', "orders"),
    "dial_imported": ('dial("discovery:///orders")', "orders"),
    "dial_service_keyword": ('tether.dial("10.0.0.5:50051", service="billing")', "billing"),
    "target_in_a_constant": ('TARGET = "discovery:///rates"\ntether.dial(TARGET)', "rates"),
    "target_in_a_dict": ('TARGETS = {"r": "discovery:///rates"}', "rates"),
    "name_in_a_constant": ('SERVICE = "users"\napp.client(SERVICE, Stub)', "users"),
    "annotated_constant": ('SERVICE: str = "users"\napp.client(SERVICE)', "users"),
    "resolver": ('config.client.resolver("users")', "users"),
    "tls_for": ('config.client.tls_for("users")', "users"),
    "middleware": ('tether.default_client_middleware(config.client, "users")', "users"),
}


@pytest.mark.parametrize(("source", "expected"), NAMED.values(), ids=NAMED.keys())
def test_every_way_of_naming_a_dependency_is_read(source: str, expected: str) -> None:
    """app.client, dial targets and service=, discovery strings, constants and the policy
    look-ups name their dependency."""
    assert names(source) == ({expected}, 0)


UNKNOWN = {
    "client_by_variable": "app.client(name, Stub)",
    "client_by_attribute": "app.client(self.settings.users, Stub)",
    "dial_by_variable": "tether.dial(target)",
    "dial_f_string": 'tether.dial(f"discovery:///{name}")',
    "f_string_anywhere": "TARGET = f\"discovery:///{os.environ['USERS']}\"",
    "service_keyword_by_variable": 'tether.dial("10.0.0.5:50051", service=name)',
}


@pytest.mark.parametrize("source", UNKNOWN.values(), ids=UNKNOWN.keys())
def test_a_name_the_source_does_not_spell_out_is_unknown(source: str) -> None:
    """A dependency named by a value not in the source makes the set unknown."""
    assert names(source)[1] >= 1


NOTHING = {
    "own_address": "tether.dial(app.target)",
    "fixed_address": 'tether.dial("127.0.0.1:50051")',
    "tracing_service": "tether.Tracing.for_service(cfg, service=config.service.name)",
    "http_client": "httpx.AsyncClient(base_url=url)",
    "scheme_alone": 'PREFIX = "discovery:///"',
    "service_none": 'tether.dial("127.0.0.1:1", service=None)',
}


@pytest.mark.parametrize("source", NOTHING.values(), ids=NOTHING.keys())
def test_calls_naming_no_dependency_are_ignored(source: str) -> None:
    """An App's own address, a fixed address, other service= keywords: no name, not unknown."""
    assert names(source) == (set(), 0)


def test_a_file_that_does_not_parse_names_nothing() -> None:
    """The static check reports a syntax error; the names are read from the rest."""
    assert names('app.client("users"\n') == (set(), 0)


def test_names_are_read_from_the_paths_without_tests(tmp_path: Path) -> None:
    """Every checked file under the paths is read; tests are excluded, as for the rules."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "orders"\n')
    (tmp_path / "orders").mkdir()
    (tmp_path / "orders" / "service.py").write_text(
        'users = app.client("users", Stub)\nstock = app.client("inventory", Stub)\n'
    )
    (tmp_path / "orders" / "edge.py").write_text('tether.dial("discovery:///rates")\n')
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_service.py").write_text('app.client("billing")\napp.client(x)\n')
    found = dialed_in_paths([tmp_path, tmp_path / "orders"])
    assert (found.names, found.unknown) == ({"users", "inventory", "rates"}, [])
