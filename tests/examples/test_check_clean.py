"""`tether check` finds nothing in the examples and in a project the template renders: the rules
hold tether's own idiomatic code to the contract without a false positive."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.check import check_paths
from tether.scaffold import new_service

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("project", ["users", "inventory", "orders", "edge", "greeter"])
def test_the_example_passes_the_static_check(project: str) -> None:
    """Every rule, the example's own settings: no finding."""
    assert [str(f) for f in check_paths([EXAMPLES / project])] == []


@pytest.mark.parametrize(
    "answers", [{}, {"docker": True, "kubernetes": True}], ids=["defaults", "all"]
)
def test_a_rendered_project_passes_the_static_check(
    tmp_path: Path, answers: dict[str, bool]
) -> None:
    """A project fresh from the template (its service, __main__, bench.py): no finding."""
    project = new_service(
        "demo-svc",
        destination=tmp_path / "demo-svc",
        defaults=True,
        data={"tether_requirement": "tether>=0.1,<0.2", **answers},
        quiet=True,
    )
    checked = {p.name for p in project.rglob("*.py") if "tests" not in p.parts}
    assert {"service.py", "__main__.py", "bench.py"} <= checked  # what the check reads
    assert [str(f) for f in check_paths([project])] == []
