"""`tether new` on the command line: answers given with --data, refusals as exit status 2 with the
validator's message, progress and the next commands, and nothing left behind on a refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tether.cli import main

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENT = f"--data=tether_requirement=tether @ {ROOT.as_uri()}"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current directory, where `tether new NAME` renders ./NAME."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_new_renders_with_progress_and_prints_the_next_commands(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["new", "demo-svc", "--defaults", REQUIREMENT, "--data", "grpc_port=50061"])
    out, err = capsys.readouterr()
    assert status == 0, err
    project = workdir / "demo-svc"
    assert f"tether new: created {project}" in out
    assert "create" in err
    assert "demo_svc/service.py" in err  # Copier's progress: each file as it is written
    assert f"cd {project}" in err
    assert "make setup" in err
    assert "make test" in err
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["grpc_port"] == 50061
    assert answers["service_name"] == "demo-svc"


def test_dest_names_where_to_render(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["new", "demo-svc", "--defaults", REQUIREMENT, "--dest", "elsewhere"])
    assert status == 0, capsys.readouterr().err
    assert (workdir / "elsewhere" / "demo_svc" / "service.py").is_file()
    assert not (workdir / "demo-svc").exists()


@pytest.mark.parametrize("pair", ["grpc_port", "=50061", " =x"])
def test_data_must_be_key_equals_value(
    workdir: Path, capsys: pytest.CaptureFixture[str], pair: str
) -> None:
    assert main(["new", "demo-svc", "--defaults", "--data", pair]) == 2
    out, err = capsys.readouterr()
    assert f"tether new: --data expects key=value, got {pair!r}" in err
    assert "created" not in out
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["My Service"], "Validation error for question 'service_name': must be a DNS label"),
        (["1svc"], "Validation error for question 'service_name': must be a DNS label"),
        ([""], "Validation error for question 'service_name': must be a DNS label"),
        (
            ["demo-svc", "--data", "grpc_port=fifty"],
            "Validation error for question 'grpc_port': must be a whole number (got 'fifty')",
        ),
        (
            ["demo-svc", "--data", "docker=maybe"],
            "Validation error for question 'docker': must be yes or no",
        ),
        (
            ["demo-svc", "--data", "metrics_port=50051"],
            "Validation error for question 'metrics_port': must differ from the gRPC port",
        ),
    ],
    ids=["spaces-and-capitals", "leading-digit", "empty", "not-a-number", "not-a-bool", "clash"],
)
def test_a_refused_answer_exits_2_with_the_validators_message(
    workdir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["new", *argv, "--defaults"]) == 2
    out, err = capsys.readouterr()
    assert f"tether new: {message}" in err
    assert "created" not in out
    assert list(workdir.iterdir()) == [], "a refused answer left files behind"


def test_a_non_empty_destination_exits_2(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "demo-svc").mkdir()
    (workdir / "demo-svc" / "keep.txt").write_text("mine")
    assert main(["new", "demo-svc", "--defaults"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in (workdir / "demo-svc").iterdir()] == ["keep.txt"]
