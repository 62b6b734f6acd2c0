"""Each example's own test suite, run as its project would run it: in its directory, in a
process of its own (the examples are separate projects whose packages would shadow each other
in one interpreter), with this checkout's tether."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROJECTS = sorted(p.name for p in EXAMPLES.iterdir() if (p / "tests").is_dir())

pytestmark = pytest.mark.slow


def test_every_example_is_found() -> None:
    assert PROJECTS == ["edge", "greeter", "inventory", "orders", "users"]


@pytest.mark.parametrize("project", PROJECTS)
def test_the_examples_own_tests_pass(project: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("TETHER_")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=EXAMPLES / project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{project}:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    assert " passed" in done.stdout


#: The services made with the template keep its strict typing.
TYPED = ["inventory", "orders", "users"]


@pytest.mark.parametrize("project", TYPED)
def test_the_template_made_examples_pass_mypy_strict(project: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy"],
        cwd=EXAMPLES / project,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{project}:\n{done.stdout[-4000:]}"
