"""Helpers shared by the tests of the etcd test kit: clients, processes, stand-in binaries."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import etcd3

    from tether.testing import EtcdServer


@contextmanager
def connect(server: EtcdServer, timeout: float = 5.0) -> Iterator[etcd3.Etcd3Client]:
    """An etcd3 client on ``server`` whose calls are bounded by ``timeout``."""
    client = server.client(timeout)
    try:
        yield client
    finally:
        client.close()


def process_exists(pid: int) -> bool:
    """Whether ``pid`` names a live or unreaped process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def make_executable(path: Path, script: str) -> Path:
    """Write a /bin/sh script at ``path`` and make it executable."""
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path
