"""The error hierarchy: each class carries its status code; rich details pack into a Status."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

import tether
from tether.errors import ConfigError, ConfigProblem, RemoteError, StatusError, TetherError

EXPECTED = {
    tether.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    tether.NotFound: grpc.StatusCode.NOT_FOUND,
    tether.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    tether.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    tether.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    tether.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    tether.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    tether.Unavailable: grpc.StatusCode.UNAVAILABLE,
    tether.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    tether.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    tether.Internal: grpc.StatusCode.INTERNAL,
}


@pytest.mark.parametrize(("cls", "code"), EXPECTED.items())
def test_each_status_error_carries_its_code(cls: type[StatusError], code: grpc.StatusCode) -> None:
    """Every status error class maps to its own gRPC code and is a TetherError."""
    err = cls("m")
    assert err.code is code
    assert isinstance(err, TetherError)
    assert err.to_status_proto().code == code.value[0]


def test_default_message_names_the_status() -> None:
    """Without a message the status name stands in, never an empty string."""
    assert tether.NotFound().message == "not found"


def test_retry_after_becomes_retry_info() -> None:
    """retry_after is packed as a google.rpc.RetryInfo detail."""
    status = tether.Unavailable("busy", retry_after=0.25).to_status_proto()
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert info.retry_delay.ToNanoseconds() == 250_000_000


def test_error_info_detail_is_packed() -> None:
    """Arbitrary detail messages travel in the Status."""
    detail = error_details_pb2.ErrorInfo(reason="QUOTA", domain="shop")
    status = tether.PermissionDenied("no", details=[detail]).to_status_proto()
    unpacked = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(unpacked)
    assert unpacked.reason == "QUOTA"


def test_remote_error_code_is_per_instance() -> None:
    """RemoteError takes the code the peer answered with, without changing the class."""
    a = RemoteError(grpc.StatusCode.NOT_FOUND, "x")
    b = RemoteError(grpc.StatusCode.UNAVAILABLE, "y")
    assert (a.code, b.code) == (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
    assert RemoteError.code is grpc.StatusCode.UNKNOWN


def test_config_error_lists_every_problem() -> None:
    """A ConfigError renders each problem as field=value: rule."""
    err = ConfigError(
        [ConfigProblem("a.b", "-1", "must be >= 2"), ConfigProblem("c", "'x'", "is bad")],
        source="tether.yaml",
    )
    text = str(err)
    assert "(tether.yaml)" in text
    assert "a.b=-1: must be >= 2" in text
    assert "c='x': is bad" in text
    assert err.code is grpc.StatusCode.FAILED_PRECONDITION


def test_remote_error_is_sent_unless_told() -> None:
    """A RemoteError counts as having reached a server unless the adapter knows it did not."""
    assert RemoteError(grpc.StatusCode.UNAVAILABLE, "x").sent
    assert not RemoteError(grpc.StatusCode.UNAVAILABLE, "x", sent=False).sent
