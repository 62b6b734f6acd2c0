"""The Copier template: answers refused or accepted, every generated project passing its own gates,
and `copier update` keeping a user's edits.

The matrix builds each project as a user would (`make setup`, `proto`, `lint`, `fmt`, `test`,
`check`) in its own virtualenv, installing tether from this checkout; pip's cache makes the
installs after the first quick.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import copier
import pytest
import yaml
from pydantic import BaseModel

from tether.config import TetherConfig, load_config
from tether.scaffold import TEMPLATE, ScaffoldError, new_service

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


@pytest.mark.slow
def test_tether_new_works_from_an_installed_wheel(tmp_path: Path) -> None:
    """The wheel carries the template, and it renders without the checkout."""
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
            str(ROOT),
        ],
        check=True,
        timeout=MAKE_TIMEOUT,
        capture_output=True,
    )
    [wheel] = (tmp_path / "dist").glob("tether-*.whl")
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    template = unpacked / "tether" / "_template"
    assert (template / "copier.yml").is_file()
    assert (template / "template" / ".gitignore").is_file()
    project = new_service(
        "from-wheel",
        destination=tmp_path / "from-wheel",
        template=str(template),
        data={"tether_requirement": REQUIREMENT},
        defaults=True,
        quiet=True,
    )
    assert (project / "from_wheel" / "service.py").is_file()
    assert load_config(project / "tether.yaml").service.name == "from-wheel"


# --------------------------------------------------------------------------- the matrix

MATRIX = {
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


@pytest.mark.slow
@pytest.mark.parametrize("answers", MATRIX.values(), ids=MATRIX.keys())
def test_a_generated_project_passes_its_own_gates(tmp_path: Path, answers: dict[str, Any]) -> None:
    """setup, proto, lint (formatting leaves no diff), test and check all pass at once."""
    project = render(tmp_path, **dict(answers))
    make(project, "setup")
    make(project, "proto")
    make(project, "lint")
    before = _tree_digest(project)
    make(project, "fmt")
    assert _tree_digest(project) == before, "make fmt changed generated code"
    assert "passed" in make(project, "test")
    make(project, "check")
    assert "make setup" in make(project)  # `make` alone is `make help`


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
