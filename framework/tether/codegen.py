"""Compile ``.proto`` files into Python messages, stubs and type stubs with grpcio-tools."""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ProtoCompileError", "compile_protos"]


class ProtoCompileError(RuntimeError):
    """protoc refused the input; the message carries what it printed."""


def compile_protos(
    sources: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    proto_path: str | os.PathLike[str],
) -> list[Path]:
    """Generate ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` for each source.

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
    try:
        stems = [Path(s).resolve().relative_to(root).with_suffix("") for s in sources]
    except ValueError:
        raise ProtoCompileError(f"every source must be inside --proto-path {root}") from None
    out.mkdir(parents=True, exist_ok=True)
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={proto_path}",
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
