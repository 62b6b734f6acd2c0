"""`tether check` as a command: output formats, exit statuses, pyproject settings, exclusions."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from tether.check import RULES
from tether.cli import main

ROOT = Path(__file__).resolve().parents[2]

SERVICE = """\
import time

import tether

log = tether.get_logger("users")


class Users:
    async def GetUser(self, request, context):
        time.sleep(0.1)
        print("got", request.id)
        return None
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project directory (the current one) with a service module holding two findings."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "users"\n')
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "service.py").write_text(SERVICE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def configure(project: Path, table: str) -> None:
    write(project / "pyproject.toml", f'[project]\nname = "users"\n\n[tool.tether.check]\n{table}')


# --------------------------------------------------------------------------- output


def test_text_output_names_path_line_column_code_and_message(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each finding is `path:line:col: CODE message` with a relative path; then a summary."""
    assert main(["check"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "users/service.py:10:9: TTH006 time.sleep() blocks the event loop in async def; "
        "use asyncio.sleep()",
        "users/service.py:11:9: TTH003 print() writes without the call's context; "
        "use tether.get_logger()",
        "Found 2 findings.",
    ]


def test_a_clean_project_exits_0(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing found: exit 0 and `All checks passed.`."""
    (project / "users" / "service.py").write_text("import tether\n\napp = tether.App\n")
    assert main(["check", "."]) == 0
    assert capsys.readouterr().out == "All checks passed.\n"


def test_json_output_is_an_array_of_findings(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--format json` writes only an array of {code, message, path, line, column}."""
    assert main(["check", "--format", "json"]) == 1
    found = json.loads(capsys.readouterr().out)
    assert [(f["code"], f["path"], f["line"], f["column"]) for f in found] == [
        ("TTH006", "users/service.py", 10, 9),
        ("TTH003", "users/service.py", 11, 9),
    ]
    assert set(found[0]) == {"code", "message", "path", "line", "column"}
    assert found[0]["message"].startswith("time.sleep() blocks")


def test_json_output_of_a_clean_project_is_an_empty_array(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No findings: `[]` and exit 0."""
    assert main(["check", "--format", "json", "--ignore", "TTH003,TTH006"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_statistics_count_findings_per_rule(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--statistics` prints a count per code instead of each finding."""
    write(project / "users" / "more.py", "print(1)\nprint(2)\n")
    assert main(["check", "--statistics"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines] == [
        ["3", "TTH003", "print"],
        ["1", "TTH006", "blocking-call"],
        ["Found", "4", "findings."],
    ]


def test_a_path_that_does_not_exist_exits_2(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing path is a usage error: exit 2, the path on stderr."""
    assert main(["check", "nowhere"]) == 2
    assert "no such file or directory: nowhere" in capsys.readouterr().err


def test_a_file_that_does_not_parse_is_reported(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A syntax error is a finding (TTH000), not a crash."""
    write(project / "users" / "broken.py", "def f(:\n")
    assert main(["check", "users/broken.py"]) == 1
    assert "users/broken.py:1:7: TTH000 cannot parse" in capsys.readouterr().out


def test_a_file_that_cannot_be_read_is_a_finding_and_the_others_are_checked(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dangling symlink and a symlink loop are TTH000 naming the path and the reason; the
    run goes on and the other files' findings are reported."""
    (project / "users" / "gone.py").symlink_to(project / "nowhere" / "gone.py")
    (project / "users" / "loop.py").symlink_to(project / "users" / "loop.py")
    assert main(["check"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "users/gone.py:1:1: TTH000 cannot read users/gone.py: No such file or directory "
        f"(a symbolic link to {project / 'nowhere' / 'gone.py'})"
    )
    assert out[1].startswith("users/loop.py:1:1: TTH000 cannot read users/loop.py: ")
    assert [line.split()[1] for line in out[2:4]] == ["TTH006", "TTH003"]
    assert out[-1] == "Found 4 findings."


def test_a_dangling_symlink_named_on_the_command_line_is_a_finding(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A named dangling symlink is read like any file: TTH000, exit 1, not a usage error."""
    (project / "gone.py").symlink_to(project / "nowhere.py")
    assert main(["check", "gone.py", "users"]) == 1
    out = capsys.readouterr().out
    assert "gone.py:1:1: TTH000 cannot read gone.py: No such file or directory" in out
    assert "users/service.py:10:9: TTH006" in out


def test_files_in_other_encodings_are_read_as_python_reads_them(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A UTF-8 byte order mark and a coding declaration are honoured: the rules run."""
    (project / "users" / "bom.py").write_bytes(b'\xef\xbb\xbfprint("h\xc3\xa9")\n')
    (project / "users" / "legacy.py").write_bytes(
        b'# -*- coding: latin-1 -*-\nprint("h\xe9")  # tether: ignore[TTH003]\nprint(1)\n'
    )
    (project / "users" / "service.py").write_text("")
    assert main(["check"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "users/bom.py:1:1: TTH003 print() writes without the call's context; "
        "use tether.get_logger()",
        "users/legacy.py:3:1: TTH003 print() writes without the call's context; "
        "use tether.get_logger()",
        "Found 2 findings.",
    ]


def test_help_lists_every_rule(capsys: pytest.CaptureFixture[str]) -> None:
    """`tether check --help` names every code, the suppression comment and the exit statuses."""
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = capsys.readouterr().out
    assert all(rule.code in out for rule in RULES)
    assert "# tether: ignore[TTH003]" in out
    assert "2 the check could not run" in out


# --------------------------------------------------------------------------- selection


def test_select_and_ignore_flags_choose_codes(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--select` replaces the selection; `--ignore` (comma-separated, repeatable) removes."""
    assert main(["check", "--select", "TTH003"]) == 1
    assert "TTH006" not in capsys.readouterr().out
    assert main(["check", "--ignore", "TTH003", "--ignore", "TTH006"]) == 0
    assert main(["check", "--select", "TTH00", "--ignore", "TTH006"]) == 1
    assert "TTH003" in capsys.readouterr().out


def test_an_unknown_code_on_the_command_line_exits_2(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A selector naming no rule is refused, named, with the known codes."""
    assert main(["check", "--select", "TTH999"]) == 2
    err = capsys.readouterr().err
    assert "--select='TTH999': unknown rule code; known: TTH000, TTH001" in err


def test_pyproject_select_and_ignore_apply(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`select` and `ignore` in [tool.tether.check] choose the codes checked."""
    configure(project, 'select = ["TTH0"]\nignore = ["TTH003"]\n')
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert "TTH006" in out
    assert "TTH003" not in out


def test_an_unknown_code_in_pyproject_exits_2_naming_the_field(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad code in the configuration is refused with its field and value."""
    configure(project, 'ignore = ["TTH003", "TTH42"]\n')
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert "pyproject.toml" in err
    assert "tool.tether.check.ignore='TTH42': unknown rule code" in err


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('selct = ["TTH001"]\n', "tool.tether.check.selct=['TTH001']: unknown key"),
        ('select = "TTH001"\n', "tool.tether.check.select='TTH001': must be a list of strings"),
        ('per-file-ignores = { "x.py" = "TTH003" }\n', "must be a list of codes"),
    ],
)
def test_a_malformed_configuration_exits_2(
    project: Path, capsys: pytest.CaptureFixture[str], table: str, expected: str
) -> None:
    """An unknown key or a value of the wrong type is refused, named."""
    configure(project, table)
    assert main(["check"]) == 2
    assert expected in capsys.readouterr().err


def test_invalid_toml_exits_2(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A pyproject.toml that is not TOML is refused with exit 2."""
    write(project / "pyproject.toml", "[tool.tether.check\n")
    assert main(["check"]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_the_nearest_pyproject_of_each_path_applies(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A path in another project is checked with that project's settings."""
    other = project / "vendor" / "tool"
    write(other / "pyproject.toml", '[tool.tether.check]\nignore = ["TTH003"]\n')
    write(other / "run.py", "print('x')\n")
    configure(project, 'extend-exclude = ["vendor"]\n')
    assert main(["check", "vendor/tool"]) == 0
    assert main(["check", "vendor/tool", "--select", "TTH003"]) == 1


# --------------------------------------------------------------------------- exclusions


def test_tests_and_generated_code_are_excluded_by_default(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """tests/, test_*.py, conftest.py, *_pb2*.py and .venv are not checked by default."""
    raw = "import grpc\nchannel = grpc.insecure_channel('x')\nprint(channel)\n"
    for name in (
        "tests/test_service.py",
        "tests/helpers.py",
        "users/test_users.py",
        "conftest.py",
        "users/v1/users_pb2_grpc.py",
        "users/v1/users_pb2.py",
        ".venv/lib/site.py",
        "build/lib/users/service.py",
    ):
        write(project / name, raw)
    (project / "users" / "service.py").write_text("")
    assert main(["check"]) == 0
    assert main(["check", "tests/test_service.py"]) == 0  # named files are excluded too


def test_exclude_replaces_the_defaults(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`exclude` replaces the default list: tests are checked once it leaves them out."""
    write(project / "tests" / "test_service.py", "print('x')\n")
    (project / "users" / "service.py").write_text("")
    configure(project, 'exclude = [".venv"]\n')
    assert main(["check"]) == 1
    assert "tests/test_service.py:1:1: TTH003" in capsys.readouterr().out


def test_extend_exclude_adds_name_and_path_patterns(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`extend-exclude` adds to the defaults; `a/b` patterns match from the project root."""
    write(project / "scripts" / "seed.py", "print('x')\n")
    write(project / "tools" / "legacy" / "old.py", "print('x')\n")
    write(project / "tools" / "new.py", "print('x')\n")
    (project / "users" / "service.py").write_text("")
    configure(project, 'extend-exclude = ["scripts", "tools/legacy"]\n')
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert "tools/new.py" in out
    assert "scripts" not in out
    assert "legacy" not in out


def test_per_file_ignores_relax_codes_for_matching_files(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`per-file-ignores` turns codes off for the files its patterns match."""
    write(project / "tools" / "report.py", "print('x')\n")
    configure(
        project, 'per-file-ignores = { "tools/*.py" = ["TTH003"], "service.py" = ["TTH006"] }\n'
    )
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert "tools/report.py" not in out
    assert "TTH006" not in out
    assert "users/service.py:11:9: TTH003" in out


# --------------------------------------------------------------------------- scale


def _benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "check_speed", ROOT / "benchmarks" / "check_speed.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_ten_thousand_line_service_is_checked_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The benchmark's 10,000-line corpus yields exactly its seeded findings (its speed is
    measured by benchmarks/check_speed.py, not here)."""
    written, seeded = _benchmark().write_corpus(tmp_path, 10_000)
    assert written >= 10_000
    monkeypatch.chdir(tmp_path)
    assert main(["check", "--format", "json"]) == 1
    found = json.loads(capsys.readouterr().out)
    assert len(found) == seeded
    assert {f["code"] for f in found} == {"TTH003"}
