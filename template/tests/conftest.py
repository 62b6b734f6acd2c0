"""Generate the gRPC code from proto/ before the tests import it (when it is missing or stale).

`make proto` does the same; this keeps a bare `pytest` working after editing a .proto file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tether.codegen import compile_protos

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "proto"


def pytest_configure(config: pytest.Config) -> None:
    sources = sorted(PROTOS.rglob("*.proto"))
    for source in sources:
        stem = source.relative_to(PROTOS).with_suffix("")
        outputs = [ROOT / f"{stem}{suffix}" for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
        if any(
            not out.exists() or out.stat().st_mtime_ns < source.stat().st_mtime_ns
            for out in outputs
        ):
            compile_protos(sources, ROOT, proto_path=PROTOS)
            return
