"""The dependencies a project's source calls, by name: what ``client.services`` keys must match.

``tether check --runtime`` compares the configured dependencies with these names (TTH205): a
key nothing calls, such as a typo (``usres`` for ``users``), configures nothing, silently. A
dependency is named by:

- ``app.client("users", ...)`` (or ``service="users"``);
- ``tether.dial("discovery:///users")``, and any ``"discovery:///users"`` string in the source
  (a target kept in a constant first);
- ``tether.dial(address, service="users")``;
- ``config.resolver("users")``, ``config.tls_for("users")`` and
  ``default_client_middleware(config, "users")``, which read the same overrides.

A module-level constant (``SERVICE = "users"``) counts as its value. A name the source does not
spell out (``app.client(name)``, ``f"discovery:///{name}"``, ``tether.dial(target)`` with a
target from elsewhere) could be any dependency: the result says so, and TTH205 is not checked.
``tether.dial(app.target)``, an App's own loopback address, names none.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tether.check.config import iter_python_files, load_settings

__all__ = ["Dialed", "dialed_in_paths", "dialed_in_source"]

_SCHEME = "discovery:///"
#: Bytes a module must hold to name a dependency at all: most modules are not parsed.
_MARKERS = (b"client(", b"dial(", b"discovery:///", b"resolver(", b"tls_for(", b"_middleware(")
#: Functions and methods taking a dependency's name first, or as ``service=``.
_NAME_FIRST = frozenset({"client", "resolver", "tls_for"})
_NAME_SECOND = frozenset({"default_client_middleware"})
_SERVICE_KEYWORD = frozenset({"dial", "client", "default_client_middleware"})


@dataclass(slots=True)
class Dialed:
    """Dependency names found in source.

    Attributes:
        names: the names spelled out.
        unknown: ``path:line`` of each call naming a dependency by a value the source does not
            spell out; when any, another dependency may be called too.
    """

    names: set[str] = field(default_factory=set)
    unknown: list[str] = field(default_factory=list)

    def update(self, other: Dialed) -> None:
        """Add what ``other`` found."""
        self.names |= other.names
        self.unknown += other.unknown


def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "text"`` assignments."""
    found: dict[str, str] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value = stmt.targets[0], stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target, value = stmt.target, stmt.value
        else:
            continue
        if (
            isinstance(target, ast.Name)
            and isinstance(value, ast.Constant)
            and isinstance(value.value, str)
        ):
            found[target.id] = value.value
    return found


class _Reader:
    def __init__(self, tree: ast.Module, path: str) -> None:
        self.constants = _constants(tree)
        self.path = path
        self.found = Dialed()

    def text(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return self.constants.get(node.id)
        return None

    def name(self, node: ast.expr, *, target: bool = False) -> None:
        """Record the dependency ``node`` names (a target when ``target``)."""
        value = self.text(node)
        if value is None:
            if target and isinstance(node, ast.Attribute) and node.attr == "target":
                return  # an App's own address
            self.found.unknown.append(f"{self.path}:{node.lineno}")
        elif not target:
            self.found.names.add(value)
        elif value.startswith(_SCHEME):
            self.found.names.add(value[len(_SCHEME) :])

    def call(self, node: ast.Call) -> None:
        func = node.func
        attr = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if attr is None:
            return
        service = next((kw.value for kw in node.keywords if kw.arg == "service"), None)
        if service is not None and attr in _SERVICE_KEYWORD:
            if not (isinstance(service, ast.Constant) and service.value is None):
                self.name(service)
        elif attr == "dial" and node.args:
            self.name(node.args[0], target=True)
        elif attr in _NAME_FIRST and node.args:
            self.name(node.args[0])
        elif attr in _NAME_SECOND and len(node.args) >= 2:
            self.name(node.args[1])

    def read(self, tree: ast.Module) -> Dialed:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                self.call(node)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value.startswith(_SCHEME) and len(node.value) > len(_SCHEME):
                    self.found.names.add(node.value[len(_SCHEME) :])
            elif isinstance(node, ast.JoinedStr) and node.values:
                first = node.values[0]
                if (
                    isinstance(first, ast.Constant)
                    and isinstance(first.value, str)
                    and first.value.startswith(_SCHEME)
                    and any(isinstance(v, ast.FormattedValue) for v in node.values)
                ):
                    self.found.unknown.append(f"{self.path}:{node.lineno}")
        return self.found


def dialed_in_source(source: str | bytes, path: str = "<source>") -> Dialed:
    """The dependency names one module's source calls (nothing if it does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return Dialed()
    return _Reader(tree, path).read(tree)


def dialed_in_paths(paths: Iterable[Path]) -> Dialed:
    """The dependency names the Python files under ``paths`` call, with each path's
    ``[tool.tether.check]`` exclusions (tests, generated code) applied; files that cannot be
    read are skipped (the static check reports them)."""
    found = Dialed()
    seen: set[Path] = set()
    for path in paths:
        for file in iter_python_files([path], load_settings(path)):
            key = file.absolute()
            if key in seen:
                continue
            seen.add(key)
            try:
                source = file.read_bytes()
            except OSError:
                continue
            if any(marker in source for marker in _MARKERS):
                found.update(dialed_in_source(source, str(file)))
    return found
