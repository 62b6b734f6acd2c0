"""Any configuration value, from YAML or ``TETHER_*`` variables: loaded, or refused clearly.

Values are generated for every field tether declares (found by walking ``TetherConfig``, so a
field added later is covered too): plausible values of the field's type, edge values (NaN,
infinities, huge integers, empty and long strings) and values of the wrong type, plus unknown
keys. ``load_config`` must return a configuration or raise ``ConfigError`` whose problems each
name a field, show the value (cut short) and say what is allowed; nothing else may escape,
no secret (a ``SecretStr`` field) may be echoed, and no long value may be echoed whole.
"""

from __future__ import annotations

import json
import math
import os
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from unittest import mock

import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, SecretStr

from tether.config import TetherConfig, load_config, render_config
from tether.config_problems import MAX_SHOWN
from tether.errors import ConfigError

#: Every secret value generated contains this; it must never be shown.
SECRET = "s3cr3t-Xq7"
#: What a valid configuration always has, unless a test replaces it.
SERVICE = {"name": "svc"}

_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=120),
    st.lists(st.text(max_size=10), max_size=3),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2),
)
_PLAUSIBLE_TEXT = st.sampled_from(
    [
        "",
        "svc",
        "127.0.0.1",
        "127.0.0.1:2379",
        "[::1]:2379",
        "http://127.0.0.1:4317",
        "/tether/services",
        "users.v1.Users/GetUser",
        "users.v1.Users/*",
        "UNAVAILABLE",
        "unavailable,DEADLINE_EXCEEDED",
        "0.0.0.0",
        "x" * 300,
    ]
)


