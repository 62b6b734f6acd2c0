"""Per-line suppression: ``# tether: ignore[TTH003]`` (or several codes, comma-separated).

A suppression names the codes it silences, on the line the finding is reported on. A bare
``# tether: ignore`` silences nothing: a blanket ignore would hide the next, unrelated problem
on that line too. It, an empty list, and a code that is not a rule are findings themselves
(TTH100), so a typo never passes for a suppression.
"""

from __future__ import annotations

import io
import re
import tokenize
from dataclasses import dataclass, field

from tether.check.rules import RULES

__all__ = ["Suppressions", "read_suppressions"]

_MARK = "tether:"
_DIRECTIVE = re.compile(r"#\s*tether:\s*ignore\b(?:\[([^\]]*)\])?", re.IGNORECASE)
_KNOWN = frozenset(rule.code for rule in RULES)


@dataclass(slots=True)
class Suppressions:
    """The codes silenced per line, and the comments that silence nothing.

    Attributes:
        codes: line -> codes named on it.
        problems: ``(line, column offset, message)`` of each comment that silences nothing.
    """

    codes: dict[int, frozenset[str]] = field(default_factory=dict)
    problems: list[tuple[int, int, str]] = field(default_factory=list)

    def silences(self, line: int, code: str) -> bool:
        """Whether a comment on ``line`` names ``code``."""
        codes = self.codes.get(line)
        return codes is not None and code in codes


def _comments(source: str) -> list[tuple[int, int, str]]:
    """``(line, column, text)`` of every comment; the tokenizer tells a ``#`` in a string from
    a comment."""
    try:
        return [
            (tok.start[0], tok.start[1], tok.string)
            for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT
        ]
    except (tokenize.TokenError, SyntaxError):  # the parser accepted it; be lenient anyway
        return [
            (number, line.index("#"), line[line.index("#") :])
            for number, line in enumerate(source.splitlines(), start=1)
            if "#" in line
        ]


def read_suppressions(source: str) -> Suppressions:
    """The suppression comments of a module's source."""
    found = Suppressions()
    if _MARK not in source:  # most files: no tokenizing at all
        return found
    for line, column, text in _comments(source):
        match = _DIRECTIVE.search(text)
        if match is None:
            continue
        where = column + match.start()
        listed = match.group(1)
        if listed is None:
            found.problems.append(
                (
                    line,
                    where,
                    "`# tether: ignore` without codes silences nothing; name them: "
                    "# tether: ignore[TTH003]",
                )
            )
            continue
        codes = [c.strip().upper() for c in listed.split(",") if c.strip()]
        unknown = [c for c in codes if c not in _KNOWN]
        if not codes:
            found.problems.append((line, where, "`# tether: ignore[]` names no code"))
        elif unknown:
            found.problems.append(
                (line, where, f"`# tether: ignore` names unknown code {', '.join(unknown)}")
            )
        known = frozenset(c for c in codes if c in _KNOWN)
        if known:
            found.codes[line] = found.codes.get(line, frozenset()) | known
    return found
