"""The rules of ``tether check``: one literal table of codes, and the finding they produce.

Codes are stable: a code is never reused for another rule. ``TTH0xx`` are static rules read
from the source, ``TTH100`` is about suppression comments, ``TTH2xx`` come from the runtime
check (``--runtime``). ``docs/check.md`` has, for every code, the reason and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tether.errors import ConfigError, ConfigProblem

__all__ = ["RULES", "Finding", "Rule", "codes_for", "rule"]


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: its stable code, a short name, and what it finds, in one line."""

    code: str
    name: str
    summary: str


#: Every rule, in code order. The table is the one place a code is defined.
RULES: tuple[Rule, ...] = (
    Rule("TTH000", "syntax-error", "the file cannot be parsed, so no rule could read it"),
    Rule("TTH001", "raw-grpc", "a gRPC channel or server made outside tether"),
    Rule("TTH002", "thread-without-context", "work sent to a thread without the call's context"),
    Rule("TTH003", "print", "print() writes a line without the call's context"),
    Rule("TTH004", "stdlib-logging", "stdlib logging writes lines without the call's context"),
    Rule("TTH005", "request-logged-whole", "a whole request object formatted into a log line"),
    Rule("TTH006", "blocking-call", "a blocking call inside async def"),
    Rule("TTH007", "http-without-trace", "an outbound HTTP client that does not send the trace"),
    Rule("TTH008", "swallowed-error", "a handler swallows every failure with `pass`"),
    Rule("TTH009", "status-on-context", "a handler sets its status with context.set_code()"),
    Rule("TTH100", "bad-suppression", "a suppression comment that names no known code"),
    Rule("TTH201", "invalid-config", "the app's configuration is refused"),
    Rule("TTH202", "unimplemented-rpc", "an RPC the app serves has no handler"),
    Rule("TTH203", "bad-fallback", "a fallback does not match its method"),
    Rule("TTH204", "unknown-method", "configuration names a method no proto defines"),
    Rule("TTH205", "unknown-dependency", "configuration names a dependency the source never calls"),
)

_BY_CODE = {rule.code: rule for rule in RULES}


@dataclass(frozen=True, slots=True, order=True)
class Finding:
    """One problem found: where (1-based line and column), which rule, and what to do."""

    path: str
    line: int
    column: int
    code: str
    message: str

    def to_json(self) -> dict[str, object]:
        """The finding as ``--format json`` writes it."""
        return {
            "code": self.code,
            "message": self.message,
            "path": self.path,
            "line": self.line,
            "column": self.column,
        }

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.code} {self.message}"


def rule(code: str) -> Rule:
    """The rule of ``code``; raises KeyError for an unknown code."""
    return _BY_CODE[code]


def codes_for(selectors: Iterable[str], *, field: str) -> frozenset[str]:
    """The codes a list of selectors names: each is a code or a prefix of codes (``TTH00``).

    Args:
        selectors: what the configuration or the command line gave.
        field: where they came from, for the error (``tool.tether.check.select``).

    Raises:
        ConfigError: a selector names no rule; every bad one is listed with the known codes.
    """
    codes: set[str] = set()
    problems = []
    for selector in selectors:
        wanted = selector.strip().upper()
        matched = [code for code in _BY_CODE if wanted and code.startswith(wanted)]
        if not matched:
            problems.append(
                ConfigProblem(
                    field,
                    repr(selector),
                    f"unknown rule code; known: {', '.join(_BY_CODE)} (or a prefix, e.g. TTH00)",
                )
            )
        codes.update(matched)
    if problems:
        raise ConfigError(problems)
    return frozenset(codes)
