"""What a module binds, read before the rules run: imports, and what its names are made from.

The rules ask questions such as "is this ``grpc.aio.insecure_channel``, however it was
imported?" or "was ``pool`` made by ``ThreadPoolExecutor(...)``?". The answers are
deliberately simple: names are tracked per module, not per scope (``name`` or ``owner.attr``
such as ``self._pool``), which is enough for the patterns the rules look for and keeps one file
to two walks of its tree.
"""

from __future__ import annotations

import ast

__all__ = [
    "EMITTERS",
    "LIFECYCLE_HOOKS",
    "LOGGER_FACTORIES",
    "ModuleFacts",
    "is_main_guard",
    "key_of",
]

#: Names reachable under two spellings, reduced to one for the rules.
_ALIASES = {
    "tether.tracing.in_context": "tether.in_context",
    "tether.tracing.to_thread": "tether.to_thread",
    "tether.log.get_logger": "tether.get_logger",
    "tether.errors.RemoteError": "tether.RemoteError",
    "tether.errors.StatusError": "tether.StatusError",
    "tether.errors.TetherError": "tether.TetherError",
    "concurrent.futures.thread.ThreadPoolExecutor": "concurrent.futures.ThreadPoolExecutor",
    "concurrent.futures.process.ProcessPoolExecutor": "concurrent.futures.ProcessPoolExecutor",
    "structlog.stdlib.get_logger": "structlog.get_logger",
    "structlog.getLogger": "structlog.get_logger",
}

