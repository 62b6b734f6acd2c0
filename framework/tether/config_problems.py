"""Turn pydantic validation errors into ConfigProblems: dotted field, safe value, short rule.

Values are shown with ``repr()``, cut to ``MAX_SHOWN`` characters, and with every secret (any
field typed ``SecretStr``, found by walking the models) and every undeclared key masked.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from types import UnionType
from typing import Annotated, Any, TypeGuard, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import SettingsError

from tether.errors import ConfigProblem

ENV_PREFIX = "TETHER_"
ENV_DELIMITER = "__"
MAX_SHOWN = 80
_MASK = "**********"
# The user-info part of an address (``http://user:password@host``, ``user:pw@host:2379``): an
# address refused for another reason must not show the credentials it carries.
_USERINFO = re.compile(r"""(?<=['"/\s\[,(])[^\s/@'"\[\],()]+@""")
DNS_LABEL = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"
_PATTERN_RULES = {
    DNS_LABEL: (
        "must be a lowercase DNS label: a-z, 0-9 and '-', starting with a letter, "
        "at most 63 characters"
    ),
}


def problems_from(exc: ValidationError, root: type[BaseModel]) -> list[ConfigProblem]:
    """One ConfigProblem per error in ``exc``, located from the ``root`` model."""
    return [_problem_from(error, root) for error in exc.errors(include_url=False)]


def relevant_env(root: type[BaseModel]) -> list[str]:
    """Names of environment variables that feed a field of ``root``."""
    heads = tuple(f"{ENV_PREFIX}{name}".upper() for name in root.model_fields)
    nested = tuple(head + ENV_DELIMITER for head in heads)
    return [name for name in os.environ if name.upper() in heads or name.upper().startswith(nested)]


class _Masked:
    """Stands in for a withheld value; shows as the mask, also inside a container's repr."""

    def __repr__(self) -> str:
        return repr(_MASK)


_MASKED = _Masked()
_UNKNOWN = object()  # the type at a location no model declares; its value is withheld

_FIXED_RULES = {
    "missing": "is required",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "path_type": "must be a file path",
}
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_TYPES = {
    "greater_than": "gt",
    "greater_than_equal": "ge",
    "less_than": "lt",
    "less_than_equal": "le",
}


def _problem_from(error: ErrorDetails, root: type[BaseModel]) -> ConfigProblem:
    """Translate one pydantic error into a ConfigProblem: dotted field, safe value, short rule."""
    loc = error["loc"]
    annotation = _annotation_at(root, loc)
    value = "<missing>" if error["type"] == "missing" else show(_redact(annotation, error["input"]))
    rule = _rule(error, annotation, root)
    env_name = _env_name_for(loc)
    if env_name:
        rule += f" (from {env_name})"
    return ConfigProblem(_dotted(loc), value, rule)


def _rule(error: ErrorDetails, annotation: object, root: type[BaseModel]) -> str:
    kind = error["type"]
    ctx = error.get("ctx", {})
    if kind in _BOUND_TYPES:
        bound = _BOUND_TYPES[kind]
        limit = ctx[bound]
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)  # pydantic reports ge=0 on a float field as 0.0
        return f"must be {_BOUNDS[bound]} {limit}"
    if kind == "literal_error":
        choices = get_args(_unwrap(annotation))
        if choices:
            return "must be one of: " + ", ".join(repr(choice) for choice in choices)
        return f"must be {ctx.get('expected', 'one of the allowed values')}"
    if kind == "extra_forbidden":
        model = _unwrap(_annotation_at(root, error["loc"][:-1]))
        if _is_model(model):
            return "unknown field; allowed: " + ", ".join(sorted(model.model_fields))
        return "unknown field"
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", ""))
        return _PATTERN_RULES.get(pattern, f"must match {pattern}")
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    return _FIXED_RULES.get(kind, error["msg"])


def problem_from_settings(exc: SettingsError, root: type[BaseModel]) -> ConfigProblem:
    """Name the variable behind a SettingsError (a complex value that is not JSON)."""
    cause = exc.__cause__
    if isinstance(cause, json.JSONDecodeError):
        for name in relevant_env(root):
            if os.environ[name] == cause.doc:
                loc = tuple(name[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER))
                value = show(_redact(_annotation_at(root, loc), cause.doc))
                return ConfigProblem(_dotted(loc), value, f"must be JSON (from {name})")
    return ConfigProblem("environment", show(f"{ENV_PREFIX}*"), str(exc))


def _env_name_for(loc: tuple[int | str, ...]) -> str | None:
    """The TETHER_* variable that supplied the value at ``loc``, when one did."""
    keys: list[str] = []
    for part in loc:
        if not isinstance(part, str):
            break
        keys.append(part)
    by_upper = {name.upper(): name for name in os.environ}
    for depth in range(len(keys), 0, -1):
        name = by_upper.get(ENV_PREFIX + ENV_DELIMITER.join(keys[:depth]).upper())
        if name is None:
            continue
        if depth == len(keys) or _json_has(os.environ[name], keys[depth:]):
            return name
    return None


def _json_has(text: str, keys: Sequence[str]) -> bool:
    """Whether ``text`` is a JSON object holding the nested ``keys``."""
    try:
        node: object = json.loads(text)
    except ValueError:
        return False
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _dotted(loc: tuple[int | str, ...]) -> str:
    """``("registry", "endpoints", 1)`` -> ``registry.endpoints[1]``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "config"


def show(value: object) -> str:
    """repr() of a value, cut to MAX_SHOWN characters so bad input is never echoed whole, and
    with the credentials of any ``user:password@host`` address masked."""
    text = _USERINFO.sub(_MASK + "@", repr(value))
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def _unwrap(annotation: object) -> object:
    """Strip Annotated[...] and Optional[...] down to the type that carries the structure."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin is Union or origin is UnionType:
            members = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _is_model(annotation: object) -> TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _annotation_at(root: type[BaseModel], loc: Sequence[int | str]) -> Any:
    """The declared type at an error location, walking models, dicts and tuples from the root."""
    annotation: Any = root
    for part in loc:
        annotation = _unwrap(annotation)
        origin = get_origin(annotation)
        if _is_model(annotation):
            fields = annotation.model_fields
            if not isinstance(part, str) or part not in fields:
                return _UNKNOWN
            annotation = fields[part].annotation
        elif origin is dict:
            key_type, value_type = get_args(annotation)
            annotation = key_type if part == "[key]" else value_type
        elif origin in (tuple, list):
            annotation = get_args(annotation)[0]
        else:
            return _UNKNOWN
    return annotation


def _is_secret(annotation: object) -> bool:
    """SecretStr anywhere in the type (Optional, dict values...) makes the whole value secret."""
    if annotation is _UNKNOWN or annotation is SecretStr:
        return True
    if _is_model(annotation):
        return False  # a model is walked field by field in _redact
    return any(_is_secret(arg) for arg in get_args(annotation))


def _redact(annotation: object, value: object) -> object:
    """A copy of ``value`` safe to show: secret and undeclared parts replaced by the mask."""
    if _is_secret(annotation):
        return _MASKED
    annotation = _unwrap(annotation)
    origin = get_origin(annotation)
    if _is_model(annotation) and isinstance(value, Mapping):
        fields = annotation.model_fields
        return {
            key: _redact(fields[key].annotation if key in fields else _UNKNOWN, item)
            for key, item in value.items()
        }
    if origin is dict and isinstance(value, Mapping):
        value_type = get_args(annotation)[1]
        return {key: _redact(value_type, item) for key, item in value.items()}
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        item_type = get_args(annotation)[0]
        return [_redact(item_type, item) for item in value]
    return value
