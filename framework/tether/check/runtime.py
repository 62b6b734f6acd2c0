"""The runtime check (``tether check --runtime MODULE:ATTR``): build the App, check what it knows.

The App is imported and built as ``tether run`` builds it (the current directory first on
``sys.path``, ``tether.yaml`` or ``$TETHER_CONFIG`` loaded), but never started: nothing binds,
registers or calls out, and no lifecycle hook runs. Then:

- TTH201: the configuration loads (every refused value is a finding);
- TTH202: every RPC of every service a servicer is added for has a handler, a method the
  servicer's class defines rather than the generated base's (which answers UNIMPLEMENTED);
- TTH203: every fallback matches its method, as ``App.start()`` would check it;
- TTH204: every method pattern in the configuration (``client.idempotent_methods``,
  ``client.services.<name>.methods``, ``server.admission.methods``) names a service and method
  of a proto the app imports, and admission names a service the app serves;
- TTH205: every dependency under ``client.services`` is one the source calls
  (``app.client("users")``, ``tether.dial("discovery:///users")``, ...; see
  :mod:`~tether.check.dependencies`), unless the source names one by a value it does not spell
  out.

A dependency under ``client.services`` is a registry name (``users``), which no proto names:
its key is checked against the source (TTH205), its ``methods`` patterns and the fallbacks
declared for its methods against the protos (TTH204, TTH203).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from google.protobuf import descriptor_pool

from tether.app import App
from tether.check.dependencies import dialed_in_paths
from tether.check.rules import Finding
from tether.check.source import display_path
from tether.errors import ConfigError

__all__ = ["check_app"]

_FALLBACK_FIELD = re.compile(r"^fallback\[(.+)\]$")


class _Location:
    """Where a runtime finding is reported: a file (relative) and a line."""

    def __init__(self, path: str, line: int = 1) -> None:
        self.path = path
        self.line = line

    def finding(self, code: str, message: str) -> Finding:
        return Finding(self.path, self.line, 1, code, message)


def _module_location(module: ModuleType | None, name: str) -> _Location:
    file = getattr(module, "__file__", None)
    return _Location(display_path(Path(file)) if file else name)


def _source_location(obj: object, default: _Location) -> _Location:
    """The file and line defining ``obj`` (a class or function), else ``default``."""
    try:
        file = inspect.getsourcefile(obj)  # type: ignore[arg-type]
        _, line = inspect.getsourcelines(obj)  # type: ignore[arg-type]
    except (TypeError, OSError):
        return default
    if file is None:
        return default
    return _Location(display_path(Path(file)), max(line, 1))


def _config_file() -> Path | None:
    """The file ``load_config()`` reads here, if any."""
    named = os.environ.get("TETHER_CONFIG")
    path = Path(named) if named else Path("tether.yaml")
    return path if path.is_file() else None


def _line_of(file: Path | None, *needles: str) -> _Location | None:
    """The first line of ``file`` holding the last of ``needles``, after the others in order."""
    if file is None:
        return None
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    start = 0
    for needle in needles:
        for number in range(start, len(lines)):
            if needle in lines[number]:
                start = number
                break
        else:
            return _Location(display_path(file))
    return _Location(display_path(file), start + 1)


def _config_findings(error: ConfigError, default: _Location) -> list[Finding]:
    file = Path(error.source) if error.source and Path(error.source).is_file() else None
    findings = []
    for problem in error.problems:
        keys = [f"{part}:" for part in problem.field.split(".") if part]
        where = _line_of(file, *keys) or default
        findings.append(where.finding("TTH201", f"configuration refused: {problem}"))
    return findings


class _Recorder:
    """Stands in for a server while a servicer registers, to learn the services it adds."""

    def __init__(self) -> None:
        self.services: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        for handler in handlers:
            name = getattr(handler, "service_name", None)
            if callable(name):
                self.services.append(name())

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.services.append(service)


def _implemented(servicer: object, method: str) -> bool:
    """Whether ``servicer`` has a handler of its own for ``method``: the generated base class
    (in a ``*_pb2_grpc`` module) only answers UNIMPLEMENTED."""
    if method in getattr(servicer, "__dict__", {}):
        return True
    for klass in type(servicer).__mro__:
        if method in vars(klass):
            return not klass.__module__.endswith("_pb2_grpc")
    return False


def _check_servicers(app: App, default: _Location, served: list[str]) -> list[Finding]:
    pool = descriptor_pool.Default()
    findings = []
    # The App keeps what add_servicer() was given; the server is built only at start().
    for add_to_server, servicer in app._servicers:
        cls = type(servicer)
        where = _source_location(cls, default)
        recorder = _Recorder()
        try:
            add_to_server(servicer, recorder)
        except AttributeError as exc:
            missing = exc.name or str(exc)
            findings.append(
                where.finding(
                    "TTH202", f"{cls.__name__} has no method {missing}; it cannot be served"
                )
            )
            continue
        for service in dict.fromkeys(recorder.services):
            served.append(service)
            try:
                described = pool.FindServiceByName(service)
            except KeyError:
                continue  # not a protobuf service: nothing to compare with
            findings.extend(
                where.finding(
                    "TTH202",
                    f"{cls.__name__} does not implement {service}/{method.name}; "
                    "callers get UNIMPLEMENTED",
                )
                for method in described.methods
                if not _implemented(servicer, method.name)
            )
    return findings


def _check_fallbacks(app: App, default: _Location) -> list[Finding]:
    try:
        app.fallbacks.check()
    except ConfigError as exc:
        declared = getattr(app.fallbacks, "_declared", {})
        findings = []
        for problem in exc.problems:
            match = _FALLBACK_FIELD.match(problem.field)
            entry = declared.get(match.group(1)) if match else None
            fn = getattr(entry, "fn", None)
            where = _source_location(fn, default) if fn is not None else default
            findings.append(where.finding("TTH203", str(problem)))
        return findings
    return []


def _patterns(app: App) -> list[tuple[str, str, bool]]:
    """``(field, pattern, must be served here)`` of every method pattern in the configuration."""
    client = app.config.client
    found = [("client.idempotent_methods", p, False) for p in client.idempotent_methods]
    for name, policy in client.services.items():
        found += [(f"client.services.{name}.methods", p, False) for p in policy.methods]
    found += [("server.admission.methods", p, True) for p in app.config.server.admission.methods]
    return found


def _check_methods(app: App, served: Sequence[str], default: _Location) -> list[Finding]:
    pool = descriptor_pool.Default()
    file = _config_file()
    findings = []
    for field, pattern, must_serve in _patterns(app):
        service, _, method = pattern.partition("/")
        problem = None
        try:
            described = pool.FindServiceByName(service)
        except KeyError:
            problem = f"no proto the app imports defines service {service}"
        else:
            if method != "*" and method not in described.methods_by_name:
                problem = f"service {service} has no method {method}"
            elif must_serve and service not in served:
                problem = f"this app does not serve {service}"
        if problem is not None:
            where = _line_of(file, pattern) or default
            findings.append(where.finding("TTH204", f"{field} names {pattern!r}: {problem}"))
    return findings


def _check_dependencies(app: App, called: set[str], default: _Location) -> list[Finding]:
    """TTH205: each ``client.services`` key against the dependency names the source calls."""
    file = _config_file()
    shown = ", ".join(sorted(called)) or "none"
    return [
        (_line_of(file, "client:", "services:", f"{name}:") or default).finding(
            "TTH205",
            f"client.services.{name} configures a dependency the source never calls "
            f"(it calls: {shown}); a typo here applies to nothing",
        )
        for name in app.config.client.services
        if name not in called
    ]


def _package_path(module: ModuleType | None) -> Path | None:
    """The directory of the top-level package holding ``module`` (or its file, for a
    top-level module)."""
    if module is None:
        return None
    top = sys.modules.get(module.__name__.partition(".")[0])
    file = getattr(top, "__file__", None)
    if not file:
        return None
    path = Path(file)
    return path.parent if path.name == "__init__.py" else path


def _load(spec: str) -> tuple[ModuleType | None, object, list[Finding]]:
    """Import ``MODULE:ATTR`` and build the app; a refused configuration is a finding."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected MODULE:ATTRIBUTE (e.g. users.service:create_app), got {spec!r}")
    here = str(Path.cwd())
    if here not in sys.path:
        sys.path.insert(0, here)
    default = _Location(module_name)
    try:
        module = importlib.import_module(module_name)
    except ConfigError as exc:  # the module builds its app when imported
        return None, None, _config_findings(exc, default)
    default = _module_location(module, module_name)
    if not hasattr(module, attr):
        raise LookupError(f"{module_name} has no attribute {attr!r}")
    target = getattr(module, attr)
    try:
        app = target() if callable(target) and not hasattr(target, "run") else target
    except ConfigError as exc:
        return module, None, _config_findings(exc, default)
    return module, app, []


