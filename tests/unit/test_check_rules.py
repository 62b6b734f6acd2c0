"""The static rules of `tether check`: for each, code that must be flagged and code that must not,
suppression comments, and the examples docs/check.md shows."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from tether.check import RULES, check_source

DOCS = Path(__file__).resolve().parents[2] / "docs" / "check.md"


def codes(source: str, path: str = "service.py") -> list[str]:
    """The codes found in ``source`` (dedented), in order."""
    return [f.code for f in check_source(textwrap.dedent(source), path)]


def lines(source: str, code: str) -> list[int]:
    """The lines ``code`` is reported on."""
    return [f.line for f in check_source(textwrap.dedent(source)) if f.code == code]


# --------------------------------------------------------------------------- TTH000


def test_a_file_that_does_not_parse_is_a_finding() -> None:
    """A syntax error is TTH000 at its line; no other rule runs."""
    found = check_source("import tether\n\ndef broken(:\n    pass\n")
    assert [(f.code, f.line) for f in found] == [("TTH000", 3)]


@pytest.mark.parametrize(
    "source",
    [
        b'\xef\xbb\xbfgreeting = "h\xc3\xa9llo"; print(greeting)\n',
        b'# -*- coding: latin-1 -*-\ngreeting = "h\xe9llo"; print(greeting)\n',
        '\ufeffgreeting = "h\u00e9llo"; print(greeting)\n',
    ],
    ids=["utf8_bom", "latin1_declared", "bom_read_as_text"],
)
def test_a_byte_order_mark_and_a_coding_declaration_are_valid_python(source: str | bytes) -> None:
    """Bytes are decoded as Python decodes them: no TTH000, and the rules (with their columns
    and suppressions) run on the text."""
    found = check_source(source)
    line = 2 if b"coding" in (source if isinstance(source, bytes) else b"") else 1
    assert [(f.code, f.line, f.column) for f in found] == [("TTH003", line, 21)]
    if isinstance(source, bytes):
        silenced = source.replace(b")\n", b")  # tether: ignore[TTH003]\n")
        assert check_source(silenced) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (b'x = "\xe9"\n', "cannot parse: (unicode error) 'utf-8' codec can't decode"),
        (b"# -*- coding: klingon -*-\nx = 1\n", "cannot parse: unknown encoding: klingon"),
    ],
    ids=["undeclared_latin1", "unknown_encoding"],
)
def test_bytes_python_cannot_decode_are_a_finding(source: bytes, expected: str) -> None:
    """Text that is not in the file's encoding, or an unknown encoding, is TTH000."""
    found = check_source(source)
    assert [f.code for f in found] == ["TTH000"]
    assert found[0].message.startswith(expected)


# --------------------------------------------------------------------------- TTH001

RAW_GRPC_FLAGGED = {
    "insecure_channel": "import grpc\nchannel = grpc.insecure_channel('users:50051')\n",
    "secure_channel": "import grpc\nchannel = grpc.secure_channel('users:443', creds)\n",
    "server": "import grpc\nserver = grpc.server(pool)\n",
    "aio_insecure": "import grpc\nchannel = grpc.aio.insecure_channel('users:50051')\n",
    "aio_secure": "import grpc.aio\nchannel = grpc.aio.secure_channel('users:443', creds)\n",
    "aio_server": "import grpc\nserver = grpc.aio.server()\n",
    "from_grpc_import_aio": "from grpc import aio\nchannel = aio.insecure_channel('users:50051')\n",
    "module_alias": "import grpc.aio as g\nchannel = g.secure_channel('users:443', creds)\n",
    "function_alias": "from grpc.aio import server as make\nserver = make()\n",
    "inside_a_handler": """
        from grpc import aio

        class Orders:
            async def GetQuote(self, request, context):
                async with aio.insecure_channel("users:50051") as channel:
                    return await channel.unary_unary("/x")(request)
    """,
}


@pytest.mark.parametrize("source", RAW_GRPC_FLAGGED.values(), ids=RAW_GRPC_FLAGGED.keys())
def test_raw_grpc_channels_and_servers_are_flagged(source: str) -> None:
    """Every way of making a raw channel or server is TTH001."""
    assert codes(source) == ["TTH001"]


