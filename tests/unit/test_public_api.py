"""The public surface is pinned: adding or removing a name is a deliberate change."""

from __future__ import annotations

import tether
import tether.testing

PUBLIC = [
    "AlreadyExists",
    "App",
    "BreakerOpen",
    "CallContext",
    "ChainServerInterceptor",
    "ConfigError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Handler",
    "Internal",
    "InvalidArgument",
    "Metadata",
    "MethodName",
    "Middleware",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "RegistryUnavailable",
    "RemoteError",
    "ResourceExhausted",
    "Side",
    "StatusError",
    "TetherConfig",
    "TetherError",
    "Tracing",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "__version__",
    "chain",
    "configure_logging",
    "current_call",
    "default_client_middleware",
    "default_server_middleware",
    "dial",
    "get_logger",
    "in_context",
    "load_config",
    "recover",
    "to_thread",
    "use_call",
]

TESTING = [
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


def test_tether_all_is_pinned() -> None:
    """tether.__all__ is exactly the agreed list, sorted."""
    assert tether.__all__ == PUBLIC
    assert sorted(tether.__all__) == tether.__all__


def test_every_public_name_resolves() -> None:
    """Every name in __all__ exists on the package."""
    missing = [name for name in tether.__all__ if not hasattr(tether, name)]
    assert missing == []


def test_testing_all_is_pinned() -> None:
    """tether.testing.__all__ is exactly the agreed list."""
    assert tether.testing.__all__ == TESTING
    assert all(hasattr(tether.testing, name) for name in TESTING)
