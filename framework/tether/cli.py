"""The ``tether`` command: run a service, show its effective config, compile protos."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

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
    from tether.codegen import ProtoCompileError, compile_protos

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
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether", description="Governed gRPC microservices: run, configure, generate."
    )
    parser.add_argument("--version", action="version", version=f"tether {version('tether')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
            "Compile .proto files with grpcio-tools into *_pb2.py, *_pb2.pyi and *_pb2_grpc.py. "
            "Output mirrors the directories under --proto-path, with __init__.py at each level: "
            "generate into the directory that holds your service package (proto package "
            "'greeter.v1' lands in <out>/greeter/v1/), or a second 'greeter' package will "
            "shadow yours."
        ),
    )
    proto.add_argument("sources", nargs="*", help=".proto files (default: all under --proto-path)")
    proto.add_argument("--proto-path", default="proto", help="import root (default: proto)")
    proto.add_argument("--out", default=".", help="output directory (default: .)")
    proto.set_defaults(func=_cmd_proto)
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