RAW_GRPC_CLEAN = {
    "dial": """
        import tether

        async def call(stub_class, request):
            async with tether.dial("users:50051") as channel:
                return await stub_class(channel).GetUser(request)
    """,
    "app_client": "users = app.client('users', users_pb2_grpc.UsersStub)\n",
    "app": "import tether\napp = tether.App()\n",
    "grpc_types": """
        import grpc

        def code_of(exc: grpc.aio.AioRpcError) -> grpc.StatusCode:
            return exc.code()
    """,
    "own_function": "def insecure_channel(target):\n    return target\n\ninsecure_channel('x')\n",
    "not_grpc": "channel = transport.aio.insecure_channel('x')\n",
}


@pytest.mark.parametrize("source", RAW_GRPC_CLEAN.values(), ids=RAW_GRPC_CLEAN.keys())
def test_tether_channels_and_grpc_types_are_not_flagged(source: str) -> None:
    """dial, app.client, App, grpc's types and look-alike names are not TTH001."""
    assert codes(source) == []


# --------------------------------------------------------------------------- TTH002

THREADS_FLAGGED = {
    "thread_target": "import threading\nthreading.Thread(target=work).start()",
    "thread_positional": "import threading\nthreading.Thread(None, work).start()",
    "from_import": "from threading import Thread\nThread(target=work, daemon=True).start()",
    "timer": "import threading\nthreading.Timer(1.0, work).start()",
    "run_in_executor": "await loop.run_in_executor(None, work, item)",
    "lambda": "import threading\nthreading.Thread(target=lambda: work(item)).start()",
    "pool_submit": "from concurrent.futures import ThreadPoolExecutor\n"
    "pool = ThreadPoolExecutor()\npool.submit(work, item)",
    "with_pool_map": "import concurrent.futures\n"
    "with concurrent.futures.ThreadPoolExecutor() as pool:\n    list(pool.map(work, items))",
    "executor_by_name": "self._executor.submit(work)",
    "executor_map_by_name": "list(executor.map(work, items))",
    "annotated": "from concurrent.futures import ThreadPoolExecutor\n"
    "def use(workers: ThreadPoolExecutor) -> None:\n    pass\nworkers.submit(work)",
}


@pytest.mark.parametrize("body", THREADS_FLAGGED.values(), ids=THREADS_FLAGGED.keys())
def test_work_sent_to_threads_from_a_call_without_its_context_is_flagged(body: str) -> None:
    """Threads, timers and executors fed a bare callable inside async def are TTH002."""
    source = "async def handle(item, items, loop, self, work):\n" + textwrap.indent(body, "    ")
    assert codes(source) == ["TTH002"]


def test_a_sync_rpc_method_counts_as_serving_a_call() -> None:
    """A sync servicer method (self, request, context) runs in the call's context: TTH002."""
    source = """
        import threading

        class Users:
            def GetUser(self, request, context):
                threading.Thread(target=audit, args=(request.id,)).start()
    """
    assert codes(source) == ["TTH002"]


THREADS_CLEAN = {
    "in_context": "import threading, tether\n"
    "threading.Thread(target=tether.in_context(work)).start()",
    "in_context_imported": "from tether import in_context\nfrom threading import Thread\n"
    "Thread(target=in_context(work)).start()",
    "in_context_from_tracing": "from tether.tracing import in_context\n"
    "await loop.run_in_executor(None, in_context(work), item)",
    "executor_wrapped": "import tether\nawait loop.run_in_executor(pool, tether.in_context(work))",
    "partial_of_wrapped": "import functools, tether\n"
    "self._executor.submit(functools.partial(tether.in_context(work), item))",
    "bound_first": "import tether\njob = tether.in_context(work)\nexecutor.submit(job, item)",
    "copy_context_run": "import contextvars\nctx = contextvars.copy_context()\n"
    "executor.submit(ctx.run, work, item)",
    "copy_context_lambda": "import contextvars\nctx = contextvars.copy_context()\n"
    "await loop.run_in_executor(None, lambda: ctx.run(work, item))",
    "copy_context_inline": "import contextvars\n"
    "await loop.run_in_executor(None, contextvars.copy_context().run, work)",
    "to_thread": "import asyncio, tether\n"
    "await asyncio.to_thread(work)\nawait tether.to_thread(work)",
    "process_pool": "from concurrent.futures import ProcessPoolExecutor\n"
    "procs = ProcessPoolExecutor()\nawait loop.run_in_executor(procs, work)\nprocs.submit(work)",
    "multiprocessing_map": "import multiprocessing\npool = multiprocessing.Pool()\n"
    "pool.map(work, items)",
    "not_an_executor": "form.submit(data)\nqueue.submit(job)\nresults.map(str, items)",
    "thread_without_target": "import threading\nWorker = threading.Thread()",
}


