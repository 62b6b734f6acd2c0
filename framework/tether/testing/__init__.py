"""The public test kit: a real etcd on loopback, and Apps run in-process.

Installed as a pytest plugin (fixtures ``etcd``, ``etcd_session``, ``etcd_client``); the helpers
here work with any test runner.
"""

from __future__ import annotations

from tether.testing.apps import loopback_config, running
from tether.testing.etcd import EtcdNotFound, EtcdServer, EtcdStartError, find_etcd_binary

__all__ = [
    "EtcdNotFound",
    "EtcdServer",
    "EtcdStartError",
    "find_etcd_binary",
    "loopback_config",
    "running",
]