def check_app(spec: str, *, sources: Sequence[Path] = ()) -> list[Finding]:
    """Build the App ``spec`` names and check it (see the module).

    Args:
        spec: ``MODULE:ATTRIBUTE`` naming an App, or a function returning one, as for
            ``tether run``.
        sources: files and directories whose code calls the app's dependencies (the paths
            checked statically), read for TTH205 with the app's package.

    Returns:
        The findings, ordered; paths are the servicer's, fallback's or config file's when
        known, else the module's file.

    Raises:
        ValueError: ``spec`` is not ``MODULE:ATTRIBUTE``.
        ImportError: the module cannot be imported.
        LookupError: the module has no such attribute.
        TypeError: the attribute is not an App and does not return one.
    """
    module, app, findings = _load(spec)
    if findings:
        return sorted(findings)
    if not isinstance(app, App):
        raise TypeError(f"{spec} is not a tether App and did not return one")
    default = _module_location(module, spec.partition(":")[0])
    served: list[str] = []
    try:
        findings = [
            *_check_servicers(app, default, served),
            *_check_fallbacks(app, default),
            *_check_methods(app, served, default),
        ]
        if app.config.client.services:
            package = _package_path(module)
            dialed = dialed_in_paths([*sources, *([package] if package is not None else [])])
            if not dialed.unknown:
                findings += _check_dependencies(app, dialed.names, default)
    finally:
        asyncio.run(app.tracing.shutdown())  # the app never started: only tracing holds a thread
    return sorted(set(findings))
