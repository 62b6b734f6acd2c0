"""The public test kit: real etcd servers and clusters, a fault-injecting proxy, local Apps,
throwaway certificate authorities.

Installed as a pytest plugin (fixtures ``etcd``, ``etcd_session``, ``etcd_cluster``,
``etcd_client``, ``otlp_sink``); the helpers here work with any test runner.
"""

from __future__ import annotations

from tether.testing.apps import loopback_config, running
from tether.testing.etcd import EtcdNotFound, EtcdServer, EtcdStartError, find_etcd_binary
from tether.testing.etcd_cluster import EtcdCluster
from tether.testing.otel import OtlpSink, ReceivedSpan
from tether.testing.proxy import TcpProxy
from tether.testing.tls import CertFiles, CertificateAuthority, IssuedCertificate
from tether.testing.waiting import eventually

__all__ = [
    "CertFiles",
    "CertificateAuthority",
    "EtcdCluster",
    "EtcdNotFound",
    "EtcdServer",
    "EtcdStartError",
    "IssuedCertificate",
    "OtlpSink",
    "ReceivedSpan",
    "TcpProxy",
    "eventually",
    "find_etcd_binary",
    "loopback_config",
    "running",
]