@pytest.mark.parametrize("body", THREADS_CLEAN.values(), ids=THREADS_CLEAN.keys())
def test_work_carrying_its_context_is_not_flagged(body: str) -> None:
    """in_context, copy_context().run, to_thread, process pools and non-executors: no TTH002."""
    source = "async def handle(item, items, loop, self, work, pool):\n" + textwrap.indent(
        body, "    "
    )
    assert codes(source) == []


def test_threads_started_by_lifecycle_hooks_are_not_flagged() -> None:
    """An async lifecycle hook (decorated, or passed to the registration) runs at start-up or
    shutdown, not in a call: no TTH002; an async function under another decorator still serves
    calls."""
    source = """
        import threading
        from concurrent.futures import ThreadPoolExecutor

        import tether

        app = tether.App()
        refresher = ThreadPoolExecutor(1)

        @app.before_start
        async def start_refresher(app):
            threading.Thread(target=refresh_forever, daemon=True).start()
            refresher.submit(refresh_forever)

        @app.after_stop
        async def flush(app):
            await app.loop.run_in_executor(None, flush_files)

        @app.after_start
        async def start_poller(app):
            async def poll():
                refresher.submit(poll_once)

            app.poller = asyncio.create_task(poll())

        async def warm(app):
            refresher.submit(load_cache)

        class Service:
            def __init__(self, app):
                app.before_stop(self.drain)
                app.after_start(warm)

            async def drain(self, app):
                threading.Thread(target=drain_queue).start()

        @router.get("/refresh")
        async def refresh(request):
            refresher.submit(refresh_forever)
    """
    route = textwrap.dedent(source).splitlines().index("async def refresh(request):") + 1
    assert [(f.code, f.line) for f in check_source(textwrap.dedent(source))] == [
        ("TTH002", route + 1)
    ]


def test_threads_started_outside_calls_are_not_flagged() -> None:
    """A thread started by start-up code (a sync function, a script's async main) serves the
    process: no TTH002."""
    source = """
        import asyncio
        import threading

        def serve_metrics(server):
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            return thread

        async def main(server):
            threading.Thread(target=server.serve_forever, daemon=True).start()

        if __name__ == "__main__":
            asyncio.run(main(None))
    """
    assert codes(source) == []


# --------------------------------------------------------------------------- TTH003


def test_print_in_service_code_is_flagged() -> None:
    """print() in a handler or at import is TTH003."""
    source = """
        print("loading")

        class Users:
            async def GetUser(self, request, context):
                print("got", request.id)
    """
    assert lines(source, "TTH003") == [2, 6]


def test_print_in_a_scripts_entry_point_is_not_flagged() -> None:
    """print() under the main guard, in functions it calls, and in __main__.py is output."""
    script = """
        import asyncio
        import sys

        async def main() -> None:
            print(f"{1000:8.0f} calls/s")

        def report(total):
            print(total, file=sys.stderr)

        if __name__ == "__main__":
            print("bench")
            asyncio.run(main())
            report(3)
    """
    assert codes(script) == []
    assert codes("def main():\n    print('edge: bad config')\n", "edge/__main__.py") == []


def test_a_print_of_the_modules_own_is_not_the_builtin() -> None:
    """A module defining print() itself is not TTH003."""
    assert codes("def print(*args):\n    pass\n\nprint('x')\n") == []


# --------------------------------------------------------------------------- TTH004

STDLIB_FLAGGED = {
    "module_function": "import logging\nlogging.info('started')\n",
    "module_alias": "import logging as lg\nlg.warning('slow')\n",
    "named_logger": "import logging\nlog = logging.getLogger(__name__)\n\n"
    "def f():\n    log.info('x')\n",
    "getLogger_imported": "from logging import getLogger\nlogger = getLogger()\n"
    "logger.error('x')\n",
    "chained": "import logging\nlogging.getLogger(__name__).info('x')\n",
    "attribute_logger": "import logging\n\nclass S:\n    def __init__(self):\n"
    "        self._log = logging.getLogger('s')\n\n"
    "    def f(self):\n        self._log.debug('x')\n",
}


