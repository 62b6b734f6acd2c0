"""Compile ``.proto`` files into Python messages, stubs and type stubs with grpcio-tools.

Messages get ``*_pb2.py`` and protoc's own ``*_pb2.pyi``; services get ``*_pb2_grpc.py`` and,
when mypy-protobuf is installed, its ``*_pb2_grpc.pyi``: a typed servicer base class, a
``<Service>Stub`` for ``grpc.Channel`` and a ``<Service>AsyncStub`` for ``grpc.aio.Channel``
(which tether's channels are). Without mypy-protobuf the ``*_pb2_grpc.py`` modules are written
untyped, which changes nothing at run time; :func:`typed_grpc_stubs` says which case applies.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.resources
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "GRPC_STUB_PLUGIN",
    "PROTO_DIR",
    "ProtoCompileError",
    "compile_if_stale",
    "compile_protos",
    "typed_grpc_stubs",
]

#: tether's own protos (``tether/v1/options.proto``), shipped inside the package. Their
#: generated modules ship too (``tether.v1.options_pb2``), so user code never generates them.
PROTO_DIR = Path(__file__).resolve().parent / "protos"

#: Where tether's own protos live under :data:`PROTO_DIR`, as import paths.
_OWN_PACKAGE = ("tether", "v1")

#: mypy-protobuf's protoc plugin for the ``*_pb2_grpc.pyi`` type stubs (a console script).
GRPC_STUB_PLUGIN = "protoc-gen-mypy_grpc"

#: What every source becomes with and without the plugin.
_TYPED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
_UNTYPED_SUFFIXES = _TYPED_SUFFIXES[:3]


class ProtoCompileError(RuntimeError):
    """protoc refused the input; the message carries what it printed."""


def compile_protos(
    sources: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    proto_path: str | os.PathLike[str],
) -> list[Path]:
    """Generate ``*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py`` and ``*_pb2_grpc.pyi`` per source.

    The ``*_pb2_grpc.pyi`` stubs come from mypy-protobuf's plugin; when it is not installed
    (:func:`typed_grpc_stubs` is false) they are not written, and a stale one from an earlier
    run is removed so it cannot describe a changed service.

    Besides ``proto_path`` and the well-known types, :data:`PROTO_DIR` is on the include path,
    so a proto may ``import "tether/v1/options.proto";`` to declare fallbacks. Its modules are
    never generated into ``out_dir`` (a vendored copy of it among ``sources`` is skipped):
    generated code imports the ones tether ships, ``tether.v1.options_pb2``.

    Args:
        sources: ``.proto`` files, inside ``proto_path``.
        out_dir: where generated modules go (created if missing); package directories under it
            mirror the proto packages' directories under ``proto_path``.
        proto_path: the import root of the protos.

    Returns:
        The generated files.

    Raises:
        ProtoCompileError: protoc failed; its output is in the message.
    """
    from grpc_tools import protoc  # imported late: it is heavy and only this needs it

    out = Path(out_dir)
    root = Path(proto_path).resolve()
    building_tether = root == PROTO_DIR
    try:
        stems = [Path(s).resolve().relative_to(root).with_suffix("") for s in sources]
    except ValueError:
        raise ProtoCompileError(f"every source must be inside --proto-path {root}") from None
    if not building_tether:
        # A second tether.v1 package in the user's tree would shadow the shipped one.
        kept = [(s, stem) for s, stem in zip(sources, stems, strict=True) if not _is_own(stem)]
        sources = [s for s, _ in kept]
        stems = [stem for _, stem in kept]
    out.mkdir(parents=True, exist_ok=True)
    if not sources:
        return []
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    # The user's root comes first, so their own files win any clash of import paths.
    includes = [proto_path] if building_tether else [proto_path, PROTO_DIR]
    with _plugin_executable() as plugin:
        # `quiet`: the plugin would print "Writing mypy to ..." for every file.
        typed = [f"--plugin={GRPC_STUB_PLUGIN}={plugin}", f"--mypy_grpc_out=quiet:{out}"]
        args = [
            "grpc_tools.protoc",
            *(f"--proto_path={p}" for p in includes),
            f"--proto_path={well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *(typed if plugin is not None else []),
            *(str(s) for s in sources),
        ]
        if protoc.main(args) != 0:
            raise ProtoCompileError(f"protoc failed on {', '.join(map(str, sources))}")
    if plugin is None:
        for stem in stems:
            (out / f"{stem}_pb2_grpc.pyi").unlink(missing_ok=True)
    suffixes = _UNTYPED_SUFFIXES if plugin is None else _TYPED_SUFFIXES
    generated = [out / f"{stem}{suffix}" for stem in stems for suffix in suffixes]
    for directory in {p.parent for p in generated}:
        # Generated modules import each other by package path: make each level a package.
        d = directory
        while d != out and out in d.parents:
            (d / "__init__.py").touch(exist_ok=True)
            d = d.parent
    return sorted(generated)


def compile_if_stale(proto_path: str | os.PathLike[str], out: str | os.PathLike[str]) -> list[Path]:
    """Compile every ``.proto`` under ``proto_path`` into ``out`` unless all outputs are newer.

    For a test suite's ``conftest.py`` (``pytest_configure``), so a bare ``pytest`` works after
    a ``.proto`` was edited, without running ``tether proto`` first.

    Returns:
        The files written; empty when everything was up to date.

    Raises:
        ProtoCompileError: as :func:`compile_protos`.
    """
    root, target = Path(proto_path), Path(out)
    sources = sorted(root.rglob("*.proto"))
    # Without the plugin a missing *_pb2_grpc.pyi is what a fresh run leaves, not staleness.
    suffixes = _TYPED_SUFFIXES if typed_grpc_stubs() else _UNTYPED_SUFFIXES
    for source in sources:
        stem = source.relative_to(root).with_suffix("")
        if _is_own(stem):
            continue
        newest = source.stat().st_mtime_ns
        for suffix in suffixes:
            output = target / f"{stem}{suffix}"
            if not output.exists() or output.stat().st_mtime_ns < newest:
                return compile_protos(sources, target, proto_path=root)
    return []


def _is_own(stem: Path) -> bool:
    """Whether ``stem`` (an import path without suffix) is one of tether's own protos."""
    return stem.parts[: len(_OWN_PACKAGE)] == _OWN_PACKAGE


