"""Make the Greeter importable for its tests: generate ``greeter.v1`` if needed, add it to the path.

The generated modules go where ``tether proto`` puts them (``greeter/v1/``, gitignored), because
they are a subpackage of the hand-written ``greeter`` package. Generation happens when pytest
configures itself, before the test modules import ``greeter.v1`` at their top.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tether.codegen import compile_protos

EXAMPLE = Path(__file__).resolve().parent.parent
PROTOS = EXAMPLE / "proto"


def _generate_if_stale() -> None:
    sources = sorted(PROTOS.rglob("*.proto"))
    for source in sources:
        stem = source.relative_to(PROTOS).with_suffix("")
        outputs = [
            EXAMPLE / f"{stem}{suffix}" for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
        ]
        newest_input = source.stat().st_mtime_ns
        if any(not out.exists() or out.stat().st_mtime_ns < newest_input for out in outputs):
            compile_protos(sources, EXAMPLE, proto_path=PROTOS)
            return


def pytest_configure(config: pytest.Config) -> None:
    _generate_if_stale()
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))


def pytest_unconfigure(config: pytest.Config) -> None:
    if str(EXAMPLE) in sys.path:
        sys.path.remove(str(EXAMPLE))