@pytest.mark.parametrize("source", STDLIB_FLAGGED.values(), ids=STDLIB_FLAGGED.keys())
def test_stdlib_logging_is_flagged(source: str) -> None:
    """Writing through stdlib logging is TTH004, once per logger."""
    assert codes(source) == ["TTH004"]


STDLIB_CLEAN = {
    "quieting_a_library": "import logging\n"
    "logging.getLogger('urllib3').setLevel(logging.WARNING)\n",
    "logger_kept_for_levels": "import logging\nquiet = logging.getLogger('grpc')\n"
    "quiet.setLevel(logging.ERROR)\n",
    "tether_logger": "import tether\nlog = tether.get_logger('users')\nlog.info('x', user_id=1)\n",
    "structlog": "import structlog\nlog = structlog.get_logger()\nlog.info('x')\n",
}


@pytest.mark.parametrize("source", STDLIB_CLEAN.values(), ids=STDLIB_CLEAN.keys())
def test_tether_loggers_and_tuning_stdlib_levels_are_not_flagged(source: str) -> None:
    """tether and structlog loggers, and setting a library logger's level: no TTH004."""
    assert codes(source) == []


# --------------------------------------------------------------------------- TTH005

REQUEST_FLAGGED = {
    "f_string": 'log.info(f"got {request}")',
    "f_string_repr": 'log.warning(f"bad request {request!r}")',
    "str_format": 'log.info("got {}".format(request))',
    "percent": 'log.info("got %s" % request)',
    "percent_tuple": 'log.info("got %s from %s" % (request, peer))',
    "lazy_args": 'log.info("got %s", request)',
    "concatenation": 'log.error("got " + str(request))',
    "whole_as_a_field": 'log.info("got", request=request)',
    "bound_logger": 'log.bind(peer=peer).info(f"{request}")',
    "exception": 'log.exception(f"failed on {request}")',
    "message_to_json": "log.info(json_format.MessageToJson(request))",
    "message_to_dict": 'log.info("got", body=MessageToDict(request))',
    "message_to_string": 'log.info("got %s", text_format.MessageToString(request))',
    "serialized": 'log.debug("got", raw=request.SerializeToString())',
    "serialized_in_f_string": 'log.info(f"got {request.SerializeToString()!r}")',
}


@pytest.mark.parametrize("line", REQUEST_FLAGGED.values(), ids=REQUEST_FLAGGED.keys())
def test_a_whole_request_in_a_log_line_is_flagged(line: str) -> None:
    """Formatting a handler's request into a log call is TTH005."""
    source = f"""
        import tether
        from google.protobuf import json_format, text_format
        from google.protobuf.json_format import MessageToDict
        log = tether.get_logger("users")

        class Users:
            async def GetUser(self, request, context):
                peer = context.peer()
                {line}
    """
    assert codes(source) == ["TTH005"]


def test_the_request_parameter_is_found_by_position_and_by_name() -> None:
    """A handler's request under another name, and a `request` parameter anywhere: TTH005."""
    source = """
        import structlog
        logger = structlog.get_logger()

        class Users:
            async def GetUser(self, req, context):
                logger.info(f"get {req}")

        async def quote(request):
            logger.info(f"quote {request}")
    """
    assert lines(source, "TTH005") == [7, 10]


REQUEST_CLEAN = {
    "fields": 'log.info("got", user_id=request.id, sku=request.sku)',
    "field_in_f_string": 'log.info(f"got user {request.id}")',
    "other_name": 'log.info(f"reply {reply}")',
    "not_a_logger": 'seen.append(f"{request}")',
    "exc_info": 'log.error("failed", exc_info=request)',
    "field_as_json": "log.info(json_format.MessageToJson(request.address))",
    "size_of_serialized": 'log.info("got", size=len(request.SerializeToString()))',
}


@pytest.mark.parametrize("line", REQUEST_CLEAN.values(), ids=REQUEST_CLEAN.keys())
def test_request_fields_and_other_values_are_not_flagged(line: str) -> None:
    """Fields as key=value, other variables and non-logger calls: no TTH005."""
    source = f"""
        import tether
        from google.protobuf import json_format
        log = tether.get_logger("users")
        seen = []

        class Users:
            async def GetUser(self, request, context):
                reply = request.id
                {line}
    """
    assert codes(source) == []


