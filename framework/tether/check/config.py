"""Settings of ``tether check`` from ``[tool.tether.check]`` in pyproject.toml, and which files
they select.

Keys (every one optional)::

    [tool.tether.check]
    select = ["TTH"]                 # codes or prefixes checked (default: every rule)
    ignore = ["TTH003"]              # codes or prefixes not checked
    exclude = [...]                  # replaces the default exclusions
    extend-exclude = ["scripts"]     # added to them
    per-file-ignores = { "tools/*.py" = ["TTH003"] }

Each path checked takes the nearest pyproject.toml at or above it; that file's directory is the
root its patterns are matched from. A pattern without ``/`` matches the name of a file or of
any directory above it (``tests``, ``*_pb2.py``); one with ``/`` matches the path from the root
(``tools/*.py``, ``src/generated``). Exclusions apply to files named on the command line too.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any

from tether.check.rules import RULES, codes_for
from tether.errors import ConfigError, ConfigProblem

__all__ = ["DEFAULT_EXCLUDE", "CheckSettings", "iter_python_files", "load_settings"]

#: Not service code: generated modules, environments, build output, and tests, which drive the
#: service from outside (a raw channel is how a plain client calls it).
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "*_pb2.py",
    "*_pb2_grpc.py",
    "*_pb2.pyi",
    ".git",
    ".hg",
    ".venv",
    "venv",
    ".tox",
    ".nox",
    ".eggs",
    "*.egg-info",
    "__pycache__",
    "build",
    "dist",
    "tests",
    "test_*.py",
    "*_test.py",
    "conftest.py",
)

_TABLE = "tool.tether.check"
_KEYS = ("select", "ignore", "exclude", "extend-exclude", "per-file-ignores")


@dataclass(frozen=True, slots=True)
class CheckSettings:
    """What to check and where.

    Attributes:
        root: the directory patterns are matched from: the pyproject.toml's, else the
            directory checked.
        codes: the codes checked.
        exclude: patterns of files and directories not checked.
        per_file_ignores: ``(pattern, codes)`` pairs: codes not checked in matching files.
        source: the pyproject.toml read, if any.
    """

    root: Path
    codes: frozenset[str]
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    per_file_ignores: tuple[tuple[str, frozenset[str]], ...] = ()
    source: Path | None = None

    def excluded(self, path: Path) -> bool:
        """Whether ``path`` (a file or a directory) matches an exclusion."""
        return _matches(self._relative(path), self.exclude)

    def codes_for(self, path: Path) -> frozenset[str]:
        """The codes checked in the file ``path``."""
        if not self.per_file_ignores:
            return self.codes
        relative = self._relative(path)
        ignored: set[str] = set()
        for pattern, codes in self.per_file_ignores:
            if _matches(relative, (pattern,)):
                ignored |= codes
        return self.codes - ignored

    def _relative(self, path: Path) -> PurePosixPath:
        absolute = path.absolute()
        try:
            return PurePosixPath(absolute.relative_to(self.root).as_posix())
        except ValueError:  # outside the root: names still match
            return PurePosixPath(absolute.as_posix())


def _matches(relative: PurePosixPath, patterns: Iterable[str]) -> bool:
    text = relative.as_posix()
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        if "/" in pattern:
            pattern = pattern.removeprefix("./")
            if fnmatchcase(text, pattern) or any(
                fnmatchcase(parent.as_posix(), pattern) for parent in relative.parents
            ):
                return True
        elif any(fnmatchcase(part, pattern) for part in relative.parts):
            return True
    return False


def _find_pyproject(start: Path) -> Path | None:
    here = start.absolute()
    if not here.is_dir():
        here = here.parent
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def _strings(table: dict[str, Any], key: str, problems: list[ConfigProblem]) -> list[str] | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(ConfigProblem(f"{_TABLE}.{key}", repr(value), "must be a list of strings"))
        return None
    return value


def load_settings(
    start: Path,
    *,
    select: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
) -> CheckSettings:
    """The settings for checking ``start``: its pyproject.toml's, then the command line's.

    Args:
        start: a path to check; the nearest pyproject.toml at or above it is read.
        select: codes or prefixes replacing the configured selection, ``select`` and
            ``ignore`` alike (``--select``).
        ignore: codes or prefixes taken out of the selection (``--ignore``).

    Raises:
        ConfigError: the file is not valid TOML, a key is unknown or of the wrong type, or a
            code names no rule; every problem is listed.
    """
    source = _find_pyproject(start)
    table: dict[str, Any] = {}
    if source is not None:
        try:
            document = tomllib.loads(source.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                [ConfigProblem(str(source), "", f"not valid TOML ({exc})")], source=str(source)
            ) from None
        found = document.get("tool", {}).get("tether", {}).get("check", {})
        table = found if isinstance(found, dict) else {}
    problems = [
        ConfigProblem(
            f"{_TABLE}.{key}", repr(table[key]), f"unknown key; known: {', '.join(_KEYS)}"
        )
        for key in table
        if key not in _KEYS
    ]
    configured_select = _strings(table, "select", problems)
    configured_ignore = _strings(table, "ignore", problems) or []
    exclude = _strings(table, "exclude", problems)
    extend = _strings(table, "extend-exclude", problems) or []
    raw_ignores = table.get("per-file-ignores", {})
    pairs: list[tuple[str, list[str]]] = []
    if not isinstance(raw_ignores, dict):
        problems.append(
            ConfigProblem(
                f"{_TABLE}.per-file-ignores",
                repr(raw_ignores),
                "must be a table of pattern = [codes]",
            )
        )
    else:
        for pattern, codes in raw_ignores.items():
            if isinstance(codes, list) and all(isinstance(c, str) for c in codes):
                pairs.append((pattern, codes))
            else:
                problems.append(
                    ConfigProblem(
                        f"{_TABLE}.per-file-ignores.{pattern}",
                        repr(codes),
                        "must be a list of codes",
                    )
                )
    chosen: frozenset[str] = frozenset(rule.code for rule in RULES)
    per_file: list[tuple[str, frozenset[str]]] = []
    for field, selectors, apply in (
        (f"{_TABLE}.select", configured_select, "select"),
        (f"{_TABLE}.ignore", configured_ignore, "ignore"),
        ("--select", select, "select"),
        ("--ignore", ignore, "ignore"),
    ):
        if selectors is None:
            continue
        try:
            codes = codes_for(selectors, field=field)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        chosen = codes if apply == "select" else chosen - codes
    for pattern, selectors in pairs:
        try:
            per_file.append(
                (pattern, codes_for(selectors, field=f"{_TABLE}.per-file-ignores.{pattern}"))
            )
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        from_file = source is not None and any(p.field.startswith(_TABLE) for p in problems)
        raise ConfigError(problems, source=str(source) if from_file else None)
    here = start.absolute()
    return CheckSettings(
        root=source.parent if source is not None else (here if here.is_dir() else here.parent),
        codes=chosen,
        exclude=(*(DEFAULT_EXCLUDE if exclude is None else exclude), *extend),
        per_file_ignores=tuple(per_file),
        source=source,
    )


def iter_python_files(paths: Iterable[Path], settings: CheckSettings) -> Iterator[Path]:
    """The ``.py`` files under ``paths`` that ``settings`` do not exclude, each once, sorted
    within each path. A dangling symbolic link is yielded like a file (reading it fails, which
    the caller reports).

    Raises:
        FileNotFoundError: a path does not exist (and is not a symbolic link).
    """
    seen: set[Path] = set()
    for path in paths:
        if not path.exists() and not path.is_symlink():
            raise FileNotFoundError(path)
        if path.is_dir():
            candidates: Iterable[Path] = _walk(path, settings)
        else:  # a file, or a dangling symlink: reading it reports why it cannot be read
            candidates = [path] if not settings.excluded(path) else []
        for candidate in candidates:
            key = candidate.absolute()
            if key not in seen:
                seen.add(key)
                yield candidate


def _walk(directory: Path, settings: CheckSettings) -> list[Path]:
    if directory.absolute() != settings.root and settings.excluded(directory):
        return []
    found: list[Path] = []
    for current, dirs, files in os.walk(directory):
        base = Path(current)
        dirs[:] = sorted(d for d in dirs if not settings.excluded(base / d))
        found.extend(
            base / name
            for name in sorted(files)
            if name.endswith(".py") and not settings.excluded(base / name)
        )
    return found
