"""The Copier template: answers refused or accepted, every generated project passing its own gates,
and `copier update` keeping a user's edits.

The matrix builds each project as a user would (`make setup`, `proto`, `lint`, `fmt`, `test`,
`check`) in its own virtualenv, installing tether from this checkout; pip's cache makes the
installs after the first quick.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import copier
import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import BaseModel

from tether.config import TetherConfig, load_config
from tether.scaffold import TEMPLATE, ScaffoldError, new_service
from tether.testing import EtcdServer

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENT = f"tether @ {ROOT.as_uri()}"
MAKE_TIMEOUT = 600  # a cold pip cache on a slow machine; a warm one needs about 20 s


def _env() -> dict[str, str]:
    """The environment a user's shell would have: no test-run paths, no tether settings."""
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TETHER_")}
    env["PYTHON"] = sys.executable  # an interpreter with venv, as the Makefile expects
    return env


def make(project: Path, *targets: str) -> str:
    """Run make in ``project``; fail with its output if it fails."""
    done = subprocess.run(
        ["make", *targets],
        cwd=project,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=MAKE_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"make {' '.join(targets)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def render(tmp_path: Path, **answers: Any) -> Path:
    name = answers.pop("service_name", "demo-svc")
    return new_service(
        name,
        destination=tmp_path / name,
        data={"tether_requirement": REQUIREMENT, **answers},
        defaults=True,
        quiet=True,
    )


def _tree_digest(project: Path) -> dict[str, str]:
    return {
        str(path.relative_to(project)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(project.rglob("*.py"))
        if ".venv" not in path.parts
    }


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ({"service_name": "My Service"}, "must be a DNS label"),
        ({"service_name": "1svc"}, "must be a DNS label"),
        ({"service_name": ""}, "must be a DNS label"),
        ({"service_name": "svc-"}, "must be a DNS label"),
        ({"service_name": "on"}, "reads as a boolean or null in YAML"),
        (
            {"service_name": "ok", "package_name": "Bad-Name"},
            "must be a lowercase Python identifier",
        ),
        ({"service_name": "ok", "proto_package": "a.b"}, "must be a lowercase identifier"),
        ({"service_name": "ok", "service_class": "lower"}, "must be CamelCase"),
        ({"service_name": "ok", "grpc_port": "70000"}, "must be a port number from 1 to 65535"),
        ({"service_name": "ok", "metrics_port": "50051"}, "must differ from the gRPC port"),
        ({"service_name": "ok", "tether_requirement": "flask"}, "must be a requirement for tether"),
    ],
)
def test_bad_answers_are_refused_with_the_validators_message(
    tmp_path: Path, answers: dict[str, str], message: str
) -> None:
    """A refused answer names the rule; nothing is left behind."""
    name = answers.pop("service_name")
    destination = tmp_path / "out"
    with pytest.raises(ScaffoldError, match=message):
        new_service(name, destination=destination, data=answers, defaults=True, quiet=True)
    assert not destination.exists() or not any(destination.iterdir())


def test_a_non_empty_destination_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ScaffoldError, match="not empty"):
        new_service("demo-svc", destination=tmp_path, defaults=True, quiet=True)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_defaults_are_derived_from_the_service_name(tmp_path: Path) -> None:
    project = render(tmp_path, service_name="user-profile")
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["package_name"] == "user_profile"
    assert answers["proto_package"] == "user_profile"
    assert answers["service_class"] == "UserProfile"
    assert (project / "proto/user_profile/v1/user_profile.proto").is_file()
    assert (project / "user_profile/service.py").is_file()
    proto = (project / "proto/user_profile/v1/user_profile.proto").read_text()
    assert "package user_profile.v1;" in proto
    assert "service UserProfile {" in proto
    assert "(tether.v1.fallback)" in proto
    assert not (project / "Dockerfile").exists()
    assert not (project / "deploy").exists()


