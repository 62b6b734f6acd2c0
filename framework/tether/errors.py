"""Every error tether raises, each carrying the gRPC status code it maps to.

The hierarchy::

    TetherError                     code UNKNOWN; base of everything below
    ├── ConfigError                 FAILED_PRECONDITION; refused at start-up: field, value, rule
    ├── RegistryUnavailable         UNAVAILABLE; the registry (etcd) did not answer
    └── StatusError                 an RPC outcome with a status code, a message and rich details
        ├── InvalidArgument         INVALID_ARGUMENT
        ├── NotFound                NOT_FOUND
        ├── AlreadyExists           ALREADY_EXISTS
        ├── PermissionDenied        PERMISSION_DENIED
        ├── Unauthenticated         UNAUTHENTICATED
        ├── FailedPrecondition      FAILED_PRECONDITION
        ├── ResourceExhausted       RESOURCE_EXHAUSTED (may carry RetryInfo)
        │   └── RateLimited         refused locally by a client rate limiter; nothing was sent
        ├── Unavailable             UNAVAILABLE (may carry RetryInfo)
        │   └── BreakerOpen         refused locally by an open circuit breaker; nothing was sent
        ├── DeadlineExceeded        DEADLINE_EXCEEDED
        ├── Unimplemented           UNIMPLEMENTED
        ├── Internal                INTERNAL
        └── RemoteError             whatever status a peer answered with (client side)

A handler or middleware raises a ``StatusError`` to answer with that status; the gRPC adapter maps
it to the wire once, at the edge (rich details travel as ``grpc-status-details-bin``). Anything
else that escapes a handler is unexpected: the recovery middleware logs it and answers
``INTERNAL`` with a generic message, so no internals reach the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "AlreadyExists",
    "BreakerOpen",
    "ConfigError",
    "ConfigProblem",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "RegistryUnavailable",
    "RemoteError",
    "ResourceExhausted",
    "StatusError",
    "TetherError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]


class TetherError(Exception):
    """Base of every tether error; ``code`` is the gRPC status it maps to."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One refused configuration value: where it is, what it was, and what is allowed."""

    field: str
    value: str
    rule: str

    def __str__(self) -> str:
        return f"{self.field}={self.value}: {self.rule}"


class ConfigError(TetherError):
    """Configuration refused at start-up; ``problems`` lists every bad value, not just the first."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, problems: Sequence[ConfigProblem], *, source: str | None = None) -> None:
        self.problems = tuple(problems)
        self.source = source
        where = f" ({source})" if source else ""
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid configuration{where}:\n{lines}")


class RegistryUnavailable(TetherError):
    """The registry did not answer: every etcd endpoint failed, or the time allowed ran out."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNAVAILABLE


class StatusError(TetherError):
    """An RPC outcome: a status code, a message safe to show the caller, and optional details.

    Args:
        message: text sent to the caller as the status details; keep internals out of it.
        details: protobuf messages (``google.rpc.ErrorInfo``, ``RetryInfo``, ...) sent as rich
            error details in ``grpc-status-details-bin``.
    """

    def __init__(self, message: str = "", *, details: Sequence[Message] = ()) -> None:
        super().__init__(message or self.code.name.lower().replace("_", " "))
        self.message = str(self.args[0])
        self.details = tuple(details)

    def to_status_proto(self) -> status_pb2.Status:
        """Return the ``google.rpc.Status`` that carries this error on the wire."""
        packed = []
        for detail in self.details:
            any_msg = any_pb2.Any()
            any_msg.Pack(detail)
            packed.append(any_msg)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code.name})"


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


class InvalidArgument(StatusError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(StatusError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(StatusError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(StatusError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(StatusError):
    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(StatusError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class _RetryableStatus(StatusError):
    """A status whose caller may try again later; ``retry_after`` becomes a ``RetryInfo``."""

    def __init__(
        self,
        message: str = "",
        *,
        retry_after: float | None = None,
        details: Sequence[Message] = (),
    ) -> None:
        if retry_after is not None:
            details = (*details, _retry_info(retry_after))
        super().__init__(message, details=details)
        self.retry_after = retry_after


class ResourceExhausted(_RetryableStatus):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(_RetryableStatus):
    code = grpc.StatusCode.UNAVAILABLE


class RateLimited(ResourceExhausted):
    """A client rate limiter refused the call locally; nothing was sent."""


class BreakerOpen(Unavailable):
    """An open circuit breaker refused the call locally; nothing was sent."""


class DeadlineExceeded(StatusError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(StatusError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(StatusError):
    code = grpc.StatusCode.INTERNAL


class RemoteError(StatusError):
    """A non-OK status answered by a peer; ``code`` is per instance, not per class.

    The client adapter raises it inside the client chain so middleware can read the status
    without importing gRPC; callers outside the chain receive the original ``grpc.aio.AioRpcError``.

    Args:
        code: the status the attempt ended with.
        message: the status details.
        details: rich error details, as for :class:`StatusError`.
        trailing_metadata: the trailers the peer sent (``grpc-retry-pushback-ms`` among them).
        sent: False when the attempt is known never to have reached a server's handlers (the
            connection could not be made, or a server shutting down refused it), so retrying
            it cannot repeat a side effect.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str = "",
        *,
        details: Sequence[Message] = (),
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
        sent: bool = True,
    ) -> None:
        self.code = code  # type: ignore[misc]  # instance code shadows the class default
        super().__init__(message, details=details)
        self.trailing_metadata = tuple(trailing_metadata)
        self.sent = sent