#: Logger factories: a name made by one of these is a logger.
LOGGER_FACTORIES = frozenset({"tether.get_logger", "structlog.get_logger", "logging.getLogger"})
#: Methods that write a log line (stdlib, structlog and tether loggers alike).
EMITTERS = frozenset(
    {"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "msg", "log"}
)
#: Methods of a structlog logger that return another logger.
_BINDERS = frozenset({"bind", "new", "unbind", "try_unbind"})
#: ``App`` methods registering a lifecycle hook: the hooks run at start-up or shutdown, not in a
#: call, though tether requires them to be ``async def``.
LIFECYCLE_HOOKS = frozenset({"before_start", "after_start", "before_stop", "after_stop"})
#: Names that are loggers by convention when nothing in the module says what they are.
_LOGGER_NAMES = frozenset({"log", "logger"})


def key_of(node: ast.expr) -> str | None:
    """The name a binding is tracked under: ``name``, or ``owner.attr`` (``self._pool``)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


def is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":``"""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    test = node.test
    return (
        isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and len(test.comparators) == 1
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value == "__main__"
    )


class ModuleFacts:
    """What one module imports and binds.

    Args:
        tree: the parsed module.

    Attributes:
        imports: local name -> qualified name (``aio`` -> ``grpc.aio``).
        made_from: binding key -> qualified names of the calls (or annotations) that made it.
        main_guard_names: names used inside ``if __name__ == "__main__":`` at module level
            (the functions a script runs as its entry point).
        shadowed: module-level names defined by the module itself (a ``def print``).
        stdlib_loggers_writing: ids of ``logging.getLogger(...)`` calls whose logger is used
            to write lines in this module.
        injects_headers: the module calls ``tether.http.inject_headers``.
        nonblocking: binding keys of sockets the module calls ``setblocking()`` or
            ``settimeout()`` on (made non-blocking for the event loop to drive).
        traced_sessions: binding keys of sessions made with ``trace_configs=`` (aiohttp's
            per-request hooks).
        lifecycle_hooks: names of functions passed to ``app.before_start(fn)`` and the other
            hook registrations (a method passed as ``self.fn`` by its name, ``fn``).
    """

    def __init__(self, tree: ast.Module) -> None:
        self.imports: dict[str, str] = {}
        self.made_from: dict[str, set[str]] = {}
        self.main_guard_names: set[str] = set()
        self.shadowed: set[str] = set()
        self.stdlib_loggers_writing: set[int] = set()
        self.injects_headers = False
        self.nonblocking: set[str] = set()
        self.lifecycle_hooks: set[str] = set()
        self.traced_sessions: set[str] = set()
        self._collect(tree)

    # ----------------------------------------------------------------- names

    def qualify(self, node: ast.expr) -> str | None:
        """The qualified name of ``node`` when it starts from an import, else None."""
        if isinstance(node, ast.Name):
            found = self.imports.get(node.id)
        elif isinstance(node, ast.Attribute):
            base = self.qualify(node.value)
            found = None if base is None else f"{base}.{node.attr}"
        else:
            return None
        return None if found is None else _ALIASES.get(found, found)

    def made_by(self, node: ast.expr) -> set[str]:
        """The qualified names of what made ``node`` (a call's callee, or an annotation)."""
        if isinstance(node, ast.Call):
            callee = self.qualify(node.func)
            return {callee} if callee else set()
        key = key_of(node)
        return self.made_from.get(key, set()) if key is not None else set()

    def is_logger(self, node: ast.expr, depth: int = 0) -> bool:
        """Whether ``node`` is a logger: made by a logger factory, bound from one, the
        ``logging`` module, or a name that is one by convention (``log``, ``self._logger``)."""
        if depth > 4:
            return False
        if isinstance(node, ast.Call):
            func = node.func
            if self.qualify(func) in LOGGER_FACTORIES:
                return True
            return (
                isinstance(func, ast.Attribute)
                and func.attr in _BINDERS
                and self.is_logger(func.value, depth + 1)
            )
        if self.qualify(node) == "logging":
            return True
        key = key_of(node)
        if key is None:
            return False
        made = self.made_from.get(key)
        if made:
            if made & LOGGER_FACTORIES:
                return True
            bound = [m[len("@bind:") :] for m in made if m.startswith("@bind:")]
            return any(self._key_is_logger(k, depth + 1) for k in bound)
        return key.rpartition(".")[2].lstrip("_").lower() in _LOGGER_NAMES

    def _key_is_logger(self, key: str, depth: int) -> bool:
        owner, dot, attr = key.partition(".")
        node: ast.expr = ast.Name(owner)
        if dot:
            node = ast.Attribute(node, attr)
        return self.is_logger(node, depth)

    # ----------------------------------------------------------------- collection

    def _collect(self, tree: ast.Module) -> None:
        bindings: list[tuple[str, ast.expr]] = []
        annotations: list[tuple[str, ast.expr]] = []
        emitting: set[str] = set()
        chained: list[ast.Call] = []
        injects: list[ast.expr] = []
        for stmt in tree.body:
            if isinstance(stmt, ast.If) and is_main_guard(stmt):
                for sub in stmt.body:
                    for node in ast.walk(sub):
                        if isinstance(node, ast.Name):
                            self.main_guard_names.add(node.id)
            elif isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                self.shadowed.add(stmt.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Attribute):
                    if func.attr in EMITTERS:
                        receiver = func.value
                        key = key_of(receiver)
                        if key is not None:
                            emitting.add(key)
                        elif isinstance(receiver, ast.Call):
                            chained.append(receiver)
                    elif func.attr == "inject_headers":
                        injects.append(func)
                    elif func.attr in ("setblocking", "settimeout"):
                        key = key_of(func.value)
                        if key is not None:
                            self.nonblocking.add(key)
                    elif func.attr in LIFECYCLE_HOOKS and len(node.args) == 1:
                        hook = node.args[0]
                        if isinstance(hook, ast.Name):
                            self.lifecycle_hooks.add(hook.id)
                        elif isinstance(hook, ast.Attribute):
                            self.lifecycle_hooks.add(hook.attr)
                elif isinstance(func, ast.Name) and func.id == "inject_headers":
                    injects.append(func)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    key = key_of(target)
                    if key is not None:
                        bindings.append((key, node.value))
            elif isinstance(node, ast.AnnAssign):
                key = key_of(node.target)
                if key is not None:
                    annotations.append((key, node.annotation))
                    if node.value is not None:
                        bindings.append((key, node.value))
            elif isinstance(node, ast.withitem):
                if node.optional_vars is not None:
                    key = key_of(node.optional_vars)
                    if key is not None:
                        bindings.append((key, node.context_expr))
            elif isinstance(node, ast.arg):
                if node.annotation is not None:
                    annotations.append((node.arg, node.annotation))
            elif isinstance(node, ast.NamedExpr):
                bindings.append((node.target.id, node.value))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        self.imports[alias.asname] = alias.name
                    else:
                        top = alias.name.partition(".")[0]
                        self.imports[top] = top
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    if alias.name != "*":
                        self.imports[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        self._resolve(bindings, annotations, emitting, chained)
        self.injects_headers = any(self.qualify(f) == "tether.http.inject_headers" for f in injects)

    def _resolve(
        self,
        bindings: list[tuple[str, ast.expr]],
        annotations: list[tuple[str, ast.expr]],
        emitting: set[str],
        chained: list[ast.Call],
    ) -> None:
        for key, value in bindings:
            if isinstance(value, ast.Await):
                value = value.value
            if not isinstance(value, ast.Call):
                continue
            callee = self.qualify(value.func)
            if callee is not None:
                self.made_from.setdefault(key, set()).add(callee)
                if any(kw.arg == "trace_configs" for kw in value.keywords):
                    self.traced_sessions.add(key)
                if callee == "logging.getLogger" and key in emitting:
                    self.stdlib_loggers_writing.add(id(value))
            elif isinstance(value.func, ast.Attribute) and value.func.attr in _BINDERS:
                receiver = key_of(value.func.value)
                if receiver is not None:
                    self.made_from.setdefault(key, set()).add(f"@bind:{receiver}")
        for key, annotation in annotations:
            name = self.qualify(annotation)
            if name is not None:
                self.made_from.setdefault(key, set()).add(name)
        for call in chained:
            if self.qualify(call.func) == "logging.getLogger":
                self.stdlib_loggers_writing.add(id(call))