def typed_grpc_stubs() -> bool:
    """Whether mypy-protobuf's plugin is installed, so ``*_pb2_grpc.pyi`` stubs are written."""
    return _find_plugin() is not None


def _find_plugin() -> Path | importlib.metadata.EntryPoint | None:
    """mypy-protobuf's ``protoc-gen-mypy_grpc``, or None when it is not installed.

    Looked for, in order: beside the running interpreter (its virtualenv's ``bin``, found even
    when the venv is not activated); as the console-script entry point of a ``mypy-protobuf``
    this interpreter can import (installs without scripts, such as ``pip --target``); on PATH.
    """
    suffix = ".exe" if os.name == "nt" else ""
    beside = Path(sys.executable).parent / f"{GRPC_STUB_PLUGIN}{suffix}"
    if beside.is_file():
        return beside
    if os.name != "nt":  # run through a script with a #! line, which Windows cannot
        for entry in importlib.metadata.entry_points(
            group="console_scripts", name=GRPC_STUB_PLUGIN
        ):
            return entry
    on_path = shutil.which(GRPC_STUB_PLUGIN)
    return Path(on_path) if on_path else None


@contextlib.contextmanager
def _plugin_executable() -> Iterator[Path | None]:
    """A file protoc can run as the plugin (:func:`_find_plugin`), existing for the block."""
    found = _find_plugin()
    if not isinstance(found, importlib.metadata.EntryPoint):
        yield found
        return
    with tempfile.TemporaryDirectory(prefix="tether-proto-") as tmp:
        script = Path(tmp) / GRPC_STUB_PLUGIN
        script.write_text(
            f"#!{sys.executable}\n"
            "import sys\n"
            f"from {found.module} import {found.attr}\n"
            f"sys.exit({found.attr}())\n"
        )
        script.chmod(0o700)
        yield script