def test_a_helper_parameter_is_not_a_request() -> None:
    """A helper method's first parameter is not a handler's request: no TTH005."""
    source = """
        import tether
        log = tether.get_logger("users")

        class Users:
            async def _load(self, item):
                log.info(f"loaded {item}")
    """
    assert codes(source) == []


# --------------------------------------------------------------------------- TTH006

BLOCKING_FLAGGED = {
    "time_sleep": "import time\n    time.sleep(0.1)",
    "sleep_imported": "from time import sleep\n    sleep(1)",
    "requests": "import requests\n    requests.get(url, headers=headers, timeout=1)",
    "urlopen": "import urllib.request\n    urllib.request.urlopen(url)",
    "urlopen_imported": "from urllib.request import urlopen\n    urlopen(url)",
    "subprocess": "import subprocess\n    subprocess.run(['ls'], check=True)",
    "os_system": "import os\n    os.system('ls')",
    "create_connection": "import socket\n    socket.create_connection(('db', 5432))",
    "socket_recv": "import socket\n    sock = socket.socket()\n    sock.recv(1024)",
    "input": "\n    input('continue? ')",
    "requests_session": "import requests\n    session = requests.Session()\n    session.get(url)",
    "requests_session_at_once": "import requests\n    requests.Session().post(url, json={})",
    "httpx_client": "import httpx\n    client = httpx.Client()\n    client.get(url)",
    "httpx_client_with": "import httpx\n    with httpx.Client() as c:\n        c.stream('GET', u)",
    "httpx_client_module": "import httpx; client = httpx.Client()\n    client.request('GET', url)",
    "gethostbyname": "import socket\n    socket.gethostbyname('db')",
    "getaddrinfo_imported": "from socket import getaddrinfo\n    getaddrinfo('db', 5432)",
}


@pytest.mark.parametrize("body", BLOCKING_FLAGGED.values(), ids=BLOCKING_FLAGGED.keys())
def test_blocking_calls_inside_async_def_are_flagged(body: str) -> None:
    """Sleeping, blocking HTTP, subprocesses, sockets and input() in async def are TTH006."""
    imports, _, call = body.partition("\n")
    source = f"{imports}\n\nasync def handle(url, headers):\n{call}\n"
    assert "TTH006" in codes(source)


BLOCKING_CLEAN = {
    "sync_function": "import time\n\ndef wait():\n    time.sleep(1)\n",
    "nested_sync_to_thread": """
        import time, tether

        async def handle():
            def slow():
                time.sleep(1)
            await tether.to_thread(slow)
    """,
    "lambda_to_thread": "import asyncio, time\n\nasync def f():\n"
    "    await asyncio.to_thread(lambda: time.sleep(1))\n",
    "asyncio_sleep": "import asyncio, time\n\nasync def f():\n"
    "    await asyncio.sleep(1)\n    time.monotonic()\n",
    "async_subprocess": "import asyncio\n\nasync def f():\n"
    "    await asyncio.create_subprocess_exec('ls')\n",
    "nonblocking_socket": "import socket\n\nasync def f(loop, addr):\n"
    "    sock = socket.socket()\n    sock.setblocking(False)\n"
    "    try:\n        sock.connect(addr)\n    except BlockingIOError:\n"
    "        await loop.sock_connect(sock, addr)\n",
    "async_client": """
        import httpx, tether.http

        async def f(url):
            async with httpx.AsyncClient(event_hooks=tether.http.async_httpx_event_hooks()) as c:
                await c.get(url)
            client = httpx.AsyncClient(event_hooks=tether.http.async_httpx_event_hooks())
            await client.post(url)
    """,
    "sync_client_in_sync_code": """
        import httpx, tether.http

        def fetch(url):
            with httpx.Client(event_hooks=tether.http.httpx_event_hooks()) as c:
                return c.get(url)
    """,
    "name_bound_to_both_kinds": """
        import httpx, tether.http

        def sync_version(url):
            client = httpx.Client(event_hooks=tether.http.httpx_event_hooks())
            return client.get(url)

        async def async_version(url):
            client = httpx.AsyncClient(event_hooks=tether.http.async_httpx_event_hooks())
            return await client.get(url)
    """,
    "loop_getaddrinfo": "import asyncio\n\nasync def f():\n"
    "    await asyncio.get_running_loop().getaddrinfo('db', 5432)\n",
    "a_dict_get": "async def f(cache, key):\n    return cache.get(key)\n",
}


