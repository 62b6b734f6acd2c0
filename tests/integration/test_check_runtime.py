"""`tether check --runtime`: the examples' Apps pass; a servicer missing a method, a bad fallback,
a refused configuration and a method pattern naming nothing are found.

The examples are separate projects whose packages would shadow each other in one interpreter,
so each check runs as a user runs it: `tether check` in the project's directory, in a process
of its own, with this checkout's tether and the project's protos generated first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tether.codegen import compile_if_stale

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.slow


def tether_check(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `tether check ARGS` in ``project``, as its Makefile would."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("TETHER_")}
    return subprocess.run(
        [sys.executable, "-m", "tether.cli", "check", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def users_generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/users with its protos generated, once for this module."""
    project = tmp_path_factory.mktemp("generated") / "users"
    shutil.copytree(
        EXAMPLES / "users",
        project,
        ignore=shutil.ignore_patterns(".venv", "__pycache__", "*.egg-info", "*_pb2*", ".*cache"),
    )
    compile_if_stale(project / "proto", project)
    return project


@pytest.fixture
def project(users_generated: Path, tmp_path: Path) -> Path:
    """A copy of examples/users of this test's own, to break on purpose."""
    return Path(shutil.copytree(users_generated, tmp_path / "users"))


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize(
    ("example", "target"),
    [
        ("users", "users.service:create_app"),
        ("inventory", "inventory.service:create_app"),
        ("orders", "orders.service:create_app"),
        ("greeter", "greeter.service:create_app"),
    ],
)
def test_the_examples_pass_the_runtime_check(example: str, target: str) -> None:
    """Handlers, fallbacks (orders declares both kinds) and config of each example: exit 0."""
    compile_if_stale(EXAMPLES / example / "proto", EXAMPLES / example)
    done = tether_check(EXAMPLES / example, "--runtime", target)
    assert (done.returncode, done.stdout) == (0, "All checks passed.\n"), done.stderr


def test_a_servicer_missing_a_method_is_found(project: Path) -> None:
    """An RPC whose handler is only the generated base's is TTH202, at the servicer's class."""
    edit(project / "users" / "service.py", "async def SetFault(", "async def SetFaultLater(")
    done = tether_check(project, "--runtime", "users.service:create_app")
    assert done.returncode == 1, done.stderr
    line = next(
        number
        for number, text in enumerate((project / "users/service.py").read_text().splitlines(), 1)
        if text.startswith("class UsersAdminServicer")
    )
    assert done.stdout.splitlines() == [
        f"users/service.py:{line}:1: TTH202 UsersAdminServicer does not implement "
        "users.v1.UsersAdmin/SetFault; callers get UNIMPLEMENTED",
        "Found 1 finding.",
    ]


def test_a_servicer_lacking_a_method_outright_is_found(project: Path) -> None:
    """A servicer not derived from the generated base, without an RPC's method: TTH202."""
    service = project / "users" / "service.py"
    edit(
        service,
        "class UsersAdminServicer(pb_grpc.UsersAdminServicer):",
        "class UsersAdminServicer:",
    )
    edit(service, "async def SetFault(", "async def SetFaultLater(")
    done = tether_check(project, "--runtime", "users.service:create_app")
    assert done.returncode == 1, done.stderr
    assert "TTH202 UsersAdminServicer has no method SetFault; it cannot be served" in done.stdout


def test_runtime_findings_follow_select_and_ignore(project: Path) -> None:
    """`--ignore` applies to runtime codes as to static ones."""
    edit(project / "users" / "service.py", "async def SetFault(", "async def SetFaultLater(")
    done = tether_check(project, "--runtime", "users.service:create_app", "--ignore", "TTH202")
    assert (done.returncode, done.stdout) == (0, "All checks passed.\n"), done.stderr


def test_bad_fallbacks_are_found(project: Path) -> None:
    """A fallback of the wrong type, and one for a method that does not exist, are TTH203."""
    edit(
        project / "users" / "service.py",
        "    app = tether.App(config)\n",
        "    app = tether.App(config)\n"
        '    app.fallback("users.v1.Users/GetUsr", response="")\n\n'
        '    @app.fallback("users.v1.Users/GetUser")\n'
        "    def wrong(request: pb.GetUserRequest, error: object) -> pb.SetFaultReply:\n"
        "        return pb.SetFaultReply()\n\n",
    )
    done = tether_check(project, "--runtime", "users.service:create_app", "--format", "json")
    assert done.returncode == 1, done.stderr
    found = json.loads(done.stdout)
    assert [f["code"] for f in found] == ["TTH203", "TTH203"]
    by_method = {f["message"].split("]")[0]: f for f in found}
    wrong = by_method["fallback[users.v1.Users/GetUser"]
    assert "must return users.v1.User" in wrong["message"]
    declared = next(
        number
        for number, text in enumerate((project / "users/service.py").read_text().splitlines(), 1)
        if "@app.fallback" in text
    )
    assert (wrong["path"], wrong["line"]) == ("users/service.py", declared)
    assert "names no method" in by_method["fallback[users.v1.Users/GetUsr"]["message"]


