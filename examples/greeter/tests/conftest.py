"""Make the Greeter importable for its tests: generate ``greeter.v1`` if needed, add it to the path.

The generated modules go where ``tether proto`` puts them (``greeter/v1/``, gitignored), because
they are a subpackage of the hand-written ``greeter`` package. Generation happens when pytest
configures itself, before the test modules import ``greeter.v1`` at their top.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tether.codegen import compile_if_stale

EXAMPLE = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    compile_if_stale(EXAMPLE / "proto", EXAMPLE)
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))


def pytest_unconfigure(config: pytest.Config) -> None:
    if str(EXAMPLE) in sys.path:
        sys.path.remove(str(EXAMPLE))