def test_the_project_ci_runs_the_laptop_gates_and_the_contract(tmp_path: Path) -> None:
    """The generated GitHub Actions workflow runs make setup, test and check (the governance
    contract, static and --runtime) on pushes and pull requests, on the oldest Python the
    project supports."""
    project = render(tmp_path, service_name="user-profile")
    workflow = yaml.safe_load((project / ".github/workflows/ci.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert set(triggers) == {"push", "pull_request"}
    [job] = workflow["jobs"].values()
    runs = [step["run"] for step in job["steps"] if "run" in step]
    assert runs == ["make setup", "make test", "make check"]
    [python] = [step["with"] for step in job["steps"] if "setup-python" in step.get("uses", "")]
    requires = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    assert requires["requires-python"] == f">={python['python-version']}"
    makefile = (project / "Makefile").read_text()
    assert "tether check --runtime user_profile.service:create_app" in makefile


def _fields(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def _written(data: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in data.items():
        yield f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _written(value, f"{prefix}{key}.")


def test_the_config_shows_every_setting_and_loads(tmp_path: Path) -> None:
    """tether.yaml sets (or shows, commented) every field tether has, and validates."""
    project = render(tmp_path, grpc_port=50061, metrics_port=9561)
    text = (project / "tether.yaml").read_text()
    config = load_config(project / "tether.yaml")
    assert (config.server.port, config.metrics.port) == (50061, 9561)
    assert config.service.name == "demo-svc"
    uncommented = yaml.safe_load(text)
    # Settings shown commented out ("  # username: ..."): uncomment those lines only.
    commented = yaml.safe_load(re.sub(r"(?m)^(\s*)# ([a-z_]+): ", r"\1\2: ", text))
    shown = set(_written(uncommented)) | set(_written(commented))
    missing = [field for field in _fields(TetherConfig) if field not in shown]
    assert not missing, f"tether.yaml does not show: {missing}"


def test_the_bundled_template_is_the_repositorys(tmp_path: Path) -> None:
    """tether/_template (what a wheel ships) has every file of copier.yml and template/."""
    bundled = sorted(
        str(Path(folder, name).relative_to(TEMPLATE))
        for folder, _, names in os.walk(TEMPLATE, followlinks=True)  # symlinks in a checkout
        for name in names
    )
    template = ROOT / "template"
    ours = [
        "copier.yml",
        *(f"template/{p.relative_to(template)}" for p in template.rglob("*") if p.is_file()),
    ]
    assert bundled == sorted(ours)


def _scratch_checkout(tmp_path: Path) -> Path:
    """A git copy of the parts of a tether checkout `tether new` reads, its bundled template
    linked as in the real one (``framework/tether/_template``)."""
    repo = tmp_path / "tether-checkout"
    shutil.copytree(ROOT / "template", repo / "template")
    shutil.copy(ROOT / "copier.yml", repo / "copier.yml")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    bundled = repo / "framework" / "tether" / "_template"
    bundled.mkdir(parents=True)
    (bundled / "copier.yml").symlink_to("../../../copier.yml")
    (bundled / "template").symlink_to("../../../template")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "first release")
    _git(repo, "tag", "v0.1.0")
    return repo


def test_a_checkout_renders_its_working_tree_not_its_newest_tag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a checkout, `tether new` renders the template as it is: commits after the newest
    release tag, and uncommitted edits, arrive (Copier alone would render the tag)."""
    repo = _scratch_checkout(tmp_path)
    readme = repo / "template" / "README.md.jinja"
    readme.write_text(readme.read_text() + "\nCommitted after the tag.\n")
    _git(repo, "commit", "-q", "-am", "after the release")
    readme.write_text(readme.read_text() + "\nNot committed yet.\n")
    monkeypatch.setattr("tether.scaffold.TEMPLATE", repo / "framework" / "tether" / "_template")
    project = new_service(
        "demo-svc",
        destination=tmp_path / "demo-svc",
        data={"tether_requirement": REQUIREMENT},
        defaults=True,
        quiet=True,
    )
    text = (project / "README.md").read_text()
    assert "Committed after the tag." in text
    assert "Not committed yet." in text


def _source_copy(tmp_path: Path) -> Path:
    """What a wheel of tether is built from, copied: a build writes nothing into the checkout."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "copier.yml"):
        shutil.copy(ROOT / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*_cache")
    shutil.copytree(ROOT / "template", source / "template")
    shutil.copytree(ROOT / "framework", source / "framework", symlinks=True, ignore=skip)
    return source


@pytest.mark.slow
def test_tether_new_works_from_an_installed_wheel(tmp_path: Path) -> None:
    """The wheel carries the template, and `tether new` renders it without the checkout."""
    source = _source_copy(tmp_path)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        timeout=MAKE_TIMEOUT,
        capture_output=True,
    )
    [wheel] = (tmp_path / "dist").glob("tether-*.whl")
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(installed)  # what pip installs: the same files, importable
    template = installed / "tether" / "_template"
    assert (template / "copier.yml").is_file()
    # Every file of the template, dotfiles and dot-directories (.github) included.
    shipped = {p.relative_to(template / "template") for p in (template / "template").rglob("*")}
    wanted = {p.relative_to(source / "template") for p in (source / "template").rglob("*")}
    assert shipped == wanted, f"missing from the wheel: {sorted(map(str, wanted - shipped))}"
    # The `tether` entry point, run with the wheel first on the path and this checkout (an
    # editable install of this virtualenv) off it.
    entry_point = (
        "import sys\n"
        f"sys.path[:] = [p for p in sys.path if p != {str(ROOT / 'framework')!r}]\n"
        "import tether.cli\n"
        "print('tether from', tether.cli.__file__, file=sys.stderr)\n"
        "sys.exit(tether.cli.main())\n"
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", entry_point, "new", "from-wheel", "--defaults"],
        cwd=workdir,
        env={**_env(), "PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"tether new failed:\n{done.stdout}\n{done.stderr}"
    assert f"tether from {installed / 'tether' / 'cli.py'}" in done.stderr
    project = workdir / "from-wheel"
    assert (project / "from_wheel" / "service.py").is_file()
    assert load_config(project / "tether.yaml").service.name == "from-wheel"
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    # Not "tether @ file://<checkout>": the installed package knows of no checkout.
    assert answers["tether_requirement"].startswith("tether>=")
    assert answers["_src_path"] == str(template)


# --------------------------------------------------------------------------- the matrix

MATRIX: dict[str, dict[str, Any]] = {
    "defaults": {"service_name": "demo-svc"},
    "docker-and-k8s": {"service_name": "inventory-api", "docker": True, "kubernetes": True},
    "names-and-ports": {
        "service_name": "order-book",
        "package_name": "orders",
        "proto_package": "orderbook",
        "service_class": "OrderBook",
        "grpc_port": 50071,
        "metrics_port": 9471,
    },
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Render a project of the matrix and `make setup` it, once for the whole module: the run
    test below uses the project the matrix built (a setup is most of a project's time)."""
    projects: dict[str, Path] = {}

    def build(key: str) -> Path:
        if key not in projects:
            project = render(tmp_path_factory.mktemp(key), **MATRIX[key])
            make(project, "setup")
            projects[key] = project
        return projects[key]

    return build


@pytest.mark.slow
@pytest.mark.parametrize("key", MATRIX.keys())
def test_a_generated_project_passes_its_own_gates(built: Callable[[str], Path], key: str) -> None:
    """setup, proto, lint (formatting leaves no diff), test and check all pass at once."""
    project = built(key)
    make(project, "proto")
    make(project, "lint")
    before = _tree_digest(project)
    make(project, "fmt")
    assert _tree_digest(project) == before, "make fmt changed generated code"
    assert "passed" in make(project, "test")
    make(project, "check")
    assert "make setup" in make(project)  # `make` alone is `make help`


RUN_WAIT = 60.0  # `make run` compiling the protos and starting on a loaded machine; ~2 s idle


def _until(check: Callable[[], Any], what: str, proc: subprocess.Popen[bytes], log: Path) -> Any:
    """Poll ``check`` until it returns something truthy; fail with the log if ``proc`` exits
    first or ``RUN_WAIT`` passes."""
    deadline = time.monotonic() + RUN_WAIT
    last: object = None
    while True:
        try:
            if result := check():
                return result
            last = result
        except Exception as exc:  # not yet: the port is not open, etcd has no key
            last = exc
        if proc.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {proc.returncode}" if proc.returncode is not None else "running"
            raise AssertionError(
                f"`make run` never {what} within {RUN_WAIT:g} s (it is {state}; last check: "
                f"{last!r}); its output:\n{log.read_text(errors='replace')}"
            )
        time.sleep(0.05)


def _instances(etcd: EtcdServer, service: str) -> list[dict[str, Any]]:
    """The instances of ``service`` registered in etcd now, under the template's prefix."""
    client = etcd.client()
    try:
        return [json.loads(value) for value, _ in client.get_prefix(f"/tether/services/{service}/")]
    finally:
        client.close()


def _service_process(make_pid: int, package: str) -> int:
    """The pid of ``python -m <package>`` that `make run` (``make_pid``) started."""
    children = Path(f"/proc/{make_pid}/task/{make_pid}/children").read_text().split()
    for child in children:
        argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if [b"-m", package.encode()] == argv[1:3]:
            return int(child)
    raise AssertionError(f"make ({make_pid}) has no child running -m {package}: {children}")


@pytest.mark.slow
def test_a_generated_project_serves_registers_and_stops_cleanly(
    built: Callable[[str], Path], etcd: EtcdServer, tmp_path: Path
) -> None:
    """A new user's first run (`tether new demo-svc --defaults`, `make setup`, `make run`): the
    service registers in a local etcd and answers (reflection on: tether.yaml says
    development); SIGTERM (what `kill` and Kubernetes send) stops it, deregistered, with status
    0, and so `make run` ends with 0 too."""
    project = built("defaults")
    env = {
        **_env(),
        "TETHER_REGISTRY__ENDPOINTS": etcd.endpoint,
        "TETHER_SERVER__HOST": "127.0.0.1",
        "TETHER_SERVER__PORT": "0",  # free ports: tests run side by side
        "TETHER_METRICS__PORT": "0",
    }
    log = tmp_path / "make-run.log"
    with log.open("wb") as out:
        # A session of its own, as a shell gives a foreground job: cleanup can stop the group.
        proc = subprocess.Popen(
            ["make", "run"],
            cwd=project,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        [instance] = _until(lambda: _instances(etcd, "demo-svc"), "registered", proc, log)
        address = instance["address"]
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            # GreetRequest{name: "Ada"} and the GreetReply, as bytes: the test has no stubs.
            greet = channel.unary_unary(
                "/demo_svc.v1.DemoSvc/Greet", request_serializer=None, response_deserializer=None
            )
            assert b"Hello, Ada!" in greet(b"\x0a\x03Ada", timeout=10)
            # tether.yaml says development, so grpcurl can find the service by reflection.
            [listed] = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
            names = {s.name for s in listed.list_services_response.service}
            assert "demo_svc.v1.DemoSvc" in names, names
        os.kill(_service_process(proc.pid, "demo_svc"), signal.SIGTERM)
        try:
            status = proc.wait(timeout=RUN_WAIT)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"`make run` did not exit within {RUN_WAIT:g} s of SIGTERM:\n{log.read_text()}"
            ) from None
        output = log.read_text(errors="replace")
        assert status == 0, output
        # Deregistered on the way out, not left to expire with its lease (10 s).
        assert _instances(etcd, "demo-svc") == [], output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this test started: make, service
            proc.wait()


# --------------------------------------------------------------------------- copier update


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=60,
    )


def _template_repo(tmp_path: Path) -> Path:
    """A git repository with the template at two versions: v1 without bench.py, v2 as it is."""
    repo = tmp_path / "template-repo"
    repo.mkdir()
    shutil.copy(ROOT / "copier.yml", repo / "copier.yml")
    shutil.copytree(ROOT / "template", repo / "template")
    (repo / "template" / "bench.py.jinja").unlink()
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "v1")
    _git(repo, "tag", "v1.0.0")
    shutil.copy(ROOT / "template" / "bench.py.jinja", repo / "template" / "bench.py.jinja")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "v2")
    _git(repo, "tag", "v2.0.0")
    return repo


def test_copier_update_keeps_user_edits_and_brings_new_content(tmp_path: Path) -> None:
    repo = _template_repo(tmp_path)
    project = new_service(
        "demo-svc",
        destination=tmp_path / "demo-svc",
        template=str(repo),
        vcs_ref="v1.0.0",
        data={"tether_requirement": REQUIREMENT},
        defaults=True,
        quiet=True,
    )
    assert not (project / "bench.py").exists()
    _git(project, "init", "-q")
    _git(project, "add", "-A")
    _git(project, "commit", "-q", "-m", "generated")
    service = project / "demo_svc" / "service.py"
    service.write_text(service.read_text().replace('f"Hello, {name}!"', 'f"Howdy, {name}!"'))
    config = project / "tether.yaml"
    config.write_text(config.read_text().replace("grace_seconds: 10.0", "grace_seconds: 25.0"))
    _git(project, "commit", "-q", "-am", "my edits")

    copier.run_update(
        str(project), vcs_ref="v2.0.0", defaults=True, overwrite=True, quiet=True, unsafe=False
    )

    assert 'f"Howdy, {name}!"' in service.read_text()
    assert load_config(config).server.grace_seconds == 25.0
    assert (project / "bench.py").is_file()
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["_commit"] == "v2.0.0"
    assert not list(project.rglob("*.rej")), "the update left conflicts"
