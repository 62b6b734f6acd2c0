"""Compile ``.proto`` files into Python messages, stubs and type stubs with grpcio-tools."""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PROTO_DIR", "ProtoCompileError", "compile_if_stale", "compile_protos"]

#: tether's own protos (``tether/v1/options.proto``), shipped inside the package. Their
#: generated modules ship too (``tether.v1.options_pb2``), so user code never generates them.
PROTO_DIR = Path(__file__).resolve().parent / "protos"

#: Where tether's own protos live under :data:`PROTO_DIR`, as import paths.
_OWN_PACKAGE = ("tether", "v1")


class ProtoCompileError(RuntimeError):
    """protoc refused the input; the message carries what it printed."""


def compile_protos(
    sources: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    proto_path: str | os.PathLike[str],
) -> list[Path]:
    """Generate ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` for each source.

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
    args = [
        "grpc_tools.protoc",
        *(f"--proto_path={p}" for p in includes),
        f"--proto_path={well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(s) for s in sources),
    ]
    if protoc.main(args) != 0:
        raise ProtoCompileError(f"protoc failed on {', '.join(map(str, sources))}")
    generated = [
        out / f"{stem}{suffix}"
        for stem in stems
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    ]
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
    for source in sources:
        stem = source.relative_to(root).with_suffix("")
        if _is_own(stem):
            continue
        newest = source.stat().st_mtime_ns
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            output = target / f"{stem}{suffix}"
            if not output.exists() or output.stat().st_mtime_ns < newest:
                return compile_protos(sources, target, proto_path=root)
    return []


def _is_own(stem: Path) -> bool:
    """Whether ``stem`` (an import path without suffix) is one of tether's own protos."""
    return stem.parts[: len(_OWN_PACKAGE)] == _OWN_PACKAGE
