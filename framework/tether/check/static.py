"""The static rules: one walk over a module's tree, each rule a method reading the nodes it needs.

Every rule aims at no false positives on idiomatic tether code: a rule that cannot tell from
the source whether something is wrong stays quiet. What each rule finds, why, and the fix:
``docs/check.md``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from tether.check.facts import EMITTERS, LIFECYCLE_HOOKS, ModuleFacts, is_main_guard, key_of

__all__ = ["check_tree"]

#: TTH001: what makes a raw channel or server.
_RAW_GRPC = {
    "grpc.insecure_channel": "channel",
    "grpc.secure_channel": "channel",
    "grpc.aio.insecure_channel": "channel",
    "grpc.aio.secure_channel": "channel",
    "grpc.server": "server",
    "grpc.aio.server": "server",
}

#: TTH002: executors whose workers are threads, and those whose workers are processes (a
#: process cannot share the context, and a wrapped function cannot be pickled: not flagged).
_THREAD_POOLS = frozenset({"concurrent.futures.ThreadPoolExecutor"})
_PROCESS_POOLS = frozenset({"concurrent.futures.ProcessPoolExecutor", "multiprocessing.Pool"})

#: TTH004: stdlib logging's module-level writers.
_STDLIB_WRITERS = frozenset(f"logging.{name}" for name in EMITTERS)

#: TTH006: blocking calls, and what to use instead inside ``async def``.
_THREAD_OR_ASYNC = "use an async client or tether.to_thread()"
_SUBPROCESS = "use asyncio.create_subprocess_exec()"
_BLOCKING = {
    "time.sleep": "use asyncio.sleep()",
    "urllib.request.urlopen": _THREAD_OR_ASYNC,
    "socket.create_connection": "use asyncio.open_connection()",
    "subprocess.run": _SUBPROCESS,
    "subprocess.call": _SUBPROCESS,
    "subprocess.check_call": _SUBPROCESS,
    "subprocess.check_output": _SUBPROCESS,
    "os.system": _SUBPROCESS,
    **{
        f"socket.{resolver}": "use asyncio.get_running_loop().getaddrinfo()"
        for resolver in (
            "getaddrinfo",
            "gethostbyname",
            "gethostbyname_ex",
            "gethostbyaddr",
            "getnameinfo",
            "getfqdn",
        )
    },
    **{
        f"requests.{verb}": _THREAD_OR_ASYNC
        for verb in ("get", "post", "put", "patch", "delete", "head", "options", "request")
    },
}
#: Blocking methods of a socket made by ``socket.socket`` or ``socket.create_connection``.
_SOCKET_MAKERS = frozenset({"socket.socket", "socket.create_connection"})
_SOCKET_METHODS = frozenset(
    {"accept", "connect", "makefile", "recv", "recv_into", "recvfrom", "send", "sendall"}
)

#: TTH006: synchronous HTTP clients (their requests block the event loop inside async def), the
#: asynchronous ones (a name bound to both is left alone), and the methods that send a request.
_SYNC_HTTP_CLIENTS = frozenset({"requests.Session", "requests.session", "httpx.Client"})
_ASYNC_HTTP_CLIENTS = frozenset({"httpx.AsyncClient", "aiohttp.ClientSession"})
_REQUEST_METHODS = frozenset(
    {"get", "post", "put", "patch", "delete", "head", "options", "request"}
)
_SENDING_METHODS = _REQUEST_METHODS | {"send", "stream"}

#: TTH007: HTTP clients, and the tether.http hooks each needs.
_HTTPX_CLIENTS = {
    "httpx.Client": "tether.http.httpx_event_hooks",
    "httpx.AsyncClient": "tether.http.async_httpx_event_hooks",
}
_HOOKS = frozenset(_HTTPX_CLIENTS.values())
_SESSIONS = frozenset({"requests.Session", "requests.session", "aiohttp.ClientSession"})
_HTTP_FUNCTIONS = frozenset(
    f"{module}.{verb}"
    for module in ("httpx", "requests")
    for verb in ("get", "post", "put", "patch", "delete", "head", "options", "request", "stream")
)
_INJECT = "tether.http.inject_headers"

#: TTH008: exception types that catch a dependency's failure (or everything).
_BROAD_BUILTINS = frozenset({"Exception", "BaseException"})
_BROAD_QUALIFIED = frozenset(
    {
        "grpc.RpcError",
        "grpc.aio.AioRpcError",
        "tether.RemoteError",
        "tether.StatusError",
        "tether.TetherError",
    }
)

#: TTH005: what renders a whole protobuf message (as JSON, a dict, text or bytes).
_SERIALIZERS = frozenset(
    {
        "google.protobuf.json_format.MessageToJson",
        "google.protobuf.json_format.MessageToDict",
        "google.protobuf.text_format.MessageToString",
        "google.protobuf.text_format.MessageToBytes",
    }
)
_SERIALIZE_METHODS = frozenset({"SerializeToString", "SerializePartialToString"})

_SHOWN = 40  # characters of an expression a message quotes


@dataclass(frozen=True, slots=True)
class _Function:
    """What the rules need to know about the function being walked."""

    is_async: bool
    servicer: bool  # an ``async def`` RPC method of a servicer class
    in_call: bool  # this function or one around it serves calls (async def, or a sync RPC method)
    context: str | None  # the servicer context parameter's name
    request_names: frozenset[str]  # request parameters in scope (this function's and outer)
    params: frozenset[str]
    entry: bool  # part of a script's entry point: print() is its output
    lifecycle: bool  # a lifecycle hook or a function nested in one (a task it starts)


def _shown(node: ast.expr) -> str:
    text = ast.unparse(node)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _whole(node: ast.expr, names: frozenset[str], facts: ModuleFacts) -> str | None:
    """The request name ``node`` formats whole (``f"{request}"``, ``"%s" % request``,
    ``str(request)``, ``MessageToJson(request)``, ``request.SerializeToString()``, ``request``
    itself), or None; ``request.id`` is a field, not the whole."""
    if isinstance(node, ast.Name):
        return node.id if node.id in names else None
    parts: list[ast.expr] = []
    if isinstance(node, ast.JoinedStr):
        parts = [v.value for v in node.values if isinstance(v, ast.FormattedValue)]
    elif isinstance(node, ast.FormattedValue):
        parts = [node.value]
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        parts = [node.left, node.right]
    elif isinstance(node, ast.Tuple | ast.List):
        parts = list(node.elts)
    elif isinstance(node, ast.Dict):
        parts = [v for v in node.values if v is not None]
    elif isinstance(node, ast.Call):
        func = node.func
        if (isinstance(func, ast.Name) and func.id in ("str", "repr", "format")) or (
            isinstance(func, ast.Attribute) and func.attr == "format"
        ):
            parts = [*node.args, *(k.value for k in node.keywords)]
        elif isinstance(func, ast.Attribute) and func.attr in _SERIALIZE_METHODS:
            parts = [func.value]
        elif node.args and facts.qualify(func) in _SERIALIZERS:
            parts = [node.args[0]]
    for part in parts:
        found = _whole(part, names, facts)
        if found is not None:
            return found
    return None


def _is_lifecycle_decorator(node: ast.expr) -> bool:
    """``@app.before_start`` and the other hook registrations (``@self.app.after_stop``)."""
    return isinstance(node, ast.Attribute) and node.attr in LIFECYCLE_HOOKS


def _argument(call: ast.Call, index: int | None, keyword: str | None = None) -> ast.expr | None:
    """The argument at position ``index`` or named ``keyword``, if the call passes it."""
    if keyword is not None:
        for kw in call.keywords:
            if kw.arg == keyword:
                return kw.value
    if index is None or len(call.args) <= index:
        return None
    if any(isinstance(arg, ast.Starred) for arg in call.args[: index + 1]):
        return None  # *args: the position is unknown
    return call.args[index]


class _Checker(ast.NodeVisitor):
    """Walks one module and collects ``(line, column offset, code, message)``."""

    def __init__(self, facts: ModuleFacts, *, script: bool) -> None:
        self.facts = facts
        self.found: list[tuple[int, int, str, str]] = []
        self._functions: list[_Function] = []
        self._containers: list[str] = []  # "class" / "function", innermost last
        self._script = script
        self._guard = 0  # inside ``if __name__ == "__main__":``

    def _add(self, node: ast.expr | ast.stmt | ast.excepthandler, code: str, message: str) -> None:
        self.found.append((node.lineno, node.col_offset, code, message))

    # ----------------------------------------------------------------- scopes

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._containers.append("class")
        self.generic_visit(node)
        self._containers.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._function(node, is_async=False)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._function(node, is_async=True)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._enter(node.args, is_async=False, handler=False, entry=False)
        self.generic_visit(node)
        self._functions.pop()
        self._containers.pop()

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef, *, is_async: bool) -> None:
        positional = [a.arg for a in (*node.args.posonlyargs, *node.args.args)]
        rpc_shaped = (
            bool(self._containers)
            and self._containers[-1] == "class"
            and node.name[:1].isupper()
            and len(positional) >= 2
            and positional[0] == "self"
        )
        # A sync RPC method (self, request, context) runs on a worker thread in the call's
        # context; any other sync method of that shape is too unsure to treat as a handler.
        handler = rpc_shaped and (is_async or len(positional) == 3)
        entry = not self._containers and node.name in self.facts.main_guard_names
        # A lifecycle hook (@app.before_start, app.after_stop(fn)) runs at start-up or
        # shutdown: it serves no call, though tether requires it to be async def.
        hook = node.name in self.facts.lifecycle_hooks or any(
            _is_lifecycle_decorator(d) for d in node.decorator_list
        )
        args = node.args
        for outside in (*node.decorator_list, *args.defaults, *args.kw_defaults):
            if outside is not None:
                self.visit(outside)
        self._enter(node.args, is_async=is_async, handler=handler, entry=entry, hook=hook)
        for stmt in node.body:
            self.visit(stmt)
        self._functions.pop()
        self._containers.pop()

    def _enter(
        self, args: ast.arguments, *, is_async: bool, handler: bool, entry: bool, hook: bool = False
    ) -> None:
        positional = [a.arg for a in (*args.posonlyargs, *args.args)]
        params = frozenset(
            [*positional, *(a.arg for a in args.kwonlyargs)]
            + [a.arg for a in (args.vararg, args.kwarg) if a is not None]
        )
        outer = self._functions[-1] if self._functions else None
        lifecycle = hook or (outer is not None and outer.lifecycle)
        names = set(outer.request_names) if outer is not None else set()
        if handler:
            names.add(positional[1])
        if "request" in params:
            names.add("request")
        self._functions.append(
            _Function(
                is_async=is_async,
                servicer=handler and is_async,
                # A script's entry point (an async main()) serves no call, nor does a lifecycle
                # hook or what it nests (a background task it starts).
                in_call=(is_async or handler or (outer is not None and outer.in_call))
                and not entry
                and not lifecycle,
                context=positional[2] if handler and len(positional) >= 3 else None,
                request_names=frozenset(names),
                params=params,
                entry=entry or (outer is not None and outer.entry),
                lifecycle=lifecycle,
            )
        )
        self._containers.append("function")

    def visit_If(self, node: ast.If) -> None:
        if not self._containers and is_main_guard(node):
            self.visit(node.test)
            self._guard += 1
            for stmt in node.body:
                self.visit(stmt)
            self._guard -= 1
            for stmt in node.orelse:
                self.visit(stmt)
            return
        self.generic_visit(node)

    # ----------------------------------------------------------------- calls

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        callee = self.facts.qualify(func)
        if callee is not None:
            self._check_qualified(node, callee)
        if isinstance(func, ast.Attribute):
            self._check_method(node, func)
        elif isinstance(func, ast.Name) and func.id not in self.facts.imports:
            if func.id == "print" and "print" not in self.facts.shadowed:
                self._check_print(node)
            elif func.id == "input" and "input" not in self.facts.shadowed and self._in_async():
                self._add(
                    node,
                    "TTH006",
                    "input() blocks the event loop in async def; use tether.to_thread(input)",
                )
        if id(node) in self.facts.stdlib_loggers_writing:
            self._add(node, "TTH004", _STDLIB_MESSAGE)
        self.generic_visit(node)

    def _check_qualified(self, node: ast.Call, callee: str) -> None:
        kind = _RAW_GRPC.get(callee)
        if kind == "channel":
            self._add(
                node,
                "TTH001",
                f"{callee}() bypasses tether's client chain; use tether.dial() or app.client()",
            )
        elif kind == "server":
            self._add(
                node,
                "TTH001",
                f"{callee}() bypasses tether's server chain; serve with tether.App",
            )
        elif callee == "threading.Thread":
            self._check_handoff(node, _argument(node, 1, "target"), "threading.Thread")
        elif callee == "threading.Timer":
            self._check_handoff(node, _argument(node, 1, "function"), "threading.Timer")
        elif callee in _STDLIB_WRITERS:
            self._add(node, "TTH004", _STDLIB_MESSAGE)
        elif callee in _BLOCKING and self._in_async():
            self._add(
                node,
                "TTH006",
                f"{callee}() blocks the event loop in async def; {_BLOCKING[callee]}",
            )
        if callee in _HTTPX_CLIENTS:
            self._check_httpx(node, callee)
        elif callee in _SESSIONS:
            headers = _argument(node, None, "headers")
            if headers is not None and self._calls(headers, {_INJECT}):
                self._add(
                    node,
                    "TTH007",
                    f"{callee}(headers=...) sends the trace of the moment the session is made; "
                    "pass headers=tether.http.inject_headers() with each request",
                )
        elif callee in _HTTP_FUNCTIONS and not self._injects(node):
            self._add(
                node,
                "TTH007",
                f"{callee}() sends no trace context; pass headers=tether.http.inject_headers()",
            )

    def _check_method(self, node: ast.Call, func: ast.Attribute) -> None:
        attr = func.attr
        if attr == "run_in_executor":
            executor = _argument(node, 0)
            if executor is None or not (self.facts.made_by(executor) & _PROCESS_POOLS):
                self._check_handoff(node, _argument(node, 1), "run_in_executor")
        elif attr in ("submit", "map"):
            if self._is_thread_pool(func.value, attr):
                self._check_handoff(node, _argument(node, 0, "fn"), f"executor.{attr}")
        elif attr == "set_code":
            self._check_set_code(node, func)
        elif (
            attr in _SOCKET_METHODS
            and self._in_async()
            and self.facts.made_by(func.value) & _SOCKET_MAKERS
            and key_of(func.value) not in self.facts.nonblocking
        ):
            self._add(
                node,
                "TTH006",
                f"socket.{attr}() blocks the event loop in async def; "
                "use asyncio.open_connection()",
            )
        if attr in _SENDING_METHODS:
            self._check_request(node, func)
        if attr in EMITTERS:
            self._check_log(node, func)

    # ----------------------------------------------------------------- the rules

    def _check_handoff(self, node: ast.Call, fn: ast.expr | None, what: str) -> None:
        """TTH002: a callable handed to a thread from code serving a call must carry a copy of
        the context. Threads started elsewhere (start-up, sync helpers) serve the process."""
        if fn is None or not self._in_call() or self._copies_context(fn):
            return
        self._add(
            node,
            "TTH002",
            f"{what} runs `{_shown(fn)}` without the call's context; "
            "wrap it in tether.in_context() or use tether.to_thread()",
        )

    def _copies_context(self, fn: ast.expr) -> bool:
        facts = self.facts
        if isinstance(fn, ast.Call):
            callee = facts.qualify(fn.func)
            if callee == "tether.in_context":
                return True
            if callee == "functools.partial" and fn.args:
                return self._copies_context(fn.args[0])
            return False
        if isinstance(fn, ast.Attribute) and fn.attr == "run":  # contextvars.copy_context().run
            return "contextvars.copy_context" in facts.made_by(fn.value)
        if isinstance(fn, ast.Lambda):  # lambda: ctx.run(work), lambda: in_context(work)()
            body = fn.body
            return isinstance(body, ast.Call) and self._copies_context(body.func)
        return "tether.in_context" in facts.made_by(fn)

    def _is_thread_pool(self, receiver: ast.expr, attr: str) -> bool:
        made = self.facts.made_by(receiver)
        if made & _THREAD_POOLS:
            return True
        if made & _PROCESS_POOLS or isinstance(receiver, ast.Call):
            return False
        key = key_of(receiver)
        if key is None:
            return False
        name = key.rpartition(".")[2].lower()
        if name.endswith("executor"):
            return True
        # ``pool.map`` is multiprocessing's too; ``pool.submit`` is an executor's.
        return attr == "submit" and (name in ("pool", "_pool") or name.endswith("_pool"))

    def _check_print(self, node: ast.Call) -> None:
        """TTH003: print() outside a script's entry point."""
        if self._script or self._guard or (self._functions and self._functions[-1].entry):
            return
        self._add(
            node,
            "TTH003",
            "print() writes without the call's context; use tether.get_logger()",
        )

    def _check_log(self, node: ast.Call, func: ast.Attribute) -> None:
        """TTH005: a logger call formatting a request parameter whole."""
        if not self._functions:
            return
        names = self._functions[-1].request_names
        if not names or not self.facts.is_logger(func.value):
            return
        values = list(node.args[1:] if func.attr == "log" else node.args)
        values += [kw.value for kw in node.keywords if kw.arg not in ("exc_info", "stack_info")]
        for value in values:
            name = _whole(value, names, self.facts)
            if name is not None:
                self._add(
                    node,
                    "TTH005",
                    f"log line carries the whole request `{name}`; log its fields as key=value",
                )
                return

    def _check_httpx(self, node: ast.Call, callee: str) -> None:
        """TTH007: an httpx client must carry tether.http's hooks of its kind."""
        wanted = _HTTPX_CLIENTS[callee]
        hooks = _argument(node, None, "event_hooks")
        if hooks is not None:
            if self._calls(hooks, {wanted}):
                return
            other = self._calls(hooks, _HOOKS - {wanted})
            if not other and self.facts.injects_headers:
                return  # hooks of its own, built on inject_headers
            if other:
                self._add(
                    node,
                    "TTH007",
                    f"{callee}() is given the other kind of hooks; pass event_hooks={wanted}()",
                )
                return
        self._add(
            node,
            "TTH007",
            f"{callee}() sends no trace context; pass event_hooks={wanted}()",
        )

    def _check_request(self, node: ast.Call, func: ast.Attribute) -> None:
        """TTH006: a request through a synchronous HTTP client inside async def. TTH007: a
        request through a session (whose headers are fixed when it is made) that does not pass
        the current trace context."""
        made = self.facts.made_by(func.value)
        attr = func.attr
        if not made:
            return
        sync = made & _SYNC_HTTP_CLIENTS
        if sync and not made & _ASYNC_HTTP_CLIENTS and self._in_async():
            self._add(
                node,
                "TTH006",
                f"{min(sync)}.{attr}() blocks the event loop in async def; {_THREAD_OR_ASYNC}",
            )
        sessions = made & _SESSIONS
        if (
            attr in _REQUEST_METHODS
            and sessions
            and made <= _SESSIONS
            and not self._injects(node)
            and not (self.facts.injects_headers and self._traced(func.value))
        ):
            self._add(
                node,
                "TTH007",
                f"{min(sessions)}.{attr}() sends no trace context; "
                "pass headers=tether.http.inject_headers()",
            )

    def _injects(self, node: ast.Call) -> bool:
        """Whether a request call passes ``headers=`` built by inject_headers (or passes
        ``**kwargs``, which may hold them)."""
        headers = _argument(node, None, "headers")
        if headers is None:
            return any(kw.arg is None for kw in node.keywords)
        return self._calls(headers, {_INJECT})

    def _traced(self, session: ast.expr) -> bool:
        """Whether an aiohttp session is made with ``trace_configs=`` (hooks of its own that
        can add headers to each request)."""
        if isinstance(session, ast.Call):
            return any(kw.arg == "trace_configs" for kw in session.keywords)
        key = key_of(session)
        return key is not None and key in self.facts.traced_sessions

    def _calls(self, node: ast.expr, names: set[str] | frozenset[str]) -> bool:
        """Whether ``node`` calls (or names something made by) one of ``names``."""
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call) and self.facts.qualify(sub.func) in names:
                return True
            if isinstance(sub, ast.Name | ast.Attribute) and self.facts.made_by(sub) & names:
                return True
        return False

    def _check_set_code(self, node: ast.Call, func: ast.Attribute) -> None:
        """TTH009: ``context.set_code()`` in a handler, unseen by the server chain."""
        if not self._functions or not isinstance(func.value, ast.Name):
            return
        current = self._functions[-1]
        receiver = func.value.id
        if receiver == current.context or (
            current.is_async and receiver == "context" and "context" in current.params
        ):
            self._add(
                node,
                "TTH009",
                "context.set_code() is unseen by the server chain; raise a tether error "
                "such as tether.NotFound()",
            )

    # ----------------------------------------------------------------- TTH008

    def visit_Try(self, node: ast.Try) -> None:
        self._check_handlers(node.handlers)
        self.generic_visit(node)

    def visit_TryStar(self, node: ast.TryStar) -> None:
        self._check_handlers(node.handlers)
        self.generic_visit(node)

    def _check_handlers(self, handlers: list[ast.ExceptHandler]) -> None:
        if not self._in_servicer():
            return
        for handler in handlers:
            if self._broad(handler.type) and all(_is_nothing(s) for s in handler.body):
                caught = "everything" if handler.type is None else _shown(handler.type)
                self._add(handler, "TTH008", _swallowed(caught))

    def visit_With(self, node: ast.With) -> None:
        self._check_suppress(node.items)
        self.generic_visit(node)

    def visit_AsyncWith(self, node: ast.AsyncWith) -> None:
        self._check_suppress(node.items)
        self.generic_visit(node)

    def _check_suppress(self, items: list[ast.withitem]) -> None:
        if not self._in_servicer():
            return
        for item in items:
            expr = item.context_expr
            if (
                isinstance(expr, ast.Call)
                and self.facts.qualify(expr.func) == "contextlib.suppress"
                and any(self._broad(arg) for arg in expr.args)
            ):
                self._add(expr, "TTH008", _swallowed(_shown(expr)))

    def _broad(self, node: ast.expr | None) -> bool:
        if node is None:
            return True
        if isinstance(node, ast.Tuple):
            return any(self._broad(e) for e in node.elts)
        if isinstance(node, ast.Name) and node.id in _BROAD_BUILTINS:
            return node.id not in self.facts.imports and node.id not in self.facts.shadowed
        return self.facts.qualify(node) in _BROAD_QUALIFIED

    # ----------------------------------------------------------------- helpers

    def _in_async(self) -> bool:
        return bool(self._functions) and self._functions[-1].is_async

    def _in_call(self) -> bool:
        return bool(self._functions) and self._functions[-1].in_call

    def _in_servicer(self) -> bool:
        return bool(self._functions) and self._functions[-1].servicer


_STDLIB_MESSAGE = "stdlib logging writes without the call's context; use tether.get_logger()"


def _swallowed(caught: str) -> str:
    return f"handler swallows {caught}; let it raise, or declare a fallback"


def _is_nothing(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Pass) or (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and stmt.value.value is Ellipsis
    )


def check_tree(tree: ast.Module, *, script: bool = False) -> list[tuple[int, int, str, str]]:
    """Run every static rule over a parsed module.

    Args:
        tree: the module.
        script: the module is a script's entry point as a whole (``__main__.py``), so its
            print() calls are its output.

    Returns:
        ``(line, column offset, code, message)`` per finding, in walk order; the column offset
        is the AST's (0-based, in UTF-8 bytes).
    """
    checker = _Checker(ModuleFacts(tree), script=script)
    checker.visit(tree)
    return checker.found
