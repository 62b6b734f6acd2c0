"""tether: governed gRPC microservices for Python.

The public surface is re-exported here; everything else is internal.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from tether.app import App, default_server_middleware
from tether.client import default_client_middleware, dial
from tether.config import TetherConfig, load_config
from tether.context import CallContext, Metadata, MethodName, Side, current_call, use_call
from tether.errors import (
    AlreadyExists,
    BreakerOpen,
    ConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    RegistryUnavailable,
    RemoteError,
    ResourceExhausted,
    StatusError,
    TetherError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from tether.interceptors import ChainServerInterceptor
from tether.log import configure_logging, get_logger
from tether.middleware import Handler, Middleware, chain
from tether.recovery import recover
from tether.tracing import Tracing, in_context, to_thread

try:
    __version__ = version("tether")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
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
