"""The tether command: config validation and printing, proto compilation, run errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether import codegen
from tether.cli import main


def test_config_prints_effective_config_with_secrets_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tether config` prints the merged config and never the password."""
    monkeypatch.delenv("TETHER_CONFIG", raising=False)
    cfg = tmp_path / "tether.yaml"
    cfg.write_text("service: {name: orders}\nregistry: {username: u, password: hunter2}\n")
    monkeypatch.setenv("TETHER_SERVER__PORT", "6000")
    assert main(["config", "--file", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "name: orders" in out
    assert "port: 6000" in out
    assert "hunter2" not in out
    assert "**********" in out


def test_config_refuses_bad_value_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value exits 2 with field, value and rule on stderr."""
    cfg = tmp_path / "tether.yaml"
    cfg.write_text("service: {name: Orders_Service}\n")
    assert main(["config", "--file", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "service.name='Orders_Service': must be a lowercase DNS label" in err


def test_proto_compiles_into_out_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tether proto` generates messages, stubs and type stubs for every proto."""
    root = tmp_path / "proto" / "demo" / "v1"
    root.mkdir(parents=True)
    (root / "demo.proto").write_text(
        'syntax = "proto3";\npackage demo.v1;\n'
        "message Ping { string text = 1; }\n"
        "service Demo { rpc Echo(Ping) returns (Ping); }\n"
    )
    out = tmp_path / "gen"
    assert main(["proto", "--proto-path", str(tmp_path / "proto"), "--out", str(out)]) == 0
    names = sorted(p.name for p in (out / "demo" / "v1").iterdir())
    assert names == [
        "__init__.py",
        "demo_pb2.py",
        "demo_pb2.pyi",
        "demo_pb2_grpc.py",
        "demo_pb2_grpc.pyi",
    ]
    assert (out / "demo" / "__init__.py").exists()
    printed = capsys.readouterr()
    assert "demo_pb2_grpc.pyi" in printed.out
    assert printed.err == ""  # mypy-protobuf's "Writing mypy to ..." lines are kept quiet


def test_proto_says_when_mypy_protobuf_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without mypy-protobuf the modules are still written; one line on stderr says why the
    *_pb2_grpc.pyi stubs are not."""
    monkeypatch.setattr(codegen, "_find_plugin", lambda: None)
    (tmp_path / "proto").mkdir()
    (tmp_path / "proto" / "demo.proto").write_text(
        'syntax = "proto3";\npackage demo;\nmessage Ping {}\n'
        "service Demo { rpc Echo(Ping) returns (Ping); }\n"
    )
    out = tmp_path / "gen"
    assert main(["proto", "--proto-path", str(tmp_path / "proto"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "demo_pb2.py",
        "demo_pb2.pyi",
        "demo_pb2_grpc.py",
    ]
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "mypy-protobuf is not installed" in err


def test_proto_reports_protoc_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A broken proto exits 1 with a message, not a traceback."""
    (tmp_path / "bad.proto").write_text("syntax = 'proto3'; message {")
    assert main(["proto", "--proto-path", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "protoc failed" in capsys.readouterr().err


def test_run_rejects_malformed_target() -> None:
    """`tether run` wants MODULE:ATTRIBUTE."""
    with pytest.raises(SystemExit, match="expected MODULE:ATTRIBUTE"):
        main(["run", "nocolon"])
