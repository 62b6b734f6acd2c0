"""Bad input, property-based: hypothesis profiles and a tether server to send junk to.

The ``tether`` profile (the default) is deterministic: ``derandomize`` derives every example
from the test itself, so CI runs the same examples every time, and no example database is
written. ``HYPOTHESIS_PROFILE=explore`` draws fresh random examples on each run, for a local
hunt; a failure prints the ``@reproduce_failure`` blob to replay it.

Time limits: no per-example deadline (a loaded CI machine must not turn a slow example into
a failure); every test bounds its run with ``max_examples`` instead.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from served_echo import Records, ServedEcho
from support.tracing import memory_tracing

import tether
from tether.testing import loopback_config

_COMMON: dict[str, Any] = {"database": None, "print_blob": True, "deadline": None}
settings.register_profile("tether", derandomize=True, **_COMMON)
settings.register_profile("explore", derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "tether"))

WAIT = 20.0  # bound on starting and stopping the server; it needs well under a second


@pytest.fixture(scope="module")
def served_echo() -> Iterator[ServedEcho]:
    """Echo with tether's full default server chain and tracing on, for the module's tests.

    It runs on its own event loop in a thread, so hypothesis tests can call it with grpc's
    blocking client, example after example, and it must keep serving through all of them.
    """
    # Imported here: the Echo protos are compiled when pytest configures itself, after this
    # conftest is loaded when tests/property is named on the command line.
    from echo.v1 import echo_pb2_grpc
    from support.echo_service import EchoServicer

    stream = io.StringIO()
    tether.configure_logging("debug", "json", stream=stream)
    records = Records()
    root = logging.getLogger()
    root.addHandler(records)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="served echo", daemon=True)
    thread.start()
    exporter = InMemorySpanExporter()
    servicer = EchoServicer(label="echo-1")
    # Not support.echo_service.build_app: its SIGUSR1 hook needs the main thread.
    app = tether.App(
        loopback_config(
            "echo", logging={"level": "debug", "access_log": True, "slow_call_seconds": 1e-6}
        ),
        tracing=memory_tracing(exporter, "echo"),
    )
    servicer.app = app
    app.add_servicer(echo_pb2_grpc.add_EchoServicer_to_server, servicer)
    try:
        asyncio.run_coroutine_threadsafe(app.start(), loop).result(WAIT)
        try:
            yield ServedEcho(app.target, servicer, exporter, stream, records)
        finally:
            asyncio.run_coroutine_threadsafe(app.stop(drain=0, grace=1), loop).result(WAIT)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
        loop.close()
        root.removeHandler(records)
