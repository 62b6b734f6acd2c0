"""Any answers to the template's questions: a sound project, or a refusal naming the question.

Answers are generated near the rules' edges (uppercase, a trailing newline, 63 and 64
characters, Python keywords, quotes in the description, ports out of range, words for
booleans) and at random, and rendered with ``tether.scaffold.new_service`` (Copier, with the
validators in copier.yml). An answer is accepted exactly when the rules below accept it, and
then the project is sound: its pyproject.toml parses, every Python file compiles, its proto
compiles, and its tether.yaml loads with the service's name. A refusal is a ScaffoldError
naming the question, quoting at most the start of a long answer, and leaving nothing behind.
Rendering costs a few tenths of a second, so the examples are few; the rules are simple.
"""

from __future__ import annotations

import keyword
import re
import shutil
import tempfile
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tether.codegen import compile_protos
from tether.config import load_config
from tether.scaffold import ScaffoldError, new_service

QUESTIONS = yaml.safe_load((Path(__file__).parents[2] / "copier.yml").read_text())
SHOWN = 60  # the longest part of a refused answer quoted back
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}
_TAKEN = {*keyword.kwlist, "tether", "grpc", "google"}
_BOOLEANS = {"y", "yes", "t", "true", "on", "1", "n", "no", "f", "false", "off", "0"}

# The rules, as the template documents them.
_DNS_LABEL = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
_IDENTIFIER = re.compile(r"[a-z][a-z0-9_]{0,62}")
_CAMEL = re.compile(r"[A-Z][A-Za-z0-9]{0,62}")
_LINE = re.compile(r'[^\x00-\x1f\x7f"\\]{0,200}')
_REQUIREMENT = re.compile(r'tether *(\[[a-z,]+\])? *([<>=!~][^"\\\x00-\x1f\x7f]*|@ *[^"\\\s]+)?')
_WHOLE = re.compile(r"\s*[+-]?\d+\s*")


def refused(answers: dict[str, str]) -> set[str]:
    """The questions whose answers the rules refuse (given, or derived by default)."""
    name = answers["service_name"]
    package = answers.get("package_name", name.replace("-", "_"))
    given_ = {"package_name": package, "proto_package": answers.get("proto_package", package)}
    bad_ones = set()
    for question in QUESTIONS:
        if question.startswith("_"):
            continue
        value = answers.get(question, given_.get(question))
        if value is None:
            continue
        if question == "service_name":
            bad = not _DNS_LABEL.fullmatch(value) or value in _YAML_WORDS
        elif question in ("package_name", "proto_package"):
            bad = not _IDENTIFIER.fullmatch(value) or value in _TAKEN
        elif question == "service_class":
            bad = not _CAMEL.fullmatch(value)
        elif question == "description":
            bad = not _LINE.fullmatch(value)
        elif question in ("grpc_port", "metrics_port"):
            bad = not _WHOLE.fullmatch(value) or not 0 < int(value) < 65536
            grpc_port = answers.get("grpc_port", "50051")
            if question == "metrics_port" and not bad and _WHOLE.fullmatch(grpc_port):
                bad = int(value) == int(grpc_port)
        elif question == "tether_requirement":
            bad = not _REQUIREMENT.fullmatch(value)
        elif question in ("docker", "kubernetes"):
            bad = value.strip().lower() not in _BOOLEANS
        else:
            bad = False
        if bad:
            bad_ones.add(question)
    return bad_ones


def _near(pattern: str, extra: list[str]) -> st.SearchStrategy[str]:
    """Valid values, valid values bent (a newline, uppercase, a space), fixed edge cases, junk."""
    valid = st.from_regex(pattern, fullmatch=True)
    return st.one_of(
        valid,
        valid.map(lambda v: v + "\n"),
        valid.map(str.upper),
        valid.map(lambda v: " " + v),
        st.sampled_from(extra),
        st.text(max_size=80),
    )


