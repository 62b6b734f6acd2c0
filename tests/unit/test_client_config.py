"""Tests for the client section of tether.config: balancer, retry policy, idempotent methods."""

from __future__ import annotations

import os
from pathlib import Path
from typing import get_args

import grpc
import pytest

from tether.config import ClientConfig, RetryConfig, load_config
from tether.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Drop ambient TETHER_* variables and run in an empty directory."""
    for name in list(os.environ):
        if name.upper().startswith("TETHER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def problems(yaml_text: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "tether.yaml"
    path.write_text("service: {name: orders}\n" + yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(problem) for problem in info.value.problems]


def test_defaults() -> None:
    """Round robin, three attempts on UNAVAILABLE, A6 throttling defaults, no extra methods."""
    config = ClientConfig()
    assert config.balancer == "round_robin"
    assert config.retry == RetryConfig(
        max_attempts=3,
        initial_backoff_seconds=0.1,
        max_backoff_seconds=1.0,
        backoff_multiplier=2.0,
        retryable_status_codes=("UNAVAILABLE",),
        max_tokens=10,
        token_ratio=0.1,
    )
    assert config.idempotent_methods == ()


def test_status_names_match_grpc() -> None:
    """The status names configuration accepts are grpc's, less OK."""
    from tether.config_policies import StatusName as _StatusName

    names = {code.name for code in grpc.StatusCode} - {"OK"}
    assert set(get_args(_StatusName)) == names


def test_codes_are_read_in_any_case() -> None:
    """Status names are matched without regard to case and kept upper-case."""
    config = RetryConfig(retryable_status_codes=("unavailable", "Resource_Exhausted"))
    assert config.retryable_status_codes == ("UNAVAILABLE", "RESOURCE_EXHAUSTED")


def test_bad_values_are_refused_with_field_value_and_rule(tmp_path: Path) -> None:
    """Each bad client value is named with what is allowed."""
    found = problems(
        "client:\n"
        "  balancer: least_conn\n"
        "  idempotent_methods: [orders.v1.Orders/Get, Get]\n"
        "  retry: {max_attempts: 6, retryable_status_codes: [UNAVAILABLE, OK]}\n",
        tmp_path,
    )
    assert found[0] == "client.balancer='least_conn': must be one of: 'round_robin', 'p2c'"
    assert found[1] == "client.retry.max_attempts=6: must be <= 5"
    assert found[2].startswith("client.retry.retryable_status_codes[1]='OK': must be one of: ")
    assert "'UNAVAILABLE'" in found[2]
    assert found[3] == (
        "client.idempotent_methods[1]='Get': must be 'package.Service/Method' or "
        "'package.Service/*'"
    )


def test_backoff_bounds_must_be_ordered(tmp_path: Path) -> None:
    """max_backoff_seconds below initial_backoff_seconds is refused with both values."""
    [found] = problems(
        "client: {retry: {initial_backoff_seconds: 2, max_backoff_seconds: 1}}\n", tmp_path
    )
    assert "max_backoff_seconds (1.0) must be >= initial_backoff_seconds (2.0)" in found


def test_lists_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Comma-separated variables fill the list fields."""
    monkeypatch.setenv("TETHER_SERVICE__NAME", "orders")
    monkeypatch.setenv("TETHER_CLIENT__IDEMPOTENT_METHODS", "a.v1.A/Get, a.v1.B/*")
    monkeypatch.setenv("TETHER_CLIENT__RETRY__RETRYABLE_STATUS_CODES", "unavailable,ABORTED")
    monkeypatch.setenv("TETHER_CLIENT__BALANCER", "p2c")
    config = load_config()
    assert config.client.idempotent_methods == ("a.v1.A/Get", "a.v1.B/*")
    assert config.client.retry.retryable_status_codes == ("UNAVAILABLE", "ABORTED")
    assert config.client.balancer == "p2c"
