"""The static check of source files: parse, run the rules, apply suppressions and settings."""

from __future__ import annotations

import ast
import io
import os
import tokenize
from collections.abc import Iterable, Sequence
from pathlib import Path

from tether.check.config import iter_python_files, load_settings
from tether.check.rules import RULES, Finding
from tether.check.static import check_tree
from tether.check.suppress import read_suppressions

__all__ = ["check_paths", "check_source", "display_path"]

_EVERY_CODE = frozenset(rule.code for rule in RULES)


def display_path(path: Path) -> str:
    """``path`` as findings show it: relative to the current directory when under it."""
    absolute = path.absolute()
    try:
        return absolute.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return absolute.as_posix()


def _column(lines: list[str], line: int, offset: int) -> int:
    """The 1-based character column of an AST column offset (UTF-8 bytes)."""
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    if text.isascii():
        return offset + 1
    return len(text.encode("utf-8")[:offset].decode("utf-8", errors="replace")) + 1


def _text_of(source: bytes) -> str:
    """The text of a module's bytes, decoded as Python decodes them: a UTF-8 byte order mark or
    a ``# -*- coding: ... -*-`` declaration names the encoding, else UTF-8. Called once the
    parser has accepted the bytes, so the encoding is known and valid."""
    encoding, _ = tokenize.detect_encoding(io.BytesIO(source).readline)
    return source.decode(encoding, errors="replace")


def check_source(
    source: str | bytes,
    path: str = "<source>",
    *,
    codes: frozenset[str] = _EVERY_CODE,
    script: bool | None = None,
) -> list[Finding]:
    """Run the static rules over one module's source.

    Args:
        source: the module's text, or its bytes as read from the file (decoded as Python
            decodes them: a byte order mark or a coding declaration names the encoding).
        path: the path findings name.
        codes: the codes to report.
        script: the module is a script run as a whole (its print() calls are its output);
            by default, when ``path`` names a ``__main__.py``.

    Returns:
        The findings, ordered by line and column; suppressed ones left out.
    """
    if isinstance(source, str):
        source = source.removeprefix("\ufeff")  # a byte order mark read as text
    try:
        tree = ast.parse(source, filename=path)
    except (SyntaxError, ValueError) as exc:  # ValueError: null bytes, on some Pythons
        if "TTH000" not in codes:
            return []
        line, column, message = 1, 1, str(exc)
        if isinstance(exc, SyntaxError):
            line, column, message = max(exc.lineno or 1, 1), max(exc.offset or 1, 1), exc.msg
        return [Finding(path, line, column, "TTH000", f"cannot parse: {message}")]
    text = source if isinstance(source, str) else _text_of(source)
    is_script = os.path.basename(path) == "__main__.py" if script is None else script
    raw = check_tree(tree, script=is_script)
    suppressions = read_suppressions(text)
    lines = text.splitlines()
    findings = [
        Finding(path, line, _column(lines, line, offset), code, message)
        for line, offset, code, message in raw
        if code in codes and not suppressions.silences(line, code)
    ]
    if "TTH100" in codes:
        findings.extend(
            Finding(path, line, column + 1, "TTH100", message)
            for line, column, message in suppressions.problems
        )
    return sorted(set(findings), key=lambda f: (f.line, f.column, f.code, f.message))


def _unreadable(file: Path, shown: str, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if file.is_symlink() and not file.exists():
        reason = f"{reason} (a symbolic link to {os.readlink(file)})"
    return f"cannot read {shown}: {reason}"


def check_paths(
    paths: Iterable[Path],
    *,
    select: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
) -> list[Finding]:
    """Check every Python file under ``paths`` with the settings of its project.

    Args:
        paths: files and directories.
        select: codes or prefixes replacing the configured selection.
        ignore: codes or prefixes taken out of the selection.

    Returns:
        Every finding, ordered by path, line and column.

    Raises:
        ConfigError: a pyproject.toml's ``[tool.tether.check]`` or a selector is refused.
        FileNotFoundError: a path does not exist. A file found that cannot be read is a
            finding (TTH000), and the other files are still checked.
    """
    findings: list[Finding] = []
    for path in paths:
        settings = load_settings(path, select=select, ignore=ignore)
        for file in iter_python_files([path], settings):
            codes = settings.codes_for(file)
            if not codes:
                continue
            shown = display_path(file)
            try:
                source = file.read_bytes()
            except OSError as exc:  # a dangling symlink, a file that cannot be read
                if "TTH000" in codes:
                    findings.append(Finding(shown, 1, 1, "TTH000", _unreadable(file, shown, exc)))
                continue
            findings.extend(check_source(source, shown, codes=codes))
    return sorted(set(findings))