ANSWERS = {
    "package_name": _near(r"[a-z][a-z0-9_]{0,10}", ["a" * 63, "a" * 64, "class", "grpc", "_x"]),
    "proto_package": _near(r"[a-z][a-z0-9_]{0,10}", ["a.b", "import", "google", "x" * 200]),
    "service_class": _near(r"[A-Z][A-Za-z0-9]{0,10}", ["A" * 63, "A" * 64, "lower", "None"]),
    "description": st.one_of(
        st.text(max_size=60),
        st.sampled_from(['say "hi"', "a\\b", "two\nlines", "x" * 200, "y" * 201, "Plain: ok!"]),
    ),
    "grpc_port": st.one_of(
        st.integers(-5, 70000).map(str), st.sampled_from(["abc", "", "1e3", " 80 ", "٣", "8_0"])
    ),
    "metrics_port": st.integers(0, 70000).map(str),
    "tether_requirement": st.one_of(
        st.sampled_from(
            [
                "tether",
                "tether>=0.1,<0.2",
                "tether [dev] >=0.1",
                "tether @ file:///opt/tether",
                "tether>=1\n",
                'tether>=1"',
                "flask",
                "tether @ ",
            ]
        ),
        st.text(max_size=40).map(lambda t: "tether>=" + t),
    ),
    "docker": st.sampled_from(["yes", "no", "true", "0", "maybe", "", "2"]),
    "kubernetes": st.sampled_from(["on", "off", "False", "sure"]),
}


_LABEL = r"[a-z]([a-z0-9-]{0,12}[a-z0-9])?"
_NAMES = _near(_LABEL, ["a" * 63, "a" * 64, "svc-", "on", "null", "class", "grpc", "My Service"])


@st.composite
def answers(draw: st.DrawFn) -> dict[str, str]:
    """A valid service name (else every render stops at it) and up to three other answers."""
    valid = st.from_regex(_LABEL, fullmatch=True).filter(lambda n: not refused({"service_name": n}))
    name = draw(valid)
    chosen = draw(st.lists(st.sampled_from(sorted(ANSWERS)), unique=True, max_size=3))
    return {"service_name": name, **{key: draw(ANSWERS[key]) for key in chosen}}


def check_project(project: Path, given_: dict[str, str]) -> None:
    """What `make setup`, `make proto` and `make run` would trip on first, checked cheaply."""
    pyproject = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["name"] == given_["service_name"]
    if "description" in given_:
        assert pyproject["project"]["description"] == given_["description"]
    for source in project.rglob("*.py"):
        compile(source.read_text(encoding="utf-8"), str(source), "exec")
    protos = sorted((project / "proto").rglob("*.proto"))
    with tempfile.TemporaryDirectory() as out:
        compile_protos(protos, Path(out), proto_path=project / "proto")
    config = load_config(project / "tether.yaml")
    assert config.service.name == given_["service_name"]


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tether-answers-") as name:
        yield Path(name)


def render(workdir: Path, given_: dict[str, str]) -> None:
    """Render ``given_``; check the project, or the refusal, against the rules."""
    destination = workdir / "out"
    shutil.rmtree(destination, ignore_errors=True)
    expected = refused(given_)
    data = {"tether_requirement": "tether>=0.1", **given_}
    name = data.pop("service_name")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Copier's DirtyLocalWarning in a working tree
            project = new_service(
                name, destination=destination, data=data, defaults=True, quiet=True
            )
    except ScaffoldError as exc:
        message = str(exc)
        named = re.match(r"Validation error for question '(\w+)': ", message)
        event(f"refused: {named.group(1) if named else message[:30]}")
        assert expected, f"refused valid answers: {message}"
        assert named is not None and named.group(1) in expected, (expected, message)
        for value in given_.values():
            if len(value) > SHOWN + 5:
                assert value not in message, "a long answer was quoted whole"
        assert not destination.exists() or not any(destination.iterdir())
    else:
        event("rendered")
        assert not expected, f"accepted bad answers to {sorted(expected)}"
        check_project(project, given_)


@settings(max_examples=20)
@given(given_=answers())
def test_any_answers_render_a_sound_project_or_are_refused_by_name(
    workdir: Path, given_: dict[str, str]
) -> None:
    """Generated answers: accepted exactly when the template's rules allow them, and then a
    project that parses, compiles and loads; otherwise a ScaffoldError naming the question
    that quotes at most the start of the answer, with nothing left behind."""
    render(workdir, given_)


@settings(max_examples=20)
@given(name=_NAMES)
def test_any_service_name_renders_a_sound_project_or_is_refused_by_name(
    workdir: Path, name: str
) -> None:
    """The same for the service name alone, from which every other answer's default derives."""
    render(workdir, {"service_name": name})