@pytest.mark.parametrize("source", BLOCKING_CLEAN.values(), ids=BLOCKING_CLEAN.keys())
def test_blocking_calls_off_the_event_loop_are_not_flagged(source: str) -> None:
    """Sync functions, work sent to a thread, and async equivalents: no TTH006."""
    assert codes(source) == []


# --------------------------------------------------------------------------- TTH007

HTTP_FLAGGED = {
    "async_client": "import httpx\nclient = httpx.AsyncClient(timeout=5)\n",
    "client": "import httpx\nclient = httpx.Client()\n",
    "wrong_kind": "import httpx, tether.http\n"
    "client = httpx.AsyncClient(event_hooks=tether.http.httpx_event_hooks())\n",
    "other_hooks": "import httpx\nclient = httpx.AsyncClient(event_hooks={'request': [log_it]})\n",
    "requests_session": "import requests\nsession = requests.Session()\nsession.get(url)\n",
    "requests_session_at_once": "import requests\nrequests.session().request('GET', url)\n",
    "aiohttp": "import aiohttp\nsession = aiohttp.ClientSession()\n"
    "async def f():\n    async with session.post(url, json={}) as reply:\n        pass\n",
    "aiohttp_with": "import aiohttp\nasync def f():\n"
    "    async with aiohttp.ClientSession() as s:\n        await s.get(url)\n",
    "aiohttp_attribute": "import aiohttp\nclass C:\n    def __init__(self):\n"
    "        self._http = aiohttp.ClientSession()\n"
    "    async def f(self):\n        await self._http.get(url, headers={'a': 'b'})\n",
    "aiohttp_annotated": "import aiohttp\n"
    "async def f(session: aiohttp.ClientSession):\n    await session.get(url)\n",
    "aiohttp_headers_at_creation": "import aiohttp, tether.http\n"
    "session = aiohttp.ClientSession(headers=tether.http.inject_headers())\n",
    "inject_elsewhere_clears_nothing": "import requests, tether.http\n"
    "session = requests.Session()\nsession.get(url, headers=tether.http.inject_headers())\n"
    "session.post(url)\n",
    "httpx_function": "import httpx\nreply = httpx.get(url)\n",
    "requests_function": "import requests\n"
    "reply = requests.post(url, json=body, headers={'a': 'b'})\n",
}


@pytest.mark.parametrize("source", HTTP_FLAGGED.values(), ids=HTTP_FLAGGED.keys())
def test_http_clients_without_trace_propagation_are_flagged(source: str) -> None:
    """httpx clients without tether.http's hooks, sessions and bare calls: TTH007."""
    assert codes(source) == ["TTH007"]


HTTP_CLEAN = {
    "async_hooks": "import httpx, tether.http\n"
    "client = httpx.AsyncClient(event_hooks=tether.http.async_httpx_event_hooks())\n",
    "sync_hooks": "import httpx\nfrom tether.http import httpx_event_hooks\n"
    "client = httpx.Client(base_url=u, event_hooks=httpx_event_hooks())\n",
    "hooks_bound_first": "import httpx\nfrom tether.http import async_httpx_event_hooks\n"
    "hooks = async_httpx_event_hooks()\nhooks['response'] = [check]\n"
    "client = httpx.AsyncClient(event_hooks=hooks)\n",
    "hooks_merged": "import httpx\nfrom tether import http\n"
    "client = httpx.AsyncClient(event_hooks={'request': "
    "[*http.async_httpx_event_hooks()['request'], log_it]})\n",
    "own_hooks_on_inject": "import httpx\nfrom tether.http import inject_headers\n"
    "async def add(request):\n    request.headers.update(inject_headers())\n"
    "client = httpx.AsyncClient(event_hooks={'request': [add]})\n",
    "session_with_inject": "import requests\nfrom tether.http import inject_headers\n"
    "session = requests.Session()\nsession.get(url, headers=inject_headers())\n",
    "session_headers_bound_first": "import requests\nfrom tether.http import inject_headers\n"
    "session = requests.Session()\nheaders = inject_headers({'accept': 'json'})\n"
    "session.post(url, headers=headers)\n",
    "session_kwargs": "import requests\nsession = requests.Session()\n"
    "session.get(url, **options)\n",
    "session_made_only": "import aiohttp\nsession = aiohttp.ClientSession()\n",
    "aiohttp_trace_config": "import aiohttp, tether.http\n"
    "async def add(session, ctx, params):\n"
    "    params.headers.update(tether.http.inject_headers())\n"
    "trace = aiohttp.TraceConfig()\ntrace.on_request_start.append(add)\n"
    "session = aiohttp.ClientSession(trace_configs=[trace])\n"
    "async def f():\n    await session.get(url)\n",
    "not_a_session": "cache = {}\ncache.get(url)\n",
    "function_with_inject": "import httpx, tether.http\n"
    "reply = httpx.get(url, headers=tether.http.inject_headers({'accept': 'json'}))\n",
}