def test_a_refused_configuration_is_found_on_its_line(project: Path) -> None:
    """A bad value in tether.yaml is TTH201, at its line."""
    edit(project / "tether.yaml", "  weight: 100 ", "  weight: -5  ")
    done = tether_check(project, "--runtime", "users.service:create_app")
    assert done.returncode == 1, done.stderr
    line = next(
        number
        for number, text in enumerate((project / "tether.yaml").read_text().splitlines(), 1)
        if text.startswith("  weight:")
    )
    first = done.stdout.splitlines()[0]
    assert first.startswith(f"tether.yaml:{line}:1: TTH201 configuration refused: service.weight=")


def test_method_patterns_naming_nothing_are_found(project: Path) -> None:
    """Config naming an unknown service or method, or admission for a service not served: TTH204."""
    edit(
        project / "tether.yaml",
        "idempotent_methods: []",
        "idempotent_methods: ['users.v1.Userz/*']",
    )
    edit(
        project / "tether.yaml",
        "  services: {}",
        "  services: {users: {methods: {'users.v1.Users/GetUsers': {timeout_seconds: 1}}}}",
    )
    edit(
        project / "tether.yaml",
        "    methods: {}              # per method:",
        "    methods: {'users.v1.Users/GetUser': {rate: 5}, 'grpc.health.v1.Health/Check': {}}  #",
    )
    done = tether_check(project, "--runtime", "users.service:create_app")
    assert done.returncode == 1, done.stderr
    messages = [line.split(" TTH204 ")[1] for line in done.stdout.splitlines() if "TTH204" in line]
    assert sorted(messages) == [
        "client.idempotent_methods names 'users.v1.Userz/*': "
        "no proto the app imports defines service users.v1.Userz",
        "client.services.users.methods names 'users.v1.Users/GetUsers': "
        "service users.v1.Users has no method GetUsers",
        "server.admission.methods names 'grpc.health.v1.Health/Check': "
        "this app does not serve grpc.health.v1.Health",
    ]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("users.service", "expected MODULE:ATTRIBUTE"),
        ("users.service:make_app", "users.service has no attribute 'make_app'"),
        ("users.missing:create_app", "No module named 'users.missing'"),
        ("users.service:DIRECTORY", "is not a tether App"),
    ],
)
def test_a_target_that_cannot_be_built_exits_2(project: Path, target: str, expected: str) -> None:
    """A malformed, missing or non-App target is a usage error: exit 2, the reason on stderr."""
    done = tether_check(project, "--runtime", target)
    assert done.returncode == 2
    assert expected in done.stderr


def test_a_configured_dependency_the_source_never_calls_is_found(project: Path) -> None:
    """A `client.services` key no app.client()/dial() names (a typo) is TTH205, at its line;
    one the source calls is not."""
    (project / "users" / "clients.py").write_text(
        '"""Outbound clients."""\n\n\ndef inventory(app):\n    return app.client("inventory")\n'
    )
    edit(
        project / "tether.yaml",
        "  services: {}",
        "  services:\n    inventory: {timeout_seconds: 1}\n    invntory: {timeout_seconds: 2}\n ",
    )
    done = tether_check(project, "--runtime", "users.service:create_app")
    assert done.returncode == 1, done.stderr
    line = next(
        number
        for number, text in enumerate((project / "tether.yaml").read_text().splitlines(), 1)
        if text.startswith("    invntory:")
    )
    assert done.stdout.splitlines() == [
        f"tether.yaml:{line}:1: TTH205 client.services.invntory configures a dependency the "
        "source never calls (it calls: inventory); a typo here applies to nothing",
        "Found 1 finding.",
    ]


def test_a_dependency_named_by_a_variable_leaves_the_keys_unchecked(project: Path) -> None:
    """When the source calls a dependency by a name it does not spell out, any key may be
    called: no TTH205."""
    (project / "users" / "clients.py").write_text(
        '"""Outbound clients."""\n\n\ndef stub(app, name):\n    return app.client(name)\n'
    )
    edit(project / "tether.yaml", "  services: {}", "  services: {invntory: {timeout_seconds: 2}}")
    done = tether_check(project, "--runtime", "users.service:create_app")
    assert (done.returncode, done.stdout) == (0, "All checks passed.\n"), done.stderr


def test_runtime_findings_follow_suppressions_and_per_file_ignores(project: Path) -> None:
    """A `# tether: ignore[TTH202]` on the servicer's class line, or per-file-ignores for its
    file, silences a runtime finding there."""
    service = project / "users" / "service.py"
    edit(service, "async def SetFault(", "async def SetFaultLater(")
    assert tether_check(project, "--runtime", "users.service:create_app").returncode == 1
    with (project / "pyproject.toml").open("a") as config:
        config.write(
            '\n[tool.tether.check]\nper-file-ignores = { "users/service.py" = ["TTH202"] }\n'
        )
    done = tether_check(project, "--runtime", "users.service:create_app")
    assert (done.returncode, done.stdout) == (0, "All checks passed.\n"), done.stderr
    edit(project / "pyproject.toml", '"users/service.py" = ["TTH202"]', '"x.py" = ["TTH202"]')
    edit(
        service,
        "class UsersAdminServicer(pb_grpc.UsersAdminServicer):",
        "class UsersAdminServicer(pb_grpc.UsersAdminServicer):  # tether: ignore[TTH202]",
    )
    done = tether_check(project, "--runtime", "users.service:create_app")
    assert (done.returncode, done.stdout) == (0, "All checks passed.\n"), done.stderr
