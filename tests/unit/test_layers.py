"""Layering rules of the package, checked on the source: the core knows nothing of gRPC."""

from __future__ import annotations

import ast
from pathlib import Path

import tether

PACKAGE = Path(tether.__file__).parent

#: Modules of the middleware core: they must not import grpc or google.protobuf.
CORE = ["context.py", "middleware.py"]
#: Governance, balancing and metrics: pure Python over the core, no grpc (protobuf descriptors
#: are fine).
GRPC_FREE = [
    *CORE,
    "access_log.py",
    "admission.py",
    "balancer.py",
    "breaker.py",
    "deadline.py",
    "fallback.py",
    "limiter.py",
    "metrics.py",
    "retry.py",
]
#: The only module that may touch grpc.aio's interceptor plumbing (the server half of the
#: adapter; the client half, channel.py with calls.py and subchannel.py, needs none of it).
ADAPTER = "interceptors.py"
PLUMBING = {"continuation", "handler_call_details", "client_call_details"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _identifiers(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.arg):
            found.add(node.arg)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
    return found


def test_core_does_not_import_grpc() -> None:
    """context.py and middleware.py import neither grpc nor protobuf."""
    offenders = {name: _imports(PACKAGE / name) & {"grpc", "google"} for name in CORE}
    assert offenders == {name: set() for name in CORE}


def test_governance_does_not_import_grpc() -> None:
    """Balancing, governance (breaker, limiter, admission, deadline, retry) and metrics: no grpc."""
    offenders = {name: _imports(PACKAGE / name) & {"grpc"} for name in GRPC_FREE}
    assert offenders == {name: set() for name in GRPC_FREE}


def test_only_the_adapter_touches_interceptor_plumbing() -> None:
    """No module but interceptors.py names continuation or handler/client call details."""
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(_identifiers(path) & PLUMBING)
        for path in PACKAGE.rglob("*.py")
        if path.name != ADAPTER and _identifiers(path) & PLUMBING
    }
    assert offenders == {}
    assert _identifiers(PACKAGE / ADAPTER) & PLUMBING, "the rule checks the names it should"


def test_every_module_opens_with_a_docstring() -> None:
    """Each module says in its first line what it is for."""
    missing = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if not ast.get_docstring(ast.parse(path.read_text()))
    ]
    assert missing == []