@pytest.mark.parametrize("source", HTTP_CLEAN.values(), ids=HTTP_CLEAN.keys())
def test_http_clients_sending_the_trace_are_not_flagged(source: str) -> None:
    """Clients built with tether.http's hooks, or whose requests use inject_headers: no TTH007."""
    assert codes(source) == []


# --------------------------------------------------------------------------- TTH008

SWALLOWED_FLAGGED = {
    "exception_pass": "try:\n    x = await dep(request)\nexcept Exception:\n    pass",
    "bare_except": "try:\n    x = await dep(request)\nexcept:\n    ...",
    "aio_rpc_error": "try:\n    x = await dep(request)\nexcept grpc.aio.AioRpcError:\n    pass",
    "tuple": "try:\n    x = await dep(request)\nexcept (ValueError, grpc.RpcError):\n    pass",
    "remote_error": "try:\n    x = await dep(request)\nexcept tether.RemoteError:\n    pass",
    "suppress": "with contextlib.suppress(Exception):\n    await dep(request)",
}


@pytest.mark.parametrize("body", SWALLOWED_FLAGGED.values(), ids=SWALLOWED_FLAGGED.keys())
def test_a_handler_swallowing_failures_is_flagged(body: str) -> None:
    """`except Exception: pass` (and the like) in an RPC method is TTH008."""
    source = (
        "import contextlib, grpc, tether\n\nclass Orders:\n"
        "    async def GetQuote(self, request, context):\n"
        + textwrap.indent(body, "        ")
        + "\n        return None\n"
    )
    assert codes(source) == ["TTH008"]


SWALLOWED_CLEAN = {
    "reraised": "try:\n    x = await dep(request)\nexcept Exception as exc:\n"
    "    raise tether.Internal('dependency failed') from exc",
    "logged": "try:\n    x = await dep(request)\nexcept grpc.aio.AioRpcError as exc:\n"
    "    log.warning('dep failed', code=exc.code().name)",
    "narrow": "try:\n    x = cache[request.id]\nexcept KeyError:\n    pass",
    "narrow_suppress": "with contextlib.suppress(KeyError):\n    del cache[request.id]",
}


@pytest.mark.parametrize("body", SWALLOWED_CLEAN.values(), ids=SWALLOWED_CLEAN.keys())
def test_handled_or_narrow_exceptions_are_not_flagged(body: str) -> None:
    """Re-raised, logged or narrow exceptions in an RPC method: no TTH008."""
    source = (
        "import contextlib, grpc, tether\n\nclass Orders:\n"
        "    async def GetQuote(self, request, context):\n"
        + textwrap.indent(body, "        ")
        + "\n        return None\n"
    )
    assert codes(source) == []


def test_best_effort_cleanup_outside_handlers_is_not_flagged() -> None:
    """`except Exception: pass` in a helper or a hook is not a handler's answer: no TTH008."""
    source = """
        async def close_quietly(channel):
            try:
                await channel.close()
            except Exception:
                pass
    """
    assert codes(source) == []


# --------------------------------------------------------------------------- TTH009


def test_setting_the_status_on_the_servicer_context_is_flagged() -> None:
    """context.set_code() in an RPC method (whatever the parameter's name) is TTH009."""
    source = """
        import grpc

        class Users:
            async def GetUser(self, request, context):
                context.set_code(grpc.StatusCode.NOT_FOUND)
                return None

            def Delete(self, request, ctx):
                ctx.set_code(grpc.StatusCode.PERMISSION_DENIED)
    """
    assert lines(source, "TTH009") == [6, 10]


def test_raising_or_aborting_and_other_set_code_calls_are_not_flagged() -> None:
    """Raising a tether error, context.abort(), and set_code on other objects: no TTH009."""
    source = """
        import grpc, tether

        class Users:
            async def GetUser(self, request, context):
                if not request.id:
                    raise tether.InvalidArgument("id is required")
                if request.id == "gone":
                    await context.abort(grpc.StatusCode.NOT_FOUND, "gone")
                reply.set_code(3)
                return reply
    """
    assert codes(source) == []


