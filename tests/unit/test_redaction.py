"""Secrets never reach a log line: redaction by key, in fields, nested mappings and metadata."""

from __future__ import annotations

import io
import json

import grpc
import structlog

from tether.log import REDACTED, configure_logging, get_logger


def log_line(**fields: object) -> dict[str, object]:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        get_logger("t").info("event", **fields)
    finally:
        structlog.reset_defaults()
    return json.loads(out.getvalue())  # type: ignore[no-any-return]


def test_sensitive_fields_are_redacted() -> None:
    """authorization, cookie, password, token, secret and API-key fields lose their values."""
    line = log_line(
        authorization="Bearer abc", Cookie="s=1", db_password="pw", refresh_token="t",
        client_secret="c", x_api_key="k", user="ada",
    )  # fmt: skip
    for key in (
        "authorization",
        "Cookie",
        "db_password",
        "refresh_token",
        "client_secret",
        "x_api_key",
    ):
        assert line[key] == REDACTED
    assert line["user"] == "ada"
    assert "Bearer abc" not in json.dumps(line)


def test_metadata_pairs_and_nested_mappings_are_redacted() -> None:
    """Metadata pairs are redacted by their key; nested mappings too."""
    line = log_line(
        metadata=[("authorization", "Bearer abc"), ("x-request-id", "r1")],
        headers={"Set-Cookie": "s=1", "accept": "x"},
    )
    assert line["metadata"] == [["authorization", REDACTED], ["x-request-id", "r1"]]
    assert line["headers"] == {"Set-Cookie": REDACTED, "accept": "x"}


def test_grpc_metadata_objects_are_redacted_not_written_through_their_repr() -> None:
    """grpc.aio.Metadata (a call's initial or trailing metadata) is redacted pair by pair."""
    metadata = grpc.aio.Metadata(("authorization", "Bearer abc"), ("x-request-id", "r1"))
    line = log_line(trailers=metadata, nested={"sent": metadata})
    assert line["trailers"] == [["authorization", REDACTED], ["x-request-id", "r1"]]
    assert line["nested"] == {"sent": line["trailers"]}
    assert "Bearer abc" not in json.dumps(line)


def test_long_values_and_bytes_are_never_logged_whole() -> None:
    """Strings past 1 KiB are cut; bytes show only their length."""
    line = log_line(payload="x" * 5000, blob=b"\x00" * 64)
    assert isinstance(line["payload"], str) and len(line["payload"]) < 1100
    assert line["blob"] == "<64 bytes>"


def test_tracebacks_still_render() -> None:
    """exc_info is left to the traceback renderer."""
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            get_logger("t").exception("failed")
    finally:
        structlog.reset_defaults()
    assert "ValueError" in out.getvalue()


def _raise_with_secret_locals() -> None:
    password = "hunter2-local"  # noqa: F841 (read by the traceback, if it showed locals)
    raise ValueError("boom")


def test_tracebacks_show_no_local_variables() -> None:
    """A logged traceback names files and lines, never the frames' variables (a password, a
    request), in JSON and console formats alike."""
    for fmt in ("json", "console"):
        out = io.StringIO()
        configure_logging("info", fmt, stream=out)
        try:
            try:
                _raise_with_secret_locals()
            except ValueError:
                get_logger("t").exception("failed")
        finally:
            structlog.reset_defaults()
        assert "_raise_with_secret_locals" in out.getvalue(), fmt
        assert "hunter2-local" not in out.getvalue(), fmt
