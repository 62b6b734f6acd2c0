"""Generate the gRPC code from proto/ before the tests import it (when it is missing or stale).

`make proto` does the same; this keeps a bare `pytest` working after editing a .proto file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tether.codegen import compile_if_stale

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    compile_if_stale(ROOT / "proto", ROOT)