# --------------------------------------------------------------------------- suppression


def test_a_comment_naming_the_code_silences_the_finding_on_its_line() -> None:
    """`# tether: ignore[TTH003]` silences TTH003 on that line only."""
    source = 'print("a")  # tether: ignore[TTH003]\nprint("b")\n'
    assert [(f.code, f.line) for f in check_source(source)] == [("TTH003", 2)]


def test_a_comment_names_several_codes_and_sits_beside_noqa() -> None:
    """Several codes, any case, after a noqa comment on the same line, all apply."""
    source = textwrap.dedent("""
        import logging, tether
        log = tether.get_logger("x")

        class Users:
            async def GetUser(self, request, context):  # noqa: N802 # tether: ignore[tth005]
                logging.info(f"{request}")  # tether: ignore[TTH004, TTH005]
                log.info(f"{request}")  # noqa: G004  # tether: ignore[TTH005]
    """)
    assert check_source(source) == []


def test_a_comment_naming_another_code_silences_nothing() -> None:
    """A suppression of one code leaves another code's finding on the line."""
    assert codes('print("a")  # tether: ignore[TTH004]\n') == ["TTH003"]


@pytest.mark.parametrize(
    ("comment", "expected"),
    [
        ("# tether: ignore", "without codes"),
        ("# tether: ignore[]", "names no code"),
        ("# tether: ignore[TTH999]", "unknown code TTH999"),
    ],
)
def test_a_blanket_empty_or_unknown_suppression_is_a_finding(comment: str, expected: str) -> None:
    """A suppression naming no known code silences nothing and is TTH100 itself."""
    found = check_source(f'print("a")  {comment}\n')
    assert [f.code for f in found] == ["TTH003", "TTH100"]
    assert expected in found[1].message
    assert found[1].column == 13


def test_a_suppression_inside_a_string_is_not_a_comment() -> None:
    """Text that looks like a suppression inside a string is neither one nor TTH100."""
    assert codes('print("# tether: ignore")\n') == ["TTH003"]


# --------------------------------------------------------------------------- reporting


def test_findings_carry_one_based_character_columns() -> None:
    """Columns are 1-based and count characters, not UTF-8 bytes."""
    found = check_source('greeting = "héllo"; print(greeting)\n')
    assert (found[0].line, found[0].column) == (1, 21)


def test_only_the_codes_asked_for_are_reported() -> None:
    """`codes=` limits the findings to those codes."""
    source = 'import logging\nlogging.info("x")\nprint("y")\n'
    assert [f.code for f in check_source(source, codes=frozenset({"TTH003"}))] == ["TTH003"]


def test_every_rule_has_a_unique_code_and_a_docs_section() -> None:
    """Codes are unique, and docs/check.md has a section for each."""
    all_codes = [rule.code for rule in RULES]
    assert len(all_codes) == len(set(all_codes))
    text = DOCS.read_text()
    missing = [code for code in all_codes if f"### {code}" not in text]
    assert missing == []


def _doc_examples() -> list[tuple[str, str]]:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    examples = []
    for block in blocks:
        first = block.splitlines()[0]
        mark = re.match(r"# (flagged: (TTH\d{3})|clean)$", first)
        if mark:
            examples.append((mark.group(2) or "", block))
    return examples


DOC_EXAMPLES = _doc_examples()


@pytest.mark.parametrize(
    ("expected", "source"),
    DOC_EXAMPLES,
    ids=[f"{i}-{c or 'clean'}" for i, (c, _) in enumerate(DOC_EXAMPLES)],
)
def test_the_docs_examples_are_true(expected: str, source: str) -> None:
    """Each `# flagged: CODE` example in docs/check.md is flagged with that code only, and each
    `# clean` example is not flagged."""
    assert codes(source) == ([expected] if expected else [])


def test_the_docs_show_a_flagged_and_a_clean_example_of_every_static_rule() -> None:
    """docs/check.md has both examples for each static rule."""
    flagged = {code for code, _ in DOC_EXAMPLES if code}
    static = {r.code for r in RULES if r.code < "TTH100" and r.code != "TTH000"}
    assert static <= flagged
    assert sum(1 for code, _ in DOC_EXAMPLES if not code) >= len(static)
