"""Session set-up for tether's own tests: compile the test protos once and make them importable.

The protos are compiled when pytest configures itself, before test modules are imported, so
tests can import the generated ``echo.v1`` modules at the top. ``PYTHONPATH`` carries the same
directories to the service processes some tests start.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.codegen import compile_protos

TESTS = Path(__file__).parent
PROTOS = TESTS / "protos"

_generated: Path | None = None
_old_pythonpath: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _generated, _old_pythonpath
    _generated = Path(tempfile.mkdtemp(prefix="tether-test-protos-"))
    compile_protos(sorted(PROTOS.rglob("*.proto")), _generated, proto_path=PROTOS)
    sys.path.insert(0, str(_generated))
    _old_pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_generated), str(TESTS), _old_pythonpath) if p
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    if _generated is None:
        return
    sys.path.remove(str(_generated))
    if _old_pythonpath is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = _old_pythonpath
    shutil.rmtree(_generated, ignore_errors=True)


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A 127.0.0.1 port that something else is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]