def _unwrap(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _secrets() -> st.SearchStrategy[Any]:
    marked = st.text(string.ascii_letters, max_size=6).map(lambda s: SECRET + s)
    return st.one_of(marked, st.lists(marked, max_size=2), st.dictionaries(marked, marked))


def values(annotation: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values for a field of type ``annotation``: of the type, at its edges, or junk."""
    annotation = _unwrap(annotation)
    origin = get_origin(annotation)
    args = get_args(annotation)
    if annotation is SecretStr:
        return _secrets()
    if origin in (Union, UnionType):
        return st.one_of(*(values(arg, depth) for arg in args if arg is not type(None)), st.none())
    if origin is Literal:
        return st.one_of(st.sampled_from(args), st.sampled_from(args).map(str.upper), _JUNK)
    if _is_model(annotation):
        return models(annotation, depth + 1) if depth < 3 else _JUNK
    if origin in (tuple, list):
        item = values(args[0], depth)
        return st.one_of(st.lists(item, max_size=4), _PLAUSIBLE_TEXT, _JUNK)
    if origin is dict:
        keys = st.one_of(st.text(max_size=20), _PLAUSIBLE_TEXT)
        return st.one_of(st.dictionaries(keys, values(args[1], depth), max_size=2), _JUNK)
    typed: dict[Any, st.SearchStrategy[Any]] = {
        bool: st.one_of(st.booleans(), st.sampled_from(["yes", "no", "on", "1", "maybe"])),
        int: st.one_of(
            st.integers(-5, 70000), st.sampled_from([2**31, 2**63, 2**64, -(2**63) - 1])
        ),
        float: st.one_of(
            st.floats(-1e3, 1e6),
            st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 5e-324, -0.0]),
        ),
        str: st.one_of(_PLAUSIBLE_TEXT, st.text(max_size=120)),
        Path: st.one_of(st.text(max_size=40), st.just("/nonexistent/file.pem")),
    }
    return st.one_of(typed.get(annotation, _JUNK), _JUNK)


def models(model: type[BaseModel], depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A mapping for ``model``: some of its fields (each from :func:`values`), maybe an unknown
    key besides."""
    fields = sorted(model.model_fields)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        chosen = draw(st.lists(st.sampled_from(fields), unique=True, max_size=3))
        data = {name: draw(values(model.model_fields[name].annotation, depth)) for name in chosen}
        if draw(st.integers(0, 9)) == 0:
            data[draw(st.text(string.ascii_lowercase + "_", min_size=1, max_size=12))] = 1
        return data

    return build()


def sections() -> st.SearchStrategy[dict[str, Any]]:
    """A whole file's worth of sections, the service name valid unless replaced."""
    names = sorted(TetherConfig.model_fields)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        data: dict[str, Any] = {"service": dict(SERVICE)}
        for name in draw(st.lists(st.sampled_from(names), unique=True, min_size=1, max_size=3)):
            annotation = TetherConfig.model_fields[name].annotation
            generated = draw(models(annotation) if _is_model(annotation) else values(annotation))
            if name == "service" and isinstance(generated, dict):
                generated = {**SERVICE, **generated}
            data[name] = generated
        return data

    return build()


def leaves(value: Any) -> Iterator[str]:
    """Every string (keys included) and number in a generated value, as text."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(key)
            yield from leaves(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from leaves(item)
    elif isinstance(value, str):
        yield value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield repr(value)


def check_refusal(error: ConfigError, generated: Any) -> None:
    """Each problem names a field, a value and a rule; no secret and no long value whole."""
    text = str(error)
    assert error.problems, text
    sections = {*TetherConfig.model_fields, "config", "environment"}
    for problem in error.problems:
        assert problem.field and problem.rule and problem.value, problem
        head = problem.field.split(".")[0].split("[")[0]
        assert head in sections or problem.rule.startswith("unknown field"), problem
        assert len(problem.value) <= MAX_SHOWN, problem
    assert SECRET not in text, "a secret was echoed"
    for leaf in leaves(generated):
        if len(leaf) > MAX_SHOWN:
            assert leaf not in text, f"echoed whole: {leaf[:40]!r}..."


def check_valid(config: TetherConfig, directory: Path) -> None:
    """A loaded configuration prints without secrets, and what it prints loads again."""
    shown = render_config(config)
    assert SECRET not in shown and SECRET not in repr(config)
    again = directory / "again.yaml"
    again.write_text(shown, encoding="utf-8")
    assert load_config(again).service == config.service


@pytest.fixture(scope="module")
def directory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tether-config-") as name:
        yield Path(name)


@pytest.fixture(scope="module", autouse=True)
def no_ambient_settings() -> Iterator[None]:
    """No TETHER_* variable of the machine running the tests takes part."""
    ambient = {k: v for k, v in os.environ.items() if k.upper().startswith("TETHER_")}
    for name in ambient:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.update(ambient)


@settings(max_examples=400)
@given(data=sections())
def test_any_yaml_values_load_or_are_refused_clearly(directory: Path, data: dict[str, Any]) -> None:
    """Generated values in a YAML file: a configuration, or a ConfigError naming field, value
    and rule for each problem, never another exception, never a secret or long value echoed."""
    path = directory / "tether.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    try:
        config = load_config(path)
    except ConfigError as error:
        event("refused")
        check_refusal(error, data)
    else:
        event("loaded")
        check_valid(config, directory)


@settings(max_examples=200)
@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_any_file_content_loads_or_is_refused_clearly(directory: Path, text: str | bytes) -> None:
    """Arbitrary file content (not YAML, not a mapping, not UTF-8): a ConfigError naming the
    file, never a traceback from the YAML parser."""
    path = directory / "junk.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as error:
        check_refusal(error, text)


def _env_name(path: tuple[str, ...]) -> str:
    return "TETHER_" + "__".join(part.upper() for part in path)


def _env_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[Any, ...]]:
    for name, info in model.model_fields.items():
        annotation = _unwrap(info.annotation)
        yield (*prefix, name), annotation
        if _is_model(annotation):
            yield from _env_paths(annotation, (*prefix, name))


ENV_PATHS = sorted(_env_paths(TetherConfig), key=lambda item: item[0])


@st.composite
def environments(draw: st.DrawFn) -> dict[str, str]:
    """TETHER_* variables for a few fields: plain text, JSON, or junk; never a NUL."""
    env: dict[str, str] = {}
    for path, annotation in draw(st.lists(st.sampled_from(ENV_PATHS), max_size=3)):
        value = draw(values(annotation))
        plain = value if isinstance(value, str) else str(value)
        as_text = draw(st.sampled_from([json.dumps(value, allow_nan=True), plain]))
        env[_env_name(path)] = as_text.replace("\x00", "")
    if draw(st.booleans()):
        unknown = st.sampled_from(["TETHER_NOPE", "TETHER_SERVER__NOPE", "tether_server__port"])
        env[draw(unknown)] = "1"
    return env


@settings(max_examples=300)
@given(env=environments())
def test_any_environment_values_load_or_are_refused_clearly(
    directory: Path, env: dict[str, str]
) -> None:
    """Generated TETHER_* variables over a valid file: a configuration, or a ConfigError
    naming field, value and rule (and the variable), never a secret or long value echoed."""
    path = directory / "base.yaml"
    path.write_text("service: {name: svc}\n", encoding="utf-8")
    with mock.patch.dict(os.environ, env):
        try:
            config = load_config(path)
        except ConfigError as error:
            event("refused")
            check_refusal(error, env)
        else:
            event("loaded")
            check_valid(config, directory)
