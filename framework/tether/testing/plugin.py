"""pytest plugin of the tether test kit (loaded through the ``pytest11`` entry point)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tether.testing.etcd import EtcdNotFound, EtcdServer
from tether.testing.etcd_cluster import EtcdCluster
from tether.testing.otel import OtlpSink

if TYPE_CHECKING:
    import etcd3

# Bounds every call of the ``etcd_client`` fixture, so a stuck etcd fails a test, never hangs it.
_CLIENT_TIMEOUT = 5.0


def _new_etcd_server(name: str) -> EtcdServer:
    try:
        return EtcdServer(name=name)
    except EtcdNotFound as exc:
        # Fail, never skip: a missing etcd must not pass a run quietly.
        pytest.fail(str(exc), pytrace=False)


def _new_etcd_cluster() -> EtcdCluster:
    try:
        return EtcdCluster()
    except EtcdNotFound as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    """A fresh real etcd on free 127.0.0.1 ports with its own temp data dir, closed after the test.

    Fails (never skips) when no etcd binary is found; see ``tether.testing.find_etcd_binary``.
    """
    with _new_etcd_server("tether-test") as server:
        yield server


@pytest.fixture(scope="session")
def etcd_session() -> Iterator[EtcdServer]:
    """One real etcd shared by the whole session, for tests that delete the keys they write."""
    with _new_etcd_server("tether-session") as server:
        yield server


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A fresh real 3-member etcd cluster on free 127.0.0.1 ports, with a leader; closed after.

    Fails (never skips) when no etcd binary is found; see ``tether.testing.find_etcd_binary``.
    """
    with _new_etcd_cluster() as cluster:
        yield cluster


@pytest.fixture
def etcd_client(etcd: EtcdServer) -> Iterator[etcd3.Etcd3Client]:
    """An ``etcd3`` client on the ``etcd`` fixture, each call bounded to 5 s; closed after."""
    client = etcd.client(timeout=_CLIENT_TIMEOUT)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def otlp_sink(tmp_path: Path) -> Iterator[OtlpSink]:
    """A real OTLP/gRPC trace receiver on 127.0.0.1 keeping every span, also written as JSON
    lines to ``tmp_path / "spans.jsonl"``; stopped after the test."""
    with OtlpSink(tmp_path / "spans.jsonl") as sink:
        yield sink
